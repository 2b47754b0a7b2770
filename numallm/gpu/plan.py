"""The offload plan: which transformer blocks go to which GPU, and the bytes every device and host
node then holds. Pure arithmetic over a GGUF's tensor sizes and a GPU inventory given as data.

    plan = make_plan(GGUFFile(path), n_ctx=8192, request=OffloadRequest(gpu_layers="auto"),
                     devices=discover_gpus()[0])
    plan.layers[i].device        # None = CPU, else a GPU index
    plan.devices[g].total        # weights + KV + buffers on GPU g (bytes)

Offload unit: one block (blk.N.*: its attention with its KV cache, and its FFN). The routed
experts of a MoE block may stay on the CPU while the rest of it runs on a GPU (--cpu-moe,
--n-cpu-moe N, -ot REGEX=CPU, and -ngl auto when the whole model does not fit): LayerPlan.tensors
is then what the GPU holds and LayerPlan.host_tensors what stays. The output
head (output.weight, or token_embd when the embeddings are tied) is one more unit, offloaded
only with "all", -ngl > n_layer, or an --offload pattern naming it; token_embd (a row lookup per
token) always stays on the host.

Byte formulas, shared by this planner and the loader (one source of truth):
  weights of a unit = its GGUF tensors' bytes as stored (the GPU keeps them quantized);
  layer_kv_bytes    = 2 (K and V) * n_ctx * n_head_kv * head_dim * bytes per KV element;
  device_buffers    = the scratch arrays each device holds once, whatever its layer count.

Policy (docs/gpu.md): devices are filtered (--gpus, --exclude-gpus, compute capability, reserve,
slower than the CPU), then filled fastest first, each with whole blocks while
weights + KV + buffers <= free memory - reserve. Blocks are taken from the end of the model, so the
GPU part is one contiguous run after the CPU part (one hand-over each way per token).
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

from ..cache_types import DEFAULT_CACHE_TYPE
from ..gguf_file import GGMLQuantizationType as QT

from .inventory import MIN_COMPUTE_CAPABILITY, GpuDevice, GpuError
from .policy import _size, assign, select
from .sizes import (DEFAULT_N_BATCH, KV_ELEM_BYTES, MIB, declared_kinds, device_buffer_bytes,
                    layer_kv_bytes, model_args)
from .traffic import pcie_per_token

DEFAULT_RESERVE = 512 * MIB     # left free on every GPU: the CUDA context and other processes
SCHEMA = "numallm.gpuplan/1"
DEVICES = re.compile(r"CPU|CUDA\d+")      # -ot REGEX=DEVICE: llama.cpp's buffer type names

# GGML types the GPU kernels compute; a block with any other type stays on the CPU (with a note).
# gpuexec edits this one constant as kernels land.
GPU_TYPES = frozenset({QT.F32, QT.F16, QT.Q4_0, QT.Q8_0, QT.Q4_K, QT.Q6_K})

_BLOCK = re.compile(r"blk\.(\d+)\.")


@dataclass(frozen=True)
class OffloadRequest:
    """What the user asked for (the CLI flags map 1:1). The default is CPU only."""

    gpu_layers: int | str | None = None        # N | "auto" | "all" | None (none)
    offload: tuple[str, ...] = ()              # regexes searched in GGUF tensor names
    gpus: tuple[int, ...] | None = None        # only these GPUs (None: all)
    exclude_gpus: tuple[int, ...] = ()
    reserve_bytes: int = DEFAULT_RESERVE       # left free on each GPU
    min_compute_capability: tuple[int, int] = MIN_COMPUTE_CAPABILITY
    kv_dtype: str = "f16"                      # KV cache element type on the GPU
    tensor_overrides: tuple[tuple[str, str], ...] = ()   # -ot (REGEX, "CPU" | "CUDA<n>"), in order
    cpu_moe: bool = False                      # --cpu-moe: every block's routed experts on the CPU
    n_cpu_moe: int = 0                         # --n-cpu-moe N: those of blk.0..N-1 on the CPU

    def __post_init__(self):
        g = self.gpu_layers
        if isinstance(g, bool) or not (g is None or g in ("auto", "all")
                                       or (isinstance(g, int) and g >= 0)):
            raise GpuError(f"--gpu-layers {g!r}: give a number of layers (0 or more), auto or all")
        if g is not None and g != 0 and self.offload:
            raise GpuError("--gpu-layers and --offload both choose layers; give one of them")
        for p in self.offload:
            try:
                re.compile(p)
            except re.error as e:
                raise GpuError(f"--offload {p!r} is not a regular expression ({e})") from None
        if self.kv_dtype not in KV_ELEM_BYTES:
            raise GpuError(f"GPU KV type {self.kv_dtype!r}: choose one of {', '.join(KV_ELEM_BYTES)}")
        for p, dev in self.tensor_overrides:
            try:
                re.compile(p)
            except re.error as e:
                raise GpuError(f"-ot {p}={dev}: {p!r} is not a regular expression ({e})") from None
            if not DEVICES.fullmatch(dev):
                raise GpuError(f"-ot {p}={dev}: the device is CPU or CUDA0, CUDA1, ... (llama.cpp's names)")
        if isinstance(self.n_cpu_moe, bool) or not isinstance(self.n_cpu_moe, int) or self.n_cpu_moe < 0:
            raise GpuError(f"--n-cpu-moe {self.n_cpu_moe!r}: give a number of layers (0 or more)")
        if self.reserve_bytes < 0:
            raise GpuError(f"--gpu-reserve {self.reserve_bytes}: give a size of 0 or more")

    @property
    def wants_gpu(self) -> bool:
        return (bool(self.offload) or self.gpu_layers not in (None, 0)
                or any(dev != "CPU" for _, dev in self.tensor_overrides))

    def to_dict(self) -> dict:
        return {"gpu_layers": self.gpu_layers, "offload": list(self.offload),
                "gpus": None if self.gpus is None else list(self.gpus),
                "exclude_gpus": list(self.exclude_gpus), "reserve_bytes": self.reserve_bytes,
                "min_compute_capability": "%d.%d" % self.min_compute_capability,
                "kv_dtype": self.kv_dtype,
                "tensor_overrides": [f"{p}={d}" for p, d in self.tensor_overrides],
                "cpu_moe": self.cpu_moe, "n_cpu_moe": self.n_cpu_moe}


@dataclass(frozen=True)
class LayerPlan:
    index: int                     # block number; n_layer for the output head
    device: int | None             # GPU index, None = CPU
    tensors: tuple[str, ...]       # GGUF names of the unit's tensors where it runs (`device`)
    weight_bytes: int              # their bytes as stored in the GGUF
    kv_bytes: int                  # its KV cache where it runs (GPU kv_dtype, or the CPU's cache types)
    host_tensors: tuple[str, ...] = ()   # a GPU block's tensors kept on the CPU (routed experts)
    host_bytes: int = 0

    @property
    def name(self) -> str:
        return "output" if not self.tensors[0].startswith("blk.") else f"blk.{self.index}"


@dataclass(frozen=True)
class DeviceUse:
    device: GpuDevice
    weights: int
    kv: int
    buffers: int
    reserve: int
    layers: tuple[int, ...] = ()   # block indices it runs (n_layer = the output head)
    experts: bool = False          # it runs routed experts (its buffers include theirs)

    @property
    def total(self) -> int:
        return self.weights + self.kv + self.buffers

    @property
    def usable(self) -> int:
        """What the policy lets the plan use on this device: free memory - reserve."""
        return self.device.mem_free - self.reserve


@dataclass
class OffloadPlan:
    layers: list[LayerPlan]                       # one per block, in order
    output: LayerPlan                             # the output head
    devices: dict[int, DeviceUse]                 # GPUs that hold something
    host_bytes: int                               # weights + KV cache left on the host
    skipped: list[tuple[int, str]]                # (GPU index, why it gets nothing)
    notes: list[str]                              # one-line reasons for the decisions
    n_ctx: int = 0
    n_batch: int = DEFAULT_N_BATCH
    request: OffloadRequest = field(default_factory=OffloadRequest)
    model: str = ""
    host_weights: int = 0
    host_kv: int = 0
    no_gpu: str | None = None                     # why no GPU could be used at all, if so
    pcie: object = None                           # traffic.Traffic: what crosses PCIe per token

    def device_of(self, tensor: str) -> int | None:
        """The GPU that holds `tensor` (GGUF name), None for the host."""
        for u in (*self.layers, self.output):
            if tensor in u.tensors:
                return u.device
        return None

    @property
    def gpu_bytes(self) -> int:
        """Weights and KV cache on GPUs (buffers are scratch, not model bytes)."""
        return sum(d.weights + d.kv for d in self.devices.values())

    def gpu_share(self) -> float:
        """Fraction of the model's bytes (weights + KV cache) that sit on GPUs."""
        total = self.gpu_bytes + self.host_bytes
        return self.gpu_bytes / total if total else 0.0

    def processor(self) -> str:
        """ollama's PROCESSOR wording: "100% CPU", "70%/30% CPU/GPU", "100% GPU"."""
        return processor_split(self.host_bytes, self.gpu_bytes)

    def to_json(self) -> dict:
        def unit(u: LayerPlan) -> dict:
            return {"index": u.index, "name": u.name, "device": u.device, "weight_bytes": u.weight_bytes,
                    "kv_bytes": u.kv_bytes, "tensors": list(u.tensors),
                    "host_tensors": list(u.host_tensors), "host_bytes": u.host_bytes}

        return {
            "schema": SCHEMA, "model": self.model, "n_ctx": self.n_ctx, "n_batch": self.n_batch,
            "request": self.request.to_dict(),
            "devices": [{**d.device.to_dict(), "reserve": d.reserve, "usable": d.usable,
                         "weights": d.weights, "kv": d.kv, "buffers": d.buffers, "total": d.total,
                         "layers": list(d.layers), "experts": d.experts}
                        for _, d in sorted(self.devices.items())],
            "layers": [unit(u) for u in self.layers], "output": unit(self.output),
            "host": {"weights": self.host_weights, "kv": self.host_kv, "total": self.host_bytes},
            "skipped": [{"index": i, "reason": why} for i, why in self.skipped],
            "notes": list(self.notes), "no_gpu": self.no_gpu,
            "gpu_share": round(self.gpu_share(), 4), "processor": self.processor(),
            "pcie_per_token": None if self.pcie is None else self.pcie.to_dict(),
        }


def processor_split(cpu_bytes: int, gpu_bytes: int) -> str:
    total = cpu_bytes + gpu_bytes
    gpu = round(100 * gpu_bytes / total) if total else 0
    if gpu == 0:
        return "100% CPU"
    if gpu == 100:
        return "100% GPU"
    return f"{100 - gpu}%/{gpu}% CPU/GPU"



# -- units -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Unit:
    index: int
    tensors: tuple[str, ...]       # what goes to the GPU with the unit
    weight_bytes: int
    unsupported: tuple[str, ...]   # "name (TYPE)" of tensors the GPU kernels cannot compute
    host: tuple[str, ...] = ()     # tensors of the block kept on the CPU when it is on a GPU
    host_bytes: int = 0
    experts: bool = False          # it takes routed expert tensors to the GPU


def _units(gguf, n_layer: int, experts: frozenset[str], keep: frozenset[str]
           ) -> tuple[list[_Unit], list[_Unit], _Unit]:
    """(whole blocks less `keep`, the same blocks less their routed experts too, the head)."""
    per_block: list[list[str]] = [[] for _ in range(n_layer)]
    for name in gguf.tensors:
        m = _BLOCK.match(name)
        if m and int(m.group(1)) < n_layer:
            per_block[int(m.group(1))].append(name)
    # output_norm stays a host vector: the model applies it before calling the head
    head = ["output.weight" if "output.weight" in gguf.tensors else "token_embd.weight"]

    def unit(i: int, names: list[str], host: frozenset[str]) -> _Unit:
        on = [gguf.tensors[n] for n in names if n not in host]
        off = tuple(n for n in names if n in host)
        bad = tuple(f"{t.name} ({t.qtype.name})" for t in on if t.qtype not in GPU_TYPES)
        return _Unit(i, tuple(t.name for t in on), sum(t.nbytes for t in on), bad, off,
                     sum(gguf.tensors[n].nbytes for n in off), any(t.name in experts for t in on))

    whole = [unit(i, names, keep) for i, names in enumerate(per_block)]
    dense = [unit(i, names, keep | experts) for i, names in enumerate(per_block)]
    return whole, dense, unit(n_layer, head, frozenset())


def _kept_on_host(gguf, request: OffloadRequest, experts: frozenset[str], notes: list[str]) -> frozenset[str]:
    """Tensors that stay on the CPU even in a block on a GPU: routed experts under --cpu-moe /
    --n-cpu-moe N, and what -ot REGEX=CPU names (the first pattern that matches a tensor decides,
    as llama.cpp's). The three expert tensors of a block move as a set (one expert product runs
    where its gate, up and down are)."""
    keep, by_ot, ignored = set(), set(), set()
    for name in gguf.tensors:
        hit = next((dev for pat, dev in request.tensor_overrides if re.search(pat, name)), None)
        m = _BLOCK.match(name)
        if hit == "CPU":
            if name in experts:
                by_ot.add(name)
            elif m:
                ignored.add(name)
        if name in experts and (request.cpu_moe or int(m.group(1)) < request.n_cpu_moe):
            keep.add(name)
    sets = {}
    for name in experts:
        sets.setdefault(_BLOCK.match(name).group(1), set()).add(name)
    whole = {n for layer in sets.values() if layer & by_ot for n in layer}
    if whole - by_ot:
        notes.append("-ot: a block's routed expert tensors stay together (gate, up and down of an "
                     "expert run on one device): the pattern's blocks keep all three on the CPU")
    if by_ot:
        notes.append(f"-ot: the routed experts of {len({_BLOCK.match(n).group(1) for n in by_ot})} "
                     f"block(s) stay on the CPU")
    if ignored:
        sample = sorted(ignored)[:2]
        notes.append(f"-ot ...=CPU matched {len(ignored)} tensor(s) that are not routed experts "
                     f"({', '.join(sample)}{', ...' if len(ignored) > 2 else ''}): they follow their "
                     f"block (only routed experts can stay on the CPU inside a GPU block)")
    if request.cpu_moe and experts:
        notes.append("--cpu-moe: the routed experts of every block stay on the CPU")
    elif request.n_cpu_moe and experts:
        n = min(request.n_cpu_moe, len(sets))
        notes.append(f"--n-cpu-moe {request.n_cpu_moe}: the routed experts of blk.0-{n - 1} stay on the CPU")
    # experts of a type the GPU kernels do not compute stay on the CPU (the rest of the block
    # can still go): the hybrid path runs them with the CPU kernels
    bad = {b for b, layer in sets.items() if any(gguf.tensors[n].qtype not in GPU_TYPES for n in layer)}
    if bad:
        types = sorted({gguf.tensors[n].qtype.name for b in bad for n in sets[b]
                        if gguf.tensors[n].qtype not in GPU_TYPES})
        notes.append(f"the routed experts of {len(bad)} block(s) stay on the CPU: {', '.join(types)} is "
                     f"not a GPU type (the rest of those blocks can go to a GPU)")
        whole |= {n for b in bad for n in sets[b]}
    if (request.cpu_moe or request.n_cpu_moe or by_ot) and not experts:
        notes.append("this model has no routed experts: --cpu-moe / --n-cpu-moe / -ot ...=CPU change nothing")
    return frozenset(keep | whole)


def _gpu_pin(request: OffloadRequest, gguf) -> tuple[set[str], int | None]:
    """Tensors -ot REGEX=CUDAn sends to a GPU (their blocks are offloaded) and that GPU."""
    hits, devs = set(), set()
    for name in gguf.tensors:
        dev = next((d for pat, d in request.tensor_overrides if re.search(pat, name)), None)
        if dev is not None and dev != "CPU":
            hits.add(name)
            devs.add(int(dev[4:]))
    if len(devs) > 1:
        raise GpuError(f"-ot: blocks for more than one GPU ({', '.join(f'CUDA{d}' for d in sorted(devs))}) "
                       f"are not supported yet; name one GPU per run (or use -ngl with --gpus)")
    return hits, (devs.pop() if devs else None)


def make_plan(gguf, n_ctx: int, request: OffloadRequest, devices: list[GpuDevice],
              n_batch: int = DEFAULT_N_BATCH, *,
              host_bandwidth: tuple[float, str] | None = None,
              no_gpu: str | None = None,
              host_kv: tuple[str, str] = (DEFAULT_CACHE_TYPE, DEFAULT_CACHE_TYPE)) -> OffloadPlan:
    """Plan `request` for the model in `gguf` (a numallm.gguf_file.GGUFFile) with an n_ctx-token
    context over `devices`: the GPU step of numallm.placement.make_plan, which splits the host's
    part over the NUMA nodes and checks it fits. host_bandwidth: (GB/s, "assumed"/"measured") of the
    CPU side; a GPU slower than that is skipped unless named in --gpus. no_gpu: why `devices` is empty.
    host_kv: the KV cache types (K, V) of the layers left on the CPU."""
    if n_ctx < 1:
        raise GpuError(f"context size {n_ctx}: give a positive number of tokens")
    if n_batch < 1:
        raise GpuError(f"batch size {n_batch}: give a positive number of tokens")
    args = model_args(gguf)
    notes: list[str] = []
    kinds = declared_kinds(gguf.architecture, args)
    experts = frozenset(n for n, k in kinds.items() if k == "experts" and n in gguf.tensors)
    keep = _kept_on_host(gguf, request, experts, notes)
    pinned, pin_dev = _gpu_pin(request, gguf)
    whole, dense, head = _units(gguf, args.n_layer, experts, keep)
    kv_gpu = layer_kv_bytes(args, n_ctx, request.kv_dtype)
    kv_cpu = layer_kv_bytes(args, n_ctx, *host_kv)
    if pin_dev is not None and request.gpus is None:
        request_sel = dataclasses.replace(request, gpus=(pin_dev,))
    else:
        request_sel = request
    order, skipped = select(list(devices), request_sel, host_bandwidth)

    # what the request wants offloaded: blocks (last first) and whether the head is wanted
    g = request.gpu_layers
    auto_moe = g == "auto" and bool(experts)        # dense parts first, then experts while they fit
    blocks = dense if auto_moe else whole
    all_blocks = list(reversed(blocks))
    want_head, fill_all = False, False
    patterns = request.offload
    if patterns or (pinned and g in (None, 0)):
        hits = {n for n in gguf.tensors if any(re.search(p, n) for p in patterns)} | pinned
        queue = [u for u in all_blocks if hits.intersection(u.tensors)]
        want_head = bool(hits.intersection(head.tensors))
        partial = [u for u in queue if not hits.issuperset(u.tensors)]
        flag = "--offload" if patterns else "-ot"
        if partial:
            notes.append(f"{flag} matched only some tensors of {len(partial)} block(s) "
                         f"({', '.join(f'blk.{u.index}' for u in sorted(partial, key=lambda u: u.index)[:4])}"
                         f"{', ...' if len(partial) > 4 else ''}): whole blocks are offloaded")
        if "token_embd.weight" in hits and "token_embd.weight" not in head.tensors:
            notes.append("token_embd stays on the CPU (a row lookup per token; GPU memory is better "
                         "spent on blocks)")
        if not hits:
            notes.append(f"{flag} {' '.join(patterns) or 'patterns'} matches no tensor of this model")
    elif g in (None, 0):
        queue = []
    elif g == "auto":
        queue, want_head, fill_all = all_blocks, True, True
    elif g == "all" or g > args.n_layer:
        queue, want_head, fill_all = all_blocks, True, True
    else:
        queue = all_blocks
    if pinned and not (patterns or g in (None, 0)):
        notes.append(f"-ot ...=CUDA{pin_dev} with --gpu-layers: --gpu-layers chooses the blocks, "
                     f"-ot the GPU (CUDA{pin_dev})")
    unsupported = [u for u in queue if u.unsupported]
    if unsupported:
        types = sorted({t.split(" (")[1][:-1] for u in unsupported for t in u.unsupported})
        notes.append(f"{len(unsupported)} block(s) stay on the CPU: they hold {', '.join(types)} "
                     f"tensors, which the GPU kernels do not compute (they do "
                     f"{', '.join(sorted(t.name for t in GPU_TYPES))})")
        queue = [u for u in queue if not u.unsupported]
    if isinstance(g, int) and 0 < g <= args.n_layer:
        queue = queue[:g]
    if want_head and head.unsupported:
        notes.append(f"the output head stays on the CPU: {', '.join(head.unsupported)} is not a GPU type")
        want_head = False

    fills, placed, head_placed, misses = {}, [], False, []
    if not request.wants_gpu:
        notes.append("no layers asked for on GPUs: everything runs on the CPU (--gpu-layers N|auto|all "
                     "or --offload REGEX)")
    if queue or want_head:
        if devices and not order:
            notes.append("no GPU is usable under the policy (see skipped): every layer runs on the CPU")
        elif not devices:   # blame the missing GPU, not the fit
            notes.append(f"{'no GPU (' + no_gpu + ')' if no_gpu else 'the GPU inventory is empty'}: "
                         f"every layer runs on the CPU")
        else:
            fit = (order, args, n_ctx, n_batch, kv_gpu, request.reserve_bytes)
            fills, placed, head_placed, misses = assign(queue, head if want_head else None, *fit)
            if want_head and fill_all and len(placed) < len(queue):
                # auto/all: the head is the lowest priority; redo without it so blocks get its room
                fills, placed, head_placed, misses = assign(queue, None, *fit)
                notes.append("the output head stays on the CPU: not every block fits on the GPUs")
            elif want_head and not head_placed:
                notes.append(f"the output head ({_size(head.weight_bytes)}) fits on no selected GPU; "
                             f"it stays on the CPU")
            if auto_moe and placed and len(placed) == len(queue):
                notes.append(_upgrade(fills, placed, whole, *fit[1:]))
    skipped += misses

    where = {u.index: d for d, f in fills.items() for u in f.units if u is not head}
    units = {u.index: u for f in fills.values() for u in f.units if u is not head}
    n_asked = len(queue)
    if n_asked and len(placed) < n_asked and order:
        nxt = queue[len(placed)]
        what = "auto" if g == "auto" else f"{n_asked} layers asked for"
        notes.append(f"{what}: {len(placed)} of {n_asked} layers fit on the GPUs; the next, blk.{nxt.index} "
                     f"({_size(nxt.weight_bytes)} + KV {_size(kv_gpu)}), fits on no selected GPU "
                     f"under the reserve; the rest run on the CPU")
    elif g == "auto" and placed:
        notes.append(f"auto: all {len(placed)} layers fit on the GPUs"
                     + (" (their dense parts at least)" if auto_moe else ""))
    used = ",".join(str(d) for d in fills)
    for d in order:
        if d.index not in fills and placed and not any(i == d.index for i, _ in skipped):
            notes.append(f"GPU {d.index} ({d.name}) is not needed: the layers fit on GPU {used}, "
                         f"which come first (fastest first, then by number)")

    layers = []
    for u in whole:
        if u.index in where:
            v = units[u.index]
            layers.append(LayerPlan(u.index, where[u.index], v.tensors, v.weight_bytes, kv_gpu,
                                    v.host, v.host_bytes))
        else:
            layers.append(LayerPlan(u.index, None, u.tensors + u.host, u.weight_bytes + u.host_bytes,
                                    kv_cpu))
    head_dev = next((d for d, f in fills.items() if head in f.units), None) if head_placed else None
    output = LayerPlan(head.index, head_dev, head.tensors, head.weight_bytes, 0)
    devs = {d: DeviceUse(f.device, f.weights, f.kv, f.buffers, request.reserve_bytes,
                         tuple(sorted(u.index for u in f.units)), any(u.experts for u in f.units))
            for d, f in sorted(fills.items())}

    # host: every tensor not on a GPU (token_embd always), and the KV cache of CPU blocks
    on_gpu = {n for u in (*layers, output) if u.device is not None for n in u.tensors}
    host_weights = sum(t.nbytes for n, t in gguf.tensors.items() if n not in on_gpu)
    if output.device is not None and "token_embd.weight" in output.tensors:
        host_weights += gguf.tensors["token_embd.weight"].nbytes   # tied: lookup copy stays too
    host_kv = sum(u.kv_bytes for u in layers if u.device is None)
    host = host_weights + host_kv
    plan = OffloadPlan(layers, output, devs, host, skipped,
                       notes, n_ctx, n_batch, request, str(getattr(gguf, "path", "")), host_weights,
                       host_kv, (no_gpu or "the GPU inventory is empty") if not devices else None)
    plan.pcie = pcie_per_token(plan, args)
    return plan


def _upgrade(fills: dict, placed: list[_Unit], whole: list[_Unit], args, n_ctx: int, n_batch: int,
             kv: int, reserve: int) -> str:
    """-ngl auto on a MoE model, once every block's dense part is on a GPU: give the blocks their
    routed experts too, from the last block back, while the device holding each block has room
    (experts of the first blocks stay on the CPU, as llama.cpp's --n-cpu-moe N). One line."""
    by_index = {u.index: u for u in whole}
    moved = []
    for u in placed:                                  # last block first
        full = by_index[u.index]
        if not full.experts or full.unsupported:
            break
        f = next(f for f in fills.values() if u in f.units)
        buf = device_buffer_bytes(args, n_ctx, n_batch, output=any(x.index == len(whole) for x in f.units),
                                  experts=True)
        if f.weights - u.weight_bytes + full.weight_bytes + f.kv + buf > f.usable:
            break
        f.units[f.units.index(u)] = full
        f.weights += full.weight_bytes - u.weight_bytes
        f.buffers = buf
        moved.append(u.index)
    if not moved:
        return ("auto (MoE): the dense parts of every block are on the GPUs; no block's routed "
                "experts fit besides, so all experts stay on the CPU")
    first = min(moved)
    if first == 0:
        return "auto (MoE): every block fits whole (routed experts included)"
    return (f"auto (MoE): dense parts (attention, KV cache, router, shared experts) of every block "
            f"first, then the routed experts of blk.{first}-{max(moved)}; the experts of blk.0-{first - 1} "
            f"stay on the CPU (as --n-cpu-moe {first})")
