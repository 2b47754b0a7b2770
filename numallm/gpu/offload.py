"""GPU offload of a built model: the one module that moves blocks to GPUs and runs them there.

    off = setup(model, gguf, n_ctx, OffloadRequest(gpu_layers=8))   # plan (plan_for_machine) + apply
    cache = off.adopt_cache(model.new_cache(n_ctx))   # offloaded layers' KV lives on their GPU
    model(tokens, cache, pos0)                         # blocks run where the plan put them
    off.summary()                                      # predicted vs actual bytes, where layers ran

For each block the plan puts on GPU g, `apply` copies the block's GGUF bytes to g as stored (the
kernels decode Q4_0/Q8_0/Q4_K/Q6_K in place, F32/F16 as typed arrays), allocates its K/V cache
there (the plan's kv_dtype) and replaces model.blk[i] with a DeviceBlock, called exactly like the
CPU block. Each GPU also holds the scratch arrays plan.device_buffers lists, once, shared by its
blocks. A run of consecutive blocks on one GPU keeps the residual stream on it: x goes up before
the first and comes back after the last, so a token crosses PCIe once each way per GPU run. The
output head (plan.output) becomes a DeviceLinear on its GPU; output_norm stays a host vector
(model code applies it before calling the head), as the plan counts it.

Every device allocation goes through _Gpu.put/empty, which counts bytes by kind (weights, kv,
buffers): that is the "actual" the report compares with the plan. Blocks left on the CPU stay
as built and only count their calls (count_calls), so "where each layer ran" is observed (calls
and kernel launches per block), not read back from the plan. Model files are untouched.

Any failure of the GPU library (no driver, the simulator off and no device, out of memory while
copying) leaves the model exactly as built and returns an Offload whose `reason` says why; the
engine then prints that one line and runs on the CPU.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import numpy as np

from .. import ops
from .plan import OffloadPlan, OffloadRequest, device_buffers

KINDS = ("weights", "kv", "buffers")
_DTYPES = {"f16": np.float16, "f32": np.float32, "f64": np.float64}

# Attribute names of a block (models/base.py, qwen2.py, qwen3.py = GGUF tensor names) this
# executor runs; a block holding any other tensor stays on the CPU.
MATRICES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
NORMS = ("attn_norm", "ffn_norm")
OPTIONAL = ("attn_q_bias", "attn_k_bias", "attn_v_bias", "attn_q_norm", "attn_k_norm")


class OffloadFailed(Exception):
    """The GPU library could not do what the plan asks; the message is the one-line reason."""


# -- one GPU --------------------------------------------------------------------------------------

def _cuda():
    """numba.cuda, or OffloadFailed saying why it cannot be used."""
    try:
        from numba import cuda
    except ImportError as e:     # a numba without the built-in target and no numba-cuda
        raise OffloadFailed(f"no CUDA library ({e}); pip install 'numallm[gpu]'") from None
    if not cuda.is_available():
        err = cuda.cuda_error()
        why = str(err).strip().splitlines()[0] if err else "no CUDA device"
        raise OffloadFailed(f"CUDA is not usable ({why})")
    return cuda


def _ordinal(cuda, info) -> int | None:
    """CUDA's number for the inventory's GPU (matched by PCI bus id: NVML and CUDA may order
    devices differently). None under the simulator, which has one device for every index."""
    from .cuda_kernels import simulated

    if simulated():
        return None
    want = (info.pci_bus_id or "").lower()
    for i, dev in enumerate(cuda.gpus):
        bus = f"{dev.PCI_DOMAIN_ID:04x}:{dev.PCI_BUS_ID:02x}:{dev.PCI_DEVICE_ID:02x}.0"
        if want and bus == want:
            return i
    if info.index < len(cuda.gpus):
        return info.index
    raise OffloadFailed(f"GPU {info.index} ({info.name}, {info.pci_bus_id}) is not among the "
                        f"{len(cuda.gpus)} CUDA devices")


class _Gpu:
    """One GPU as the executor uses it: its CUDA device, every allocation counted by kind, the
    scratch arrays its blocks share and a count of kernel launches."""

    def __init__(self, cuda, info, launch):
        self.cuda, self.info, self.launch = cuda, info, launch
        self.index = info.index
        self.ordinal = _ordinal(cuda, info)
        self.bytes = dict.fromkeys(KINDS, 0)
        self.launches = 0
        self.scratch: dict[str, object] = {}
        self.driver_used: int | None = None     # free-memory drop the driver saw (real GPUs)
        self._free0 = None

    @contextmanager
    def active(self):
        from .cuda_kernels import simulator_pace

        dev = nullcontext() if self.ordinal is None else self.cuda.gpus[self.ordinal]
        with dev, simulator_pace():
            yield

    def put(self, host: np.ndarray, kind: str):
        dev = self.cuda.to_device(np.ascontiguousarray(host))
        self.bytes[kind] += int(dev.nbytes)
        return dev

    def empty(self, shape: tuple[int, ...], dtype, kind: str):
        dev = self.cuda.device_array(shape, dtype=dtype)
        self.bytes[kind] += int(dev.nbytes)
        return dev

    def mark_start(self) -> None:
        if self.ordinal is not None:
            self._free0 = self.cuda.current_context().get_memory_info()[0]

    def mark_end(self) -> None:
        if self._free0 is not None:
            self.driver_used = int(self._free0 - self.cuda.current_context().get_memory_info()[0])


# -- executors --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Resident:
    """The residual stream of n_tok tokens, left in `gpu`'s scratch x by the previous block."""

    gpu: _Gpu
    n_tok: int


class DeviceKVCache:
    """One layer's K and V on its GPU: (n_head_kv, n_ctx, head_dim) each, in the plan's type."""

    def __init__(self, gpu: _Gpu, n_ctx: int, n_head_kv: int, head_dim: int, dtype):
        self.k = gpu.empty((n_head_kv, n_ctx, head_dim), dtype, "kv")
        self.v = gpu.empty((n_head_kv, n_ctx, head_dim), dtype, "kv")
        self.n = 0

    @property
    def nbytes(self) -> int:
        return int(self.k.nbytes + self.v.nbytes)


def unsupported_parts(block) -> list[str]:
    """Tensors of `block` this executor does not run (empty: it can run the block)."""
    known = set(MATRICES + NORMS + OPTIONAL)
    return [k for k, v in vars(block).items()
            if isinstance(v, (ops.Linear, np.ndarray)) and k not in known]


class DeviceBlock:
    """A transformer block on one GPU, called like models.base.Block: (x, cache, pos0) -> x.

    x: float32 (T, n_embd) from the host, or a Resident left by the previous block on this GPU.
    Returns a Resident when the next block runs on the same GPU, else float32 (T, n_embd)."""

    def __init__(self, index: int, block, gpu: _Gpu, n_ctx: int, kv_dtype):
        from .cuda_kernels import GpuMatrix, device_layout

        self.index, self.gpu, self.a, self.rope = index, gpu, block.a, block.rope
        parts = vars(block)
        self.mats = {}
        for name in MATRICES:
            lin = parts[name]
            self.mats[name] = GpuMatrix(lin.qtype, lin.shape,
                                        gpu.put(device_layout(lin.qtype, lin.raw), "weights"))
        self.vecs = {name: gpu.put(parts[name].astype(np.float32), "weights")
                     for name in NORMS + OPTIONAL if name in parts}
        self.cache = DeviceKVCache(gpu, n_ctx, self.a.n_head_kv, self.a.head_dim, kv_dtype)
        self.keep = False          # set by apply: the next block runs on this GPU too
        self.calls = 0
        self.tokens = 0

    def _k(self, fn, *args) -> None:
        fn(*args)
        self.gpu.launches += 1

    def __call__(self, x, cache, pos0: int):
        from . import cuda_ops as co

        a, g = self.a, self.gpu
        s, launch = g.scratch, g.launch
        n = x.n_tok if isinstance(x, Resident) else x.shape[0]
        q3 = s["q"].reshape(s["q"].shape[0], a.n_head, a.head_dim)        # (t, n_head, hd) views
        k3 = s["k"].reshape(s["k"].shape[0], a.n_head_kv, a.head_dim)
        v3 = s["v"].reshape(s["v"].shape[0], a.n_head_kv, a.head_dim)
        with g.active():
            if isinstance(x, Resident):
                if x.gpu is not g:
                    raise RuntimeError(f"blk.{self.index}: residual stream is on GPU {x.gpu.index}")
            else:
                s["x"][:n].copy_to_device(np.ascontiguousarray(x, dtype=np.float32))
            m, v = self.mats, self.vecs
            self._k(co.rms_norm, s["x"], v["attn_norm"], s["h"], n, a.norm_eps, launch)
            for name, out in (("attn_q", "q"), ("attn_k", "k"), ("attn_v", "v")):
                self._k(m[name].matmul, s["h"], s[out], n, launch)
                if f"{name}_bias" in v:
                    self._k(co.add_bias, s[out], v[f"{name}_bias"], n, launch)
            for name, t3, heads in (("attn_q_norm", q3, a.n_head), ("attn_k_norm", k3, a.n_head_kv)):
                if name in v:      # qwen3: RMS norm over each head, in place
                    rows = t3.reshape(t3.shape[0] * heads, a.head_dim)
                    self._k(co.rms_norm, rows, v[name], rows, n * heads, a.norm_eps, launch)
            r = self.rope
            for t3 in (q3, k3):
                self._k(co.rope, t3, pos0, n, s["rope_inv_freq"], r.freq_scale, r.dim, r.neox, launch)
            kv = self.cache
            self._k(co.kv_store, k3, v3, kv.k, kv.v, pos0, n, launch)
            kv.n = pos0 + n
            self._k(co.attention, q3, kv.k, kv.v, s["attn"], pos0, n, launch)
            self._k(m["attn_output"].matmul, s["attn"], s["h"], n, launch)
            self._k(co.add, s["x"], s["h"], n, launch)
            self._k(co.rms_norm, s["x"], v["ffn_norm"], s["h"], n, a.norm_eps, launch)
            self._k(m["ffn_gate"].matmul, s["h"], s["gate"], n, launch)
            self._k(m["ffn_up"].matmul, s["h"], s["up"], n, launch)
            self._k(co.silu_mul, s["gate"], s["up"], n, launch)
            self._k(m["ffn_down"].matmul, s["gate"], s["h"], n, launch)
            self._k(co.add, s["x"], s["h"], n, launch)
            self.calls += 1
            self.tokens += n
            if self.keep:
                return Resident(g, n)
            return s["x"][:n].copy_to_host()


class _Counted:
    """Mixin for a block the plan leaves on the CPU: counts its calls, so the report observes
    where each layer ran. Mixed into the block's own class (count_calls) rather than wrapped, so
    the block stays the object NUMA placement and Transformer.linears() walk."""

    def __call__(self, x, cache, pos0: int):
        self.calls += 1
        self.tokens += x.shape[0]
        return super().__call__(x, cache, pos0)


_COUNTED: dict[type, type] = {}


def count_calls(block):
    """Make `block` (a models.base.Block) count its calls; returns it."""
    cls = type(block)
    if cls not in _COUNTED:
        _COUNTED[cls] = type(f"Counted{cls.__name__}", (_Counted, cls), {})
    block.__class__ = _COUNTED[cls]
    block.calls = 0
    block.tokens = 0
    return block


class DeviceLinear:
    """The output head on a GPU: logits = x @ W.T with W in its GGUF encoding.
    x: float32 (T, n_embd) on the host (already normed) -> float32 (T, n_vocab)."""

    def __init__(self, lin: ops.Linear, gpu: _Gpu):
        from .cuda_kernels import GpuMatrix, device_layout

        self.name, self.qtype, self.shape, self.nbytes = lin.name, lin.qtype, lin.shape, lin.nbytes
        self.gpu = gpu
        self.m = GpuMatrix(lin.qtype, lin.shape, gpu.put(device_layout(lin.qtype, lin.raw), "weights"))
        self.calls = 0

    def __call__(self, x: np.ndarray) -> np.ndarray:
        g, s = self.gpu, self.gpu.scratch
        n = x.shape[0]
        with g.active():
            s["h"][:n].copy_to_device(np.ascontiguousarray(x, dtype=np.float32))
            self.m.matmul(s["h"], s["logits"], n, g.launch)
            g.launches += 1
            self.calls += 1
            return s["logits"][:n].copy_to_host()


# -- the offload ----------------------------------------------------------------------------------

class Offload:
    """What `apply` did: the plan, the GPUs with their actual bytes, each block's executor.
    `reason` is set (and nothing moved) when the GPU library could not be used."""

    def __init__(self, plan: OffloadPlan | None, reason: str | None = None):
        self.plan, self.reason = plan, reason
        self.gpus: dict[int, _Gpu] = {}
        self.blocks: list = []             # per layer: a DeviceBlock, or the CPU block counting its
                                           # calls (empty: not applied)
        self.head: DeviceLinear | None = None
        self.host_cache: list = []

    @property
    def applied(self) -> bool:
        return bool(self.blocks)

    def gpu_layers(self) -> list[int]:
        """Indices of the blocks that run on a GPU."""
        return [i for i, b in enumerate(self.blocks) if isinstance(b, DeviceBlock)]

    def adopt_cache(self, cache: list) -> list:
        """The engine's per-layer cache list with offloaded layers' entries replaced by their
        device caches (the host arrays of those layers are dropped unused)."""
        out = [b.cache if isinstance(b, DeviceBlock) else c for b, c in zip(self.blocks, cache)] \
            if self.blocks else list(cache)
        self.host_cache = out
        return out

    # -- bytes --
    def actual(self) -> dict[int, dict[str, int]]:
        """Per GPU: bytes allocated by kind, and total."""
        return {i: {**g.bytes, "total": sum(g.bytes.values())} for i, g in sorted(self.gpus.items())}

    def compare(self) -> list[dict]:
        """Per GPU: predicted (plan) and actual bytes by kind, and the relative difference of the
        totals."""
        rows = []
        for i, act in self.actual().items():
            use = self.plan.devices[i]
            pred = {"weights": use.weights, "kv": use.kv, "buffers": use.buffers, "total": use.total}
            rows.append({"gpu": i, "predicted": pred, "actual": act,
                         "driver": self.gpus[i].driver_used,
                         "diff": (act["total"] - pred["total"]) / max(pred["total"], 1)})
        return rows

    def host_model_bytes(self, model) -> int:
        """Weights and KV cache the host really holds: matrices and vectors of the blocks left on
        the CPU, token_embd, the output norm (and head, unless offloaded), host KV caches."""
        seen, total = set(), 0

        def count(obj) -> None:
            nonlocal total
            if id(obj) in seen:
                return
            seen.add(id(obj))
            total += int(obj.nbytes)

        for b in self.blocks:
            if not isinstance(b, DeviceBlock):
                for v in vars(b).values():
                    if isinstance(v, (ops.Linear, np.ndarray)):
                        count(v)
        count(model.token_embd)
        count(model.output_norm)
        if not isinstance(model.output, DeviceLinear):
            count(model.output)
        for c in self.host_cache:
            if isinstance(c, ops.KVCache):
                count(c)
        return total

    def block_matrix_bytes(self) -> int:
        """Bytes of the weight matrices of the blocks on GPUs (Transformer.linears() no longer
        sees them)."""
        return sum(m.nbytes for b in self.blocks if isinstance(b, DeviceBlock) for m in b.mats.values())

    def gpu_model_bytes(self) -> int:
        """Weights and KV cache allocated on the GPUs (scratch buffers are not model bytes)."""
        return sum(g.bytes["weights"] + g.bytes["kv"] for g in self.gpus.values())

    def gpu_share(self, model) -> float:
        """Fraction of the model's bytes (weights + KV cache) that really sit on GPUs."""
        gpu = self.gpu_model_bytes()
        total = gpu + self.host_model_bytes(model)
        return gpu / total if total else 0.0

    def processor(self, model) -> str:
        """ollama's PROCESSOR split, from the bytes where they really are (as plan.processor()
        is from the bytes where the plan puts them)."""
        from .plan import processor_split

        return processor_split(self.host_model_bytes(model), self.gpu_model_bytes())

    def where(self) -> list[tuple[str, str, int]]:
        """(unit, executor, calls) per layer and the head, as observed while running."""
        out = [(f"blk.{i}", f"GPU {b.gpu.index}" if isinstance(b, DeviceBlock) else "CPU", b.calls)
               for i, b in enumerate(self.blocks)]
        if self.head is not None:
            out.append(("output", f"GPU {self.head.gpu.index}", self.head.calls))
        return out

    def where_line(self) -> str:
        """Runs of layers by executor: "blk.0-2 CPU (x3 calls each), blk.3-4 GPU 0 (...)"."""
        parts, runs = [], []
        for unit, ex, calls in self.where():
            if runs and runs[-1][1] == ex and unit.startswith("blk.") and runs[-1][0][-1].startswith("blk."):
                runs[-1][0].append(unit)
                runs[-1][2].append(calls)
            else:
                runs.append(([unit], ex, [calls]))
        for units, ex, calls in runs:
            name = units[0] if len(units) == 1 else f"{units[0]}-{units[-1].split('.')[1]}"
            ran = ("never called" if not any(calls) else
                   f"{min(calls)} calls" if min(calls) == max(calls) else f"{min(calls)}-{max(calls)} calls")
            parts.append(f"{name} {ex} ({ran})")
        return ", ".join(parts)

    def summary(self, model) -> str:
        """Lines for chat /stats and the CLI: PROCESSOR, where layers ran, predicted vs actual."""
        if not self.applied:
            return f"PROCESSOR  100% CPU ({self.reason or 'no GPU offload requested'})"
        lines = [f"PROCESSOR  {self.processor(model)}", f"layers: {self.where_line()}"]
        for row in self.compare():
            g = self.gpus[row["gpu"]]
            p, a = row["predicted"], row["actual"]
            drv = f", driver saw {row['driver'] / 2**20:.1f} MiB" if row["driver"] is not None else ""
            lines.append(f"GPU {g.index} ({g.info.name}): {a['total'] / 2**20:.1f} MiB allocated "
                         f"(weights {a['weights'] / 2**20:.1f}, KV {a['kv'] / 2**20:.1f}, buffers "
                         f"{a['buffers'] / 2**20:.1f}) vs {p['total'] / 2**20:.1f} MiB planned "
                         f"({100 * row['diff']:+.1f}%){drv}, {g.launches} kernel launches")
        return "\n".join(lines)


def apply(model, plan: OffloadPlan, n_ctx: int, launch=None) -> Offload:
    """Move the blocks (and head) `plan` puts on GPUs there. Raises OffloadFailed, with the
    model untouched, when the GPU library cannot; nothing is swapped in until every copy is made."""
    from .cuda_kernels import SUPPORTED, launch_config

    cuda = _cuda()
    launch = launch or launch_config()
    off = Offload(plan)
    kv_dtype = _DTYPES[plan.request.kv_dtype]
    args = model.args
    try:
        for i, use in plan.devices.items():
            g = _Gpu(cuda, use.device, launch)
            off.gpus[i] = g
            with g.active():
                g.mark_start()
                bufs = device_buffers(args, n_ctx, plan.n_batch, output=plan.output.device == i)
                for name, (shape, dtype) in bufs.items():
                    g.scratch[name] = g.empty(shape, _DTYPES[dtype], "buffers")
                inv = model.rope.inv_freq.astype(_DTYPES[bufs["rope_inv_freq"][1]])
                g.scratch["rope_inv_freq"].copy_to_device(inv)
        blocks: list = []
        for lp, blk in zip(plan.layers, model.blk):
            if lp.device is None:
                blocks.append(blk)
                continue
            bad = unsupported_parts(blk) + [f"{m} ({vars(blk)[m].qtype.name})" for m in MATRICES
                                           if vars(blk)[m].qtype not in SUPPORTED]
            if bad:
                raise OffloadFailed(f"blk.{lp.index} holds {', '.join(bad)}, which the GPU "
                                    f"executor does not run")
            g = off.gpus[lp.device]
            with g.active():
                blocks.append(DeviceBlock(lp.index, blk, g, n_ctx, kv_dtype))
        head = None
        if plan.output.device is not None:
            g = off.gpus[plan.output.device]
            with g.active():
                head = DeviceLinear(model.output, g)
        for g in off.gpus.values():
            with g.active():
                g.mark_end()
    except OffloadFailed:
        raise
    except Exception as e:  # noqa: BLE001 - any CUDA failure (out of memory, driver) means: CPU
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise OffloadFailed(f"the GPU copy failed ({type(e).__name__}: {msg})") from e
    # a run of blocks on one GPU keeps x there; the last of a run sends it back
    for b, nxt in zip(blocks, blocks[1:] + [None]):
        if isinstance(b, DeviceBlock):
            b.keep = isinstance(nxt, DeviceBlock) and nxt.gpu is b.gpu
    model.blk[:] = [b if isinstance(b, DeviceBlock) else count_calls(b) for b in blocks]
    if head is not None:
        model.output = head
    off.blocks, off.head = list(model.blk), head
    return off


def apply_plan(model, plan: OffloadPlan, n_ctx: int) -> Offload:
    """Apply the offload part of a placement plan. Never raises for a GPU problem: the Offload's
    `reason` then says why all runs on the CPU."""
    if not plan.devices:
        if plan.no_gpu:
            why = plan.no_gpu
        elif plan.skipped:
            why = "; ".join(f"GPU {i}: {r}" for i, r in plan.skipped)
        else:
            why = plan.notes[-1] if plan.notes else "the plan puts no layer on a GPU"
        return Offload(plan, why)
    try:
        return apply(model, plan, n_ctx)
    except OffloadFailed as e:
        return Offload(plan, str(e))


def setup(model, gguf, n_ctx: int, request: OffloadRequest, n_batch: int, *, numa: str = "off",
          nodes: list[int] | None = None, virtual_nodes: int | None = None) -> Offload:
    """Plan `request` for this machine (plan_for_machine: the plan `numallm plan` shows) and apply
    it. Never raises for a GPU problem: the Offload's `reason` then says why all runs on the CPU."""
    from .plan import plan_for_machine

    plan = plan_for_machine(gguf, n_ctx, request, n_batch, numa=numa, nodes=nodes,
                            virtual_nodes=virtual_nodes)
    if not plan.devices:
        if plan.no_gpu:
            why = plan.no_gpu
        elif plan.skipped:
            why = "; ".join(f"GPU {i}: {r}" for i, r in plan.skipped)
        else:
            why = plan.notes[-1] if plan.notes else "the plan puts no layer on a GPU"
        return Offload(plan, why)
    try:
        return apply(model, plan, n_ctx)
    except OffloadFailed as e:
        return Offload(plan, str(e))


def _ranges(ids: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2,5"."""
    out, start = [], None
    for i, n in enumerate(ids):
        if start is None:
            start = n
        if i + 1 == len(ids) or ids[i + 1] != n + 1:
            out.append(str(start) if start == n else f"{start}-{n}")
            start = None
    return ",".join(out)


def announcement(off: Offload) -> str:
    """The one line a load that asked for GPUs shows (the CLI prints it): why everything runs on
    the CPU, or where the layers went and the bytes planned vs allocated."""
    if not off.applied:
        if off.plan is not None and off.plan.no_gpu:
            return f"no GPU ({off.plan.no_gpu}): running every layer on the CPU"
        return f"GPU offload off ({off.reason}): running every layer on the CPU"
    runs = {}
    for b in off.blocks:
        if isinstance(b, DeviceBlock):
            runs.setdefault(b.gpu.index, []).append(b.index)
    if off.head is not None:
        runs.setdefault(off.head.gpu.index, []).append("output")
    parts = []
    for row in off.compare():
        units = runs.get(row["gpu"], [])
        blks = [u for u in units if u != "output"]
        what = " + ".join(x for x in (f"blk.{_ranges(blks)}" if blks else "",
                                      "output" if "output" in units else "") if x)
        parts.append(f"{what} on GPU {row['gpu']} ({row['actual']['total'] / 2**20:.1f} MiB allocated, "
                     f"{row['predicted']['total'] / 2**20:.1f} MiB planned)")
    return f"GPU offload: {'; '.join(parts)}"
