"""GPU execution below the model: one GPU's allocations, device tensors, device matrices, the
device KV cache, and the ops on them that numallm.ops hands over to (ops.register_executor).

A model's forward (models/base.py and the architectures' overrides) is the only forward: it
calls ops.rms_norm, ops.matmuls / a matrix's __call__, RoPE, ops.attention (cache.attend),
ops.swiglu, `+`, reshape and row slices. When a block's tensors are device tensors and device
matrices (numallm.gpu.offload puts them there), those calls run here, on that block's GPU:

  - an op runs where its weight is: rms_norm on its norm vector's GPU, matmuls on the first
    matrix's, attention on the cache's, RoPE and swiglu on their input's. An input on the host or
    on another GPU is copied over first (through the host: PCIe either way);
  - `a + b` runs where `b` (the right operand) is: models write `x + update`, so the residual
    stream follows the layer that computed the update. A GPU op's result is a DeviceTensor, so
    consecutive blocks on one GPU keep the stream there; a host op reads it back (`__array__`);
  - every op returns a new tensor (the model code never sees a buffer reused under it). Results
    take (rows, width) float32 slots from the GPU's pool (`Slots`), preallocated at load from
    plan.device_buffers and given back when the tensor is garbage; a forward that needs more
    grows the pool, and the bytes report shows it against the plan.

Every allocation goes through Gpu.put / Gpu.empty, counted by kind (weights, kv, buffers): the
"actual" that Offload.compare() sets against the plan. A device KV cache's bytes are counted
while it lives (one per session). Gpu.launches counts kernel launches, Gpu.uploads/downloads
host<->device copies of activations.
"""
from __future__ import annotations

import math
import threading
import time
import weakref
from contextlib import contextmanager, nullcontext

import numpy as np

from .. import ops

KINDS = ("weights", "kv", "buffers")
DTYPES = {"f16": np.float16, "f32": np.float32, "f64": np.float64}


class Gpu:
    """One GPU as the executor uses it: its CUDA device, every allocation counted by kind, the
    activation pool, RoPE tables, and counts of launches and copies."""

    def __init__(self, cuda, info, launch, ordinal: int | None):
        self.cuda, self.info, self.launch = cuda, info, launch
        self.index = info.index
        self.ordinal = ordinal                   # CUDA's number; None under the simulator
        self.bytes = dict.fromkeys(KINDS, 0)
        self.launches = self.uploads = self.downloads = 0
        self.up_bytes = self.down_bytes = 0      # activation bytes copied each way (PCIe traffic)
        self.stage = None                        # hybrid.Stage: host buffers, CPU expert worker
        self.slots = Slots(self)
        self.rope_tables: dict[int, tuple[object, object]] = {}   # id(Rope) -> (Rope, inv_freq)
        self.driver_used: int | None = None      # free-memory drop the driver saw (real GPUs)
        self._free0 = None
        self._active = threading.local()          # per thread: inside active() already

    @contextmanager
    def active(self):
        """This GPU's context while kernels launch (re-entrant: ops inside a layer's call)."""
        if getattr(self._active, "on", False):
            yield
            return
        from .cuda_kernels import simulator_pace

        dev = nullcontext() if self.ordinal is None else self.cuda.gpus[self.ordinal]
        self._active.on = True
        try:
            with dev, simulator_pace():
                yield
        finally:
            self._active.on = False

    def put(self, host: np.ndarray, kind: str):
        dev = self.cuda.to_device(np.ascontiguousarray(host))
        self.bytes[kind] += int(dev.nbytes)
        return dev

    def empty(self, shape: tuple[int, ...], dtype, kind: str):
        dev = self.cuda.device_array(shape, dtype=dtype)
        self.bytes[kind] += int(dev.nbytes)
        return dev

    def freed(self, kind: str, nbytes: int) -> None:
        self.bytes[kind] -= nbytes

    def rope_table(self, rope: ops.Rope):
        """Each pair's angle per position, float64 (dim/2,): rope.inv_freq times its position
        scale (freq_scale, or YaRN's per-pair blend), as ops.Rope.tables computes it; on this
        GPU, copied once per Rope ("buffers")."""
        hit = self.rope_tables.get(id(rope))
        if hit is None:
            table = (rope.inv_freq * rope.pos_scale).astype(np.float64)
            hit = self.rope_tables[id(rope)] = (rope, self.put(table, "buffers"))
        return hit[1]

    def mark_start(self) -> None:
        if self.ordinal is not None:
            self._free0 = self.cuda.current_context().get_memory_info()[0]

    def mark_end(self) -> None:
        if self._free0 is not None:
            self.driver_used = int(self._free0 - self.cuda.current_context().get_memory_info()[0])


class Slots:
    """The GPU's activation arrays, float32 (rows, width), pooled by width: a new DeviceTensor
    takes a free one with enough rows and gives it back when it is garbage."""

    def __init__(self, gpu: Gpu):
        self.gpu = gpu
        self.free: dict[int, list] = {}
        self.rows = 0               # rows of the planned slots (tokens per pass)
        self.live = self.peak = 0

    def reserve(self, count: int, rows: int, width: int) -> None:
        """Allocate `count` slots (rows, width) now (the plan's buffers)."""
        self.rows = max(self.rows, rows)
        for _ in range(count):
            self.free.setdefault(width, []).append(self.gpu.empty((rows, width), np.float32, "buffers"))

    def take(self, rows: int, width: int):
        pool = self.free.setdefault(width, [])
        for i, arr in enumerate(pool):
            if arr.shape[0] >= rows:
                slot = pool.pop(i)
                break
        else:               # beyond the plan: a new slot, counted (the report shows the excess)
            slot = self.gpu.empty((max(rows, self.rows), width), np.float32, "buffers")
        self.live += 1
        self.peak = max(self.peak, self.live)
        return slot

    def give(self, width: int, slot) -> None:
        self.live -= 1
        self.free[width].append(slot)


class DeviceTensor:
    """A float32 tensor on one GPU: `shape`, `reshape`, row slices, `+`, and `np.asarray(t)`
    (a copy to the host). Views share their base's slot, which returns to the pool when the base
    and every view are gone."""

    __array_ufunc__ = None          # ndarray + DeviceTensor -> DeviceTensor.__radd__
    _host = None                    # (subclasses that skip __init__, hybrid.Pending)

    def __init__(self, gpu: Gpu, data, base: "DeviceTensor | None" = None, slot=None,
                 host: np.ndarray | None = None):
        self.gpu, self.data = gpu, data          # data: a device array of exactly `shape`
        self._base, self._slot = base, slot
        self._host = host                        # a weight's host values (vector()), or None

    @classmethod
    def new(cls, gpu: Gpu, shape: tuple[int, ...]) -> "DeviceTensor":
        """An uninitialised tensor in a pooled slot."""
        rows, width = shape[0], math.prod(shape[1:])
        slot = gpu.slots.take(rows, width)
        return cls(gpu, slot[:rows].reshape(shape), slot=slot)

    @classmethod
    def upload(cls, gpu: Gpu, host: np.ndarray) -> "DeviceTensor":
        host = np.ascontiguousarray(host, dtype=np.float32)
        t = cls.new(gpu, host.shape)
        t.data.copy_to_device(host)
        gpu.uploads += 1
        gpu.up_bytes += host.nbytes
        return t

    def __del__(self):
        if self._slot is not None:
            try:
                self.gpu.slots.give(self._slot.shape[1], self._slot)
            except Exception:       # interpreter shutdown: nothing left to give back to
                pass

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    @property
    def ndim(self) -> int:
        return len(self.data.shape)

    dtype = np.dtype(np.float32)

    def __len__(self) -> int:
        return self.data.shape[0]

    def _view(self, data) -> "DeviceTensor":
        return DeviceTensor(self.gpu, data, base=self if self._base is None else self._base)

    def reshape(self, *shape) -> "DeviceTensor":
        shape = shape[0] if len(shape) == 1 and isinstance(shape[0], tuple) else shape
        return self._view(self.data.reshape(*shape))

    def __getitem__(self, rows: slice) -> "DeviceTensor":
        """Rows (a slice with step 1, as `x[-1:]`): a view."""
        if not isinstance(rows, slice) or rows.step not in (None, 1):
            raise TypeError(f"a DeviceTensor takes a row slice, not {rows!r}")
        return self._view(self.data[rows])

    def astype(self, dtype) -> np.ndarray:
        """A host copy in `dtype` (numpy's spelling, for host code given a device tensor)."""
        return np.asarray(self, dtype=dtype)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        if self._host is not None:
            return self._host if dtype is None else self._host.astype(dtype, copy=False)
        with self.gpu.active():
            host = self.data.copy_to_host()
        self.gpu.downloads += 1
        self.gpu.down_bytes += host.nbytes
        return host if dtype is None else host.astype(dtype, copy=False)

    def __add__(self, other):
        if isinstance(other, DeviceTensor):
            return add(self, other, other.gpu)
        return np.asarray(self) + other          # the update is on the host: so is the sum

    def __radd__(self, other):
        return add(other, self, self.gpu)

    def __repr__(self) -> str:
        return f"DeviceTensor(GPU {self.gpu.index}, {self.shape})"


def to_gpu(x, gpu: Gpu) -> DeviceTensor:
    """x (host array or a DeviceTensor anywhere) as a DeviceTensor on `gpu`."""
    if isinstance(x, DeviceTensor):
        if x.gpu is gpu:
            return x
        x = np.asarray(x)                        # another GPU: through the host
    return DeviceTensor.upload(gpu, x)


def vector(gpu: Gpu, host: np.ndarray) -> DeviceTensor:
    """A weight vector (norm, bias) on `gpu`, counted as weights; never pooled. It keeps its host
    values: host code reading it (deepseek2's routing bias, in ops.moe_route) gets them without a
    copy (weights never change)."""
    host = np.array(host, dtype=np.float32)
    return DeviceTensor(gpu, gpu.put(host, "weights"), host=host)


class DeviceLinear:
    """A weight matrix on one GPU in its GGUF encoding: `lin(x)` = x @ W.T like ops.Linear, for x
    on the host or a device -> DeviceTensor (T, N). host_out: the result comes back as a host
    array (the output head, whose logits the sampler reads)."""

    def __init__(self, lin: ops.Linear, gpu: Gpu, host_out: bool = False):
        from .cuda_kernels import GpuMatrix, device_layout

        self.name, self.qtype, self.shape, self.nbytes = lin.name, lin.qtype, lin.shape, lin.nbytes
        self.gpu, self.host_out = gpu, host_out
        self.calls = 0                  # products computed (Executor.matmuls counts them)
        self.seconds = 0.0              # wall time of the calls made through __call__
        self.m = GpuMatrix(lin.qtype, lin.shape, gpu.put(device_layout(lin.qtype, lin.raw), "weights"))

    def __call__(self, x):
        t0 = time.perf_counter()
        y = ops.matmuls(x, self)[0]
        y = np.asarray(y) if self.host_out else y
        self.seconds += time.perf_counter() - t0
        return y


class DeviceKVCache:
    """One layer's K and V on its GPU: (n_head_kv, n_ctx, head_dim) each, in the plan's type.
    attend() stores k, v at pos0.. and runs attention there (ops.attention dispatches to it).
    Its bytes count as the GPU's "kv" while it lives."""

    def __init__(self, gpu: Gpu, n_ctx: int, n_head_kv: int, head_dim: int, dtype):
        self.gpu = gpu
        self.k = gpu.empty((n_head_kv, n_ctx, head_dim), dtype, "kv")
        self.v = gpu.empty((n_head_kv, n_ctx, head_dim), dtype, "kv")
        self.n = 0
        weakref.finalize(self, gpu.freed, "kv", self.nbytes)

    @property
    def nbytes(self) -> int:
        return int(self.k.nbytes + self.v.nbytes)

    def attend(self, q, k, v, pos0: int) -> DeviceTensor:
        """q: (T, n_head, hd), k, v: (T, n_head_kv, hd) -> (T, n_head * hd) on this GPU."""
        from . import cuda_ops as co

        g = self.gpu
        with g.active():
            q, k, v = (to_gpu(t, g) for t in (q, k, v))
            n, n_head, hd = q.shape
            co.kv_store(k.data, v.data, self.k, self.v, pos0, n, g.launch)
            self.n = pos0 + n
            out = DeviceTensor.new(g, (n, n_head * hd))
            co.attention(q.data, self.k, self.v, out.data, pos0, n, g.launch)
            g.launches += 2
        return out


# -- the ops numallm.ops hands over (register_executor) -------------------------------------------

def add(a, b, gpu: Gpu) -> DeviceTensor:
    """a + b on `gpu`; equal shapes, or one operand's shape a trailing part of the other's (a
    bias over heads)."""
    from . import cuda_ops as co

    with gpu.active():
        a, b = to_gpu(a, gpu), to_gpu(b, gpu)
        if math.prod(b.shape) > math.prod(a.shape):
            a, b = b, a                          # the larger first (float addition commutes)
        width = math.prod(a.shape[1:])
        if a.shape == b.shape:
            rows = a.shape[0]
        elif _one_row(a.shape, b.shape):
            rows = 1                             # b is one row of a: a bias, added to every row
        else:
            raise ValueError(f"cannot add shapes {a.shape} and {b.shape} on a GPU")
        out = DeviceTensor.new(gpu, a.shape)
        co.add(a.data.reshape(a.shape[0], width), b.data.reshape(rows, width),
               out.data.reshape(a.shape[0], width), a.shape[0], gpu.launch)
        gpu.launches += 1
    return out


def _one_row(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    """Whether b broadcasts (numpy's rules) as one row of a: b, less leading 1s, ends a."""
    while b and b[0] == 1:
        b = b[1:]
    return math.prod(b) == math.prod(a[1:]) and a[len(a) - len(b):] == b


class Executor:
    """What numallm.ops calls for device tensors and matrices (see ops.register_executor)."""

    @staticmethod
    def matmuls(x, *lins: DeviceLinear) -> list[DeviceTensor]:
        g = lins[0].gpu
        outs = []
        with g.active():
            xt = to_gpu(x, g)
            n = xt.shape[0]
            x2 = xt.data.reshape(n, math.prod(xt.shape[1:]))
            for lin in lins:
                if lin.gpu is not g:             # matrices of one call on two GPUs: one at a time
                    outs.append(Executor.matmuls(xt, lin)[0])
                    continue
                out = DeviceTensor.new(g, (n, lin.shape[0]))
                lin.m.matmul(x2, out.data, n, g.launch)
                g.launches += 1
                lin.calls += 1
                outs.append(out)
        return outs

    @staticmethod
    def rms_norm(x, weight: DeviceTensor, eps: float) -> DeviceTensor:
        from . import cuda_ops as co

        g = weight.gpu
        with g.active():
            xt = to_gpu(x, g)
            d = xt.shape[-1]
            rows = math.prod(xt.shape[:-1])
            out = DeviceTensor.new(g, xt.shape)
            co.rms_norm(xt.data.reshape(rows, d), weight.data, out.data.reshape(rows, d), rows,
                        float(eps), g.launch)
            g.launches += 1
        return out

    @staticmethod
    def swiglu(gate: DeviceTensor, up) -> DeviceTensor:
        from . import cuda_ops as co

        g = gate.gpu
        with g.active():
            u = to_gpu(up, g)
            out = DeviceTensor.new(g, gate.shape)
            co.swiglu(gate.data, u.data, out.data, gate.shape[0], g.launch)
            g.launches += 1
        return out

    @staticmethod
    def sigmoid_gate(x, h, w: DeviceTensor) -> DeviceTensor:
        from . import cuda_ops as co

        g = w.gpu
        with g.active():
            xt, ht = to_gpu(x, g), to_gpu(h, g)
            out = DeviceTensor.new(g, xt.shape)
            co.sigmoid_gate(xt.data, ht.data, w.data, out.data, xt.shape[0], g.launch)
            g.launches += 1
        return out

    @staticmethod
    def moe_ffn(x: DeviceTensor, ids, weights, gate, up, down) -> DeviceTensor:
        """Routed experts for an input on a GPU: on that GPU when the block's experts are there
        (numallm.gpu.experts), else on the host with the sum brought back (numallm.gpu.hybrid)."""
        from . import experts, hybrid

        if isinstance(gate, experts.DeviceExperts):
            return experts.moe_ffn(x, ids, weights, gate, up, down)
        return hybrid.host_experts(x, ids, weights, gate, up, down)

    @staticmethod
    def rope(rope: ops.Rope, x: DeviceTensor, pos0: int) -> DeviceTensor:
        """x: (T, H, head_dim) on its GPU, rotated in place as ops.Rope does on the host."""
        from . import cuda_ops as co

        g = x.gpu
        with g.active():       # (the table holds the position scales: linear, YaRN's blend)
            co.rope(x.data, pos0, x.shape[0], g.rope_table(rope), 1.0, rope.dim, rope.neox,
                    g.launch, rope.mscale)
            g.launches += 1
        return x


ops.register_executor(DeviceTensor, Executor)
ops.register_executor(DeviceLinear, Executor)
