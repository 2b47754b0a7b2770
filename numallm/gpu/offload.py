"""GPU offload of a built model: the one module that decides, from the plan, which blocks' tensors
move to which GPU, and reports where they are and where each layer ran.

    off = apply_plan(model, plan.gpu, n_ctx)          # the GPU part of placement.make_plan
    cache = off.adopt_cache(model.new_cache(n_ctx))   # per session: offloaded layers' KV on their GPU
    model(tokens, cache, pos0)                         # the model's own forward, ops where tensors are
    off.summary(model)                                 # predicted vs actual bytes, where layers ran

The offload acts on the built model from outside and never restates it: for each block the plan
puts on GPU g, `apply` reads the block class's declaration (`type(block).TENSORS`, models.base.T)
and replaces each declared tensor by its device version, a matrix by a DeviceLinear (its GGUF
bytes as stored; the kernels decode Q4_0/Q8_0/Q4_K/Q6_K in place, F32/F16 as typed arrays), a
vector by a DeviceTensor. The block's own forward then runs its ops on g (numallm.gpu.device:
ops dispatch on the tensor types), and the residual stream stays on g across consecutive blocks
there by itself. model.blk[i] becomes a GpuLayer holding that block: it counts the layer's calls
and launches and makes g current (and keeps NUMA placement, which places `Block`s, off it). The
output head (plan.output) becomes a DeviceLinear whose logits come back to the host;
output_norm stays a host vector, as the plan counts it.

Every device allocation is counted by kind (weights, kv, buffers): the "actual" that `compare`
sets against the plan. KV caches are made per session (`adopt_cache`, a new list each call).
Where each layer ran is observed: GPU layers count their own calls and kernel launches; layers on
the host have no hook below the model, so the engine reports each forward pass (`host_pass`).

Any failure of the GPU library (no driver, the simulator off and no device, out of memory while
copying) leaves the model exactly as built and returns an Offload whose `reason` says why; the
caller then shows `announcement()` and runs on the CPU. Nothing here prints.
"""
from __future__ import annotations

from time import perf_counter

import numpy as np

from ..experts import ExpertLinear
from ..heads import HeadLinear
from .device import DTYPES, DeviceKVCache, DeviceLinear, DeviceTensor, Gpu, to_gpu, vector
from .experts import DeviceExperts
from .mla import DeviceLatentCache, DeviceMLA, is_mla
from .plan import OffloadPlan
from .sizes import device_buffers


class OffloadFailed(Exception):
    """The GPU library could not do what the plan asks; the message is the one-line reason."""


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


class GpuLayer:
    """model.blk[i] for a block the plan puts on a GPU: the block itself, whose declared tensors
    are now on `gpu` (those the plan keeps on the host, routed experts, stay host objects),
    called through this object, which counts calls, tokens, kernel launches and wall time and
    makes the GPU current. (x, cache, pos0) -> x as the block's own __call__; the input comes
    over once (one upload where it is on the host or another GPU), and the output goes back to
    the host once when the next layer (or output_norm) runs there (`host_out`). cache must be
    this layer's DeviceKVCache (Offload.adopt_cache)."""

    def __init__(self, index: int, block, gpu: Gpu, host_out: bool = False, attention=None):
        self.index, self.block, self.gpu, self.host_out = index, block, gpu, host_out
        self.attention = attention         # mla.DeviceMLA for an MLA block (its cache is latent)
        self.calls = self.tokens = self.launches = 0
        self.seconds = 0.0

    def new_cache(self, n_ctx: int, dtype):
        """This layer's cache on its GPU: K and V, or MLA's latent rows."""
        if self.attention is not None:
            return self.attention.new_cache(n_ctx, dtype)
        a = self.block.a
        return DeviceKVCache(self.gpu, n_ctx, a.n_head_kv, a.head_dim, dtype)

    def __call__(self, x, cache, pos0: int):
        g = self.gpu
        if not isinstance(cache, (DeviceKVCache, DeviceLatentCache)) or cache.gpu is not g:
            raise RuntimeError(f"blk.{self.index} runs on GPU {g.index} but was given {type(cache).__name__}"
                               f"; make the cache list with Offload.adopt_cache")
        t0 = perf_counter()
        with g.active():
            before = g.launches
            xg = to_gpu(x, g)
            if self.attention is None:
                y = self.block(xg, cache, pos0)
            else:               # MLA: the device attention in place of the block's host one
                y = xg + self.attention(xg, cache, pos0)
                y = y + self.block.ffn(y)
            self.launches += g.launches - before
            if self.host_out:
                y = np.asarray(y)
        self.seconds += perf_counter() - t0
        self.calls += 1
        self.tokens += x.shape[0]
        return y


class Offload:
    """What `apply` did: the plan, the GPUs with their actual bytes, each offloaded layer.
    `reason` is set (and nothing moved) when the GPU library could not be used."""

    def __init__(self, plan: OffloadPlan | None, reason: str | None = None):
        self.plan, self.reason = plan, reason
        self.gpus: dict[int, Gpu] = {}
        self.layers: list[GpuLayer | None] = []   # per block: its GpuLayer, None on the host
                                                  # (empty: not applied)
        self.head: DeviceLinear | None = None
        self.n_ctx = 0
        self.kv_dtype = None
        self.host_calls = self.host_tokens = 0    # forward passes the engine reported
        self.pass_seconds = 0.0                   # their wall time, all devices
        self.host_kv = 0                          # host KV bytes of the last adopted cache

    @property
    def applied(self) -> bool:
        return bool(self.layers)

    def adopt_cache(self, cache: list) -> list:
        """A new per-layer cache list for one session: `cache` (model.new_cache) with each
        offloaded layer's entry replaced by a fresh DeviceKVCache on its GPU (the host arrays of
        those layers are left unused). Every call makes new device caches."""
        if not self.applied:
            return list(cache)
        out = []
        for layer, c in zip(self.layers, cache):
            if layer is None:
                out.append(c)
                continue
            with layer.gpu.active():
                out.append(layer.new_cache(self.n_ctx, self.kv_dtype))
        self.host_kv = sum(int(c.nbytes) for layer, c in zip(self.layers, out) if layer is None)
        for g in self.gpus.values():
            with g.active():
                g.mark_end()             # the driver's view now includes the KV caches
        return out

    def gpu_layers(self) -> list[int]:
        """Indices of the blocks that run on a GPU."""
        return [i for i, layer in enumerate(self.layers) if layer is not None]

    def host_pass(self, n_tokens: int, seconds: float = 0.0) -> None:
        """The engine ran one forward pass of n_tokens in `seconds` (wall time): every layer on
        the host ran once."""
        self.host_calls += 1
        self.host_tokens += n_tokens
        self.pass_seconds += seconds

    def host_experts(self) -> list[tuple[int, object, str, ExpertLinear]]:
        """(layer, block, attr, tensor) of the routed expert tensors that GPU blocks keep on the
        host (what NUMA placement shards like a CPU block's)."""
        return [(layer.index, layer.block, spec.attr, getattr(layer.block, spec.attr))
                for layer in self.layers if layer is not None for spec in type(layer.block).TENSORS
                if isinstance(getattr(layer.block, spec.attr), ExpertLinear)]

    def experts(self) -> list:
        """Every routed expert tensor of the GPU blocks, on the GPU or kept on the host."""
        return [getattr(layer.block, spec.attr) for layer in self.layers if layer is not None
                for spec in type(layer.block).TENSORS if spec.kind == "experts"
                and getattr(layer.block, spec.attr) is not None]

    # -- bytes --
    def actual(self) -> dict[int, dict[str, int]]:
        """Per GPU: bytes allocated (and live) by kind, and total."""
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
        """Weights and KV cache the host really holds: the declared tensors of the blocks left
        on the CPU, token_embd, the output norm (and head, unless offloaded), host KV caches."""
        seen, total = set(), 0

        def count(obj) -> None:
            nonlocal total
            if obj is not None and id(obj) not in seen:
                seen.add(id(obj))
                total += int(obj.nbytes)

        for layer, b in zip(self.layers, model.blk):
            block = b if layer is None else layer.block
            for spec in type(block).TENSORS:
                v = getattr(block, spec.attr)
                if layer is None or not _on_device(v):
                    count(v)
            for v in vars(block).values():     # MLA's absorbed products, held per head
                if isinstance(v, HeadLinear):
                    count(v)
        count(model.token_embd)
        count(model.output_norm)
        if not isinstance(model.output, DeviceLinear):
            count(model.output)
        return total + self.host_kv

    def block_matrix_bytes(self) -> int:
        """Bytes of the weight matrices and expert tensors of the blocks on GPUs, on the GPU or
        kept on the host (Transformer.linears() and experts() do not see them)."""
        return sum(getattr(layer.block, spec.attr).nbytes for layer in self.layers if layer is not None
                   for spec in type(layer.block).TENSORS
                   if isinstance(getattr(layer.block, spec.attr),
                                 (DeviceLinear, DeviceExperts, ExpertLinear))) + \
            sum(layer.attention.nbytes for layer in self.layers
                if layer is not None and layer.attention is not None)

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

    # -- where layers ran --
    def where(self) -> list[tuple[str, str, int]]:
        """(unit, executor, calls) per layer and the head, as observed while running."""
        out = [(f"blk.{i}", "CPU", self.host_calls) if layer is None else
               (f"blk.{i}", f"GPU {layer.gpu.index}", layer.calls) for i, layer in enumerate(self.layers)]
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

    def times(self) -> dict[str, float]:
        """Measured wall seconds over every pass: "CPU" (the host's blocks, embedding, output
        norm and the routed experts it ran for GPU blocks), "GPU i" (its blocks and head, less
        the time they waited for the CPU's experts), "experts" (the CPU's part of that) and
        "overlap" (expert seconds the GPU side did not wait for)."""
        from . import hybrid

        gpu = dict.fromkeys(self.gpus, 0.0)
        for layer in self.layers:
            if layer is not None:
                gpu[layer.gpu.index] += layer.seconds
        if self.head is not None:
            gpu[self.head.gpu.index] += self.head.seconds
        in_gpu = sum(gpu.values())
        experts = waited = 0.0
        for i, g in self.gpus.items():
            st = hybrid.stats(g)
            if st is not None:
                experts, waited = experts + st.cpu_s, waited + st.wait_s
                gpu[i] -= st.wait_s
        return {"CPU": max(self.pass_seconds - in_gpu, 0.0) + experts,
                **{f"GPU {i}": max(t, 0.0) for i, t in gpu.items()},
                "experts": experts, "overlap": max(experts - waited, 0.0)}

    def time_line(self) -> str:
        """The measured split: time per device per forward pass."""
        from .plan import processor_split

        t, n = self.times(), max(self.host_calls, 1)
        gpus = [k for k in t if k.startswith("GPU ")]
        split = processor_split(int(1e9 * t["CPU"]), int(1e9 * sum(t[k] for k in gpus)))
        per = ", ".join(f"{k} {1e3 * t[k] / n:.2f} ms" for k in ["CPU", *gpus])
        exp = (f"; routed experts on the CPU {1e3 * t['experts'] / n:.2f} ms, "
               f"{1e3 * t['overlap'] / n:.2f} ms of it beside GPU work" if t["experts"] else "")
        return f"time {split} ({per} per pass, measured{exp})"

    def summary(self, model) -> str:
        """Lines for chat /stats and the CLI: PROCESSOR (bytes where they are and measured time
        per device), where layers ran, predicted vs actual bytes."""
        if not self.applied:
            return f"PROCESSOR  100% CPU ({self.reason or 'no GPU offload requested'})"
        lines = [f"PROCESSOR  {self.processor(model)} (bytes); {self.time_line()}",
                 f"layers: {self.where_line()}"]
        for row in self.compare():
            g = self.gpus[row["gpu"]]
            p, a = row["predicted"], row["actual"]
            drv = f", driver saw {row['driver'] / 2**20:.1f} MiB" if row["driver"] is not None else ""
            lines.append(f"GPU {g.index} ({g.info.name}): {a['total'] / 2**20:.1f} MiB allocated "
                         f"(weights {a['weights'] / 2**20:.1f}, KV {a['kv'] / 2**20:.1f}, buffers "
                         f"{a['buffers'] / 2**20:.1f}) vs {p['total'] / 2**20:.1f} MiB planned "
                         f"({100 * row['diff']:+.1f}%){drv}, {g.launches} kernel launches")
        return "\n".join(lines)

    def announcement(self) -> str:
        """The one line a load that asked for GPUs shows (the CLI prints it): why everything
        runs on the CPU, or where the layers went and the bytes of the load (weights and
        buffers) allocated vs planned, and the KV cache each session will add."""
        if not self.applied:
            if self.plan is not None and self.plan.no_gpu:
                return f"no GPU ({self.plan.no_gpu}): running every layer on the CPU"
            return f"GPU offload off ({self.reason}): running every layer on the CPU"
        runs: dict[int, list] = {}
        for layer in self.layers:
            if layer is not None:
                runs.setdefault(layer.gpu.index, []).append(layer.index)
        if self.head is not None:
            runs.setdefault(self.head.gpu.index, []).append("output")
        parts = []
        for i, g in sorted(self.gpus.items()):
            use = self.plan.devices[i]
            units = runs.get(i, [])
            blks = [u for u in units if u != "output"]
            what = " + ".join(x for x in (f"blk.{_ranges(blks)}" if blks else "",
                                          "output" if "output" in units else "") if x)
            kv = f", + KV {use.kv / 2**20:.1f} MiB per session" if use.kv else ""
            kept = [lp.index for lp in self.plan.layers if lp.device == i and lp.host_tensors]
            if kept:
                what += f" (routed experts of blk.{_ranges(kept)} on the CPU)"
            parts.append(f"{what} on GPU {i} ({(g.bytes['weights'] + g.bytes['buffers']) / 2**20:.1f} MiB "
                         f"allocated, {(use.weights + use.buffers) / 2**20:.1f} MiB planned{kv})")
        return f"GPU offload: {'; '.join(parts)}"


def _on_device(v) -> bool:
    return isinstance(v, (DeviceLinear, DeviceExperts, DeviceTensor))


def _device_tensors(block, gpu: Gpu, keep: frozenset[str]) -> dict[str, object]:
    """attr -> device version of each tensor `block` declares (type(block).TENSORS) but those
    the plan keeps on the host (`keep`: GGUF names under the block): matrices as DeviceLinear,
    routed experts as DeviceExperts, vectors as DeviceTensor; absent optional ones stay None."""
    from .cuda_kernels import SUPPORTED

    out = {}
    for spec in type(block).TENSORS:
        value = getattr(block, spec.attr)
        if value is None:
            out[spec.attr] = None
        elif spec.name in keep:
            continue
        elif spec.kind in ("matrix", "experts"):
            if value.qtype not in SUPPORTED:
                raise OffloadFailed(f"{value.name} is {value.qtype.name}, which the GPU kernels do not "
                                    f"compute")
            out[spec.attr] = (DeviceLinear if spec.kind == "matrix" else DeviceExperts)(value, gpu)
        else:
            out[spec.attr] = vector(gpu, value)
    return out


def apply(model, plan: OffloadPlan, n_ctx: int, launch=None, gguf=None) -> Offload:
    """Move the declared tensors of the blocks (and the head) `plan` puts on GPUs there. Raises
    OffloadFailed, with the model untouched, when the GPU library cannot: nothing is swapped in
    until every copy is made. gguf: the model's file (MLA blocks read their absorbed matrices'
    stored bytes from it, numallm.gpu.mla)."""
    from .cuda_kernels import launch_config

    cuda = _cuda()
    launch = launch or launch_config()
    off = Offload(plan)
    off.n_ctx, off.kv_dtype = n_ctx, DTYPES[plan.request.kv_dtype]
    moved: dict[int, dict[str, object]] = {}
    attention: dict[int, DeviceMLA] = {}
    try:
        for i, use in plan.devices.items():
            g = off.gpus[i] = Gpu(cuda, use.device, launch, _ordinal(cuda, use.device))
            with g.active():
                g.mark_start()
                bufs = device_buffers(model.args, n_ctx, plan.n_batch, output=plan.output.device == i,
                                      experts=use.experts)
                for name, (shape, dtype) in bufs.items():
                    if len(shape) == 3:               # (count, rows, width) activation slots
                        g.slots.reserve(*shape)
                g.rope_table(model.rope)
        for lp, blk in zip(plan.layers, model.blk):
            if lp.device is not None:
                g = off.gpus[lp.device]
                keep = frozenset(n.split(".", 2)[2] for n in lp.host_tensors)
                with g.active():
                    moved[lp.index] = _device_tensors(blk, g, keep)
                    if is_mla(type(blk)):
                        if gguf is None:
                            raise OffloadFailed(f"blk.{lp.index}: an MLA block needs the model file "
                                                f"for its absorbed matrices")
                        attention[lp.index] = DeviceMLA(blk, lp.index, g, gguf)
        head = None
        if plan.output.device is not None:
            g = off.gpus[plan.output.device]
            with g.active():
                head = DeviceLinear(model.output, g, host_out=True)
    except OffloadFailed:
        raise
    except Exception as e:  # noqa: BLE001 - any CUDA failure (out of memory, driver) means: CPU
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise OffloadFailed(f"the GPU copy failed ({type(e).__name__}: {msg})") from e
    for lp in plan.layers:
        if lp.index not in moved:
            off.layers.append(None)
            continue
        blk = model.blk[lp.index]
        for attr, value in moved[lp.index].items():
            setattr(blk, attr, value)
        mla = attention.get(lp.index)
        if mla is not None:
            for k, v in list(vars(blk).items()):
                if isinstance(v, HeadLinear):   # the CPU's copies of what the GPU now holds
                    setattr(blk, k, None)
        nxt = plan.layers[lp.index + 1].device if lp.index + 1 < len(plan.layers) else None
        off.layers.append(GpuLayer(lp.index, blk, off.gpus[lp.device], host_out=nxt is None,
                                   attention=mla))
        model.blk[lp.index] = off.layers[-1]
    if head is not None:
        model.output = off.head = head
    return off


def apply_plan(model, plan: OffloadPlan, n_ctx: int, gguf=None) -> Offload:
    """Apply the GPU part of a placement plan (numallm.placement.make_plan: the plan `numallm
    plan` shows). Never raises for a GPU problem: the Offload's `reason` then says why all runs
    on the CPU."""
    if not plan.devices:
        if plan.no_gpu:
            why = plan.no_gpu
        elif plan.skipped:
            why = "; ".join(f"GPU {i}: {r}" for i, r in plan.skipped)
        else:
            why = plan.notes[-1] if plan.notes else "the plan puts no layer on a GPU"
        return Offload(plan, why)
    try:
        return apply(model, plan, n_ctx, gguf=gguf)
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
