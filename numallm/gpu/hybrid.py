"""Hybrid MoE: a block runs on a GPU (attention, KV cache, norms, router, shared expert) while its
routed experts stay in host memory and run on the CPU (the plan's host_tensors: --cpu-moe,
--n-cpu-moe, -ot exps=CPU, -ngl auto on a model too big for the GPU).

The block's own forward runs as always (numallm.gpu.device dispatches its ops); when it calls
ops.moe_ffn with its normed input on the GPU and the experts on the host, `host_experts`:

  1. copies the input rows down into a page-locked host buffer of this GPU (`Stage`; in the
     memory of the NUMA node its PCIe slot is on, where libnuma and the driver allow); the router's
     logits came down already, for ops.moe_route, which picked the experts on the host;
  2. hands the experts' products to this GPU's one CPU worker thread, which runs the engine's CPU
     routed feed-forward (numallm.experts.moe_ffn, node-sharded under --numa shard: the experts
     are ShardedExperts then, placement/runtime.py) on the caller's thread pool;
  3. returns at once a `Pending` device tensor. Meanwhile the block goes on launching its other
     GPU work (qwen2moe's shared expert: its forward asks for the routed sum first); the first op
     that reads the Pending waits for the worker and uploads the sum into a pooled GPU slot.

Each GPU counts the seconds its worker spent on experts (`cpu_s`), the seconds the GPU side
waited for them (`wait_s`; cpu_s - wait_s is the CPU work that overlapped the GPU side) and the
kernel launches made while they were pending (`launches_beside`).
"""
from __future__ import annotations

import math
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from time import perf_counter

import numpy as np

from .. import numa_mem, threads
from .device import DeviceTensor, Gpu


class Stage:
    """Per GPU: the host transfer buffers (float32 (rows, width), grown as needed), the CPU
    worker and what it measured."""

    def __init__(self, gpu: Gpu):
        self.gpu = gpu
        self.buffers: dict[str, np.ndarray] = {}
        self.kind = ""                      # how the buffers are held (the report says it)
        self._pins: list = []               # driver registrations of node-local buffers
        self.worker = ThreadPoolExecutor(1, thread_name_prefix=f"numallm-gpu{gpu.index}-experts")
        self.last: Future | None = None
        self.calls = 0
        self.cpu_s = self.wait_s = 0.0
        self.launches_beside = 0            # GPU kernel launches made while experts were pending

    def buffer(self, name: str, rows: int, width: int) -> np.ndarray:
        buf = self.buffers.get(name)
        if buf is None or buf.shape[0] < rows or buf.shape[1] != width:
            buf = self.buffers[name] = self._page_locked(max(rows, 1), width)
        return buf[:rows]

    def _page_locked(self, rows: int, width: int) -> np.ndarray:
        """Page-locked (pinned) host memory for DMA, on the GPU's node where it is known."""
        g, node = self.gpu, self.gpu.info.numa_node
        st = numa_mem.status()
        if g.ordinal is not None and node is not None and st.available and node in st.nodes:
            arr = numa_mem.empty_on_node((rows, width), np.float32, node)
            self._pins.append(g.cuda.current_context().mempin(arr, arr.ctypes.data, arr.nbytes))
            self.kind = f"pinned, node {node}"
            return arr
        self.kind = "pinned" + (" (simulator)" if g.ordinal is None else "")
        return g.cuda.pinned_array((rows, width), dtype=np.float32)


def stage(gpu: Gpu) -> Stage:
    """The GPU's Stage, made on its first hybrid block call (Gpu.stage)."""
    with _lock:
        if gpu.stage is None:
            gpu.stage = Stage(gpu)
        return gpu.stage


def stats(gpu: Gpu) -> Stage | None:
    """The Stage of `gpu` if its blocks ever ran experts on the CPU."""
    return gpu.stage


_lock = threading.Lock()


class Pending(DeviceTensor):
    """A (T, N) DeviceTensor whose values the CPU worker is still computing: the first read of
    `data` waits for them and uploads them (from the page-locked buffer) into a pooled slot."""

    def __init__(self, gpu: Gpu, shape: tuple[int, ...], future: Future, st: Stage):
        self.gpu, self._base, self._slot = gpu, None, None
        self._shape, self._future, self._stage, self._data = tuple(shape), future, st, None
        self._launches = gpu.launches

    @property
    def shape(self) -> tuple[int, ...]:
        return self._shape

    @property
    def data(self):
        if self._data is None:
            g, st = self.gpu, self._stage
            st.launches_beside += g.launches - self._launches
            t0 = perf_counter()
            host = self._future.result()
            st.wait_s += perf_counter() - t0
            rows, width = self._shape[0], math.prod(self._shape[1:])
            with g.active():
                slot = g.slots.take(rows, width)
                data = slot[:rows].reshape(self._shape)
                data.copy_to_device(host)
            g.uploads += 1
            g.up_bytes += host.nbytes
            self._slot, self._data = slot, data
        return self._data


def host_experts(x: DeviceTensor, ids: np.ndarray, weights: np.ndarray, gate, up, down) -> Pending:
    """ops.moe_ffn for an input x (T, K) on a GPU and experts on the host (see the module
    docstring): the sum of the routed experts, (T, N), as a Pending tensor on x's GPU."""
    from ..experts import moe_ffn

    g = x.gpu
    st = stage(g)
    if st.last is not None:
        st.last.result()                    # its buffers are about to be reused
    t = x.shape[0]
    width = math.prod(x.shape[1:])
    hin = st.buffer("in", t, width)
    with g.active():
        x.data.reshape(t, width).copy_to_host(hin)
    g.downloads += 1
    g.down_bytes += hin.nbytes
    n_out = down.shape[1]
    out = st.buffer("out", t, n_out)
    pool = threads.current()

    def work() -> np.ndarray:
        t0 = perf_counter()
        with threads.activate(pool):
            out[:] = moe_ffn(hin, ids, weights, gate, up, down)
        st.cpu_s += perf_counter() - t0
        return out

    st.calls += 1
    st.last = st.worker.submit(work)
    return Pending(g, (t, n_out), st.last, st)
