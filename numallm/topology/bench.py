"""`numallm topo --bench`: a short read-bandwidth probe, per node and node to node.

One Python thread per physical core, pinned to it, sums its slice of a buffer placed on a chosen
node; numpy's reductions release the GIL, so the threads stream memory in parallel. No Numba:
this path must start in well under a second.
"""
from __future__ import annotations

import ctypes
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from .model import Node, Topology
from .sysfs import Reader

MIB = 1 << 20
MIN_BUFFER = 256 * MIB
MAX_BUFFER = 2048 * MIB


@contextmanager
def pinned(cpus):
    """Run the calling thread on `cpus`, then restore its affinity (Linux: per thread)."""
    old = os.sched_getaffinity(0)
    os.sched_setaffinity(0, set(cpus))
    try:
        yield
    finally:
        os.sched_setaffinity(0, old)


class NodeBuffer:
    """A float64 buffer whose pages lie on one node: libnuma's numa_alloc_onnode when there is
    libnuma, else first touch by a thread pinned to the node (the kernel's default policy)."""

    def __init__(self, node: Node, nbytes: int, cpus: list[int], libnuma=None):
        self.n = nbytes // 8
        self.nbytes = self.n * 8
        self._lib, self._ptr = None, None
        if libnuma is not None and node.real_node is None:
            lib = libnuma.LIBNUMA
            lib.numa_alloc_onnode.argtypes = [ctypes.c_size_t, ctypes.c_int]
            lib.numa_alloc_onnode.restype = ctypes.c_void_p
            lib.numa_free.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
            ptr = lib.numa_alloc_onnode(self.nbytes, node.id)
            if ptr:
                self._lib, self._ptr = lib, ptr
                raw = (ctypes.c_double * self.n).from_address(ptr)
                self.array = np.frombuffer(raw, dtype=np.float64)   # (n,)
                self.array.fill(1.0)  # fault the pages in, on the node
                self.placement = "libnuma"
                return
        with pinned(cpus):  # the node's allowed CPUs
            self.array = np.ones(self.n, dtype=np.float64)        # (n,) first touch: local pages
        self.placement = "first touch"

    def free(self) -> None:
        self.array = None
        if self._ptr:
            self._lib.numa_free(self._ptr, self.nbytes)
            self._ptr = None


def read_gbps(buf: np.ndarray, cpus: list[int], seconds: float) -> float:
    """Aggregate read bandwidth (GB/s) of one pinned thread per CPU in `cpus` summing `buf`."""
    slices = np.array_split(buf, len(cpus))
    done = [0] * len(cpus)
    start = threading.Barrier(len(cpus) + 1)

    def work(i: int) -> None:
        with pinned([cpus[i]]):
            part = slices[i]
            part.sum()                      # warm: TLB and page tables
            start.wait()
            end = time.perf_counter() + seconds
            while time.perf_counter() < end:
                part.sum()
                done[i] += part.nbytes

    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(len(cpus))]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    return sum(done) / (time.perf_counter() - t0) / 1e9


@dataclass(frozen=True)
class BenchResult:
    local_gbps: tuple[tuple[int, float], ...]            # (node, GB/s) threads and memory on node
    remote_gbps: tuple[tuple[int, int, float], ...]      # (reader node, memory node, GB/s)
    buffer_bytes: int
    placement: str                                       # libnuma or first touch
    threads: tuple[tuple[int, int], ...]                 # (node, reader threads)

    def local(self) -> dict[int, float]:
        return dict(self.local_gbps)

    def to_dict(self) -> dict:
        return {"local_gbps": {str(n): round(v, 2) for n, v in self.local_gbps},
                "remote_gbps": [{"reader": a, "memory": b, "gbps": round(v, 2)}
                                for a, b, v in self.remote_gbps],
                "buffer_bytes": self.buffer_bytes, "placement": self.placement,
                "threads": {str(n): t for n, t in self.threads}}


def _reader_cpus(node: Node, allowed: set[int]) -> list[int]:
    """One CPU per physical core: the first allowed hardware thread of each."""
    return [t for c in node.cores for t in c.threads[:1] if t in allowed] or \
           [t for c in node.cores for t in c.threads if t in allowed][:1]


def run_bench(topo: Topology, nodes: list[int], seconds: float = 0.3) -> BenchResult:
    """Local bandwidth of each node in `nodes`, and the first node's threads reading the others."""
    r = Reader("/")
    from .discover import load_libnuma
    libnuma = load_libnuma(r) if not topo.virtual else None
    allowed = set(topo.process.allowed_cpus)
    by_id = {n: topo.node(n) for n in nodes}
    l3 = (topo.cpu.l3_bytes or 32 * MIB) * max(len(nd.l3_groups) for nd in by_id.values())
    free = min(nd.mem_free_bytes for nd in by_id.values())
    size = int(min(max(4 * l3, MIN_BUFFER), MAX_BUFFER, max(free // 10, 16 * MIB)))
    local, remote, threads, placement = [], [], [], "first touch"
    readers = {n: _reader_cpus(nd, allowed) for n, nd in by_id.items()}
    first = nodes[0]
    for n in nodes:
        buf = NodeBuffer(by_id[n], size, readers[n], libnuma)
        placement = buf.placement
        try:
            local.append((n, read_gbps(buf.array, readers[n], seconds)))
            threads.append((n, len(readers[n])))
            if n != first:
                remote.append((first, n, read_gbps(buf.array, readers[first], seconds)))
        finally:
            buf.free()
    return BenchResult(tuple(local), tuple(remote), size, placement, tuple(threads))
