"""The offload plan: which transformer blocks go to which GPU, and the bytes every device and host
node then holds. Pure arithmetic over a GGUF's tensor sizes and a GPU inventory given as data.

    plan = make_plan(GGUFFile(path), n_ctx=8192, request=OffloadRequest(gpu_layers="auto"),
                     devices=discover_gpus()[0])
    plan.layers[i].device        # None = CPU, else a GPU index
    plan.devices[g].total        # weights + KV + buffers on GPU g (bytes)

Offload unit: one whole block (blk.N.*: its attention with its KV cache, and its FFN). The output
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

import re
from dataclasses import dataclass, field

from ..cache_types import DEFAULT_CACHE_TYPE
from ..gguf_file import GGMLQuantizationType as QT

from .inventory import MIN_COMPUTE_CAPABILITY, GpuDevice, GpuError

MIB = 1 << 20
GIB = 1 << 30
DEFAULT_RESERVE = 512 * MIB     # left free on every GPU: the CUDA context and other processes
DEFAULT_N_BATCH = 512           # tokens per forward pass (engine.PREFILL_CHUNK)
KV_ELEM_BYTES = {"f16": 2, "f32": 4}
SCHEMA = "numallm.gpuplan/1"

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
        if self.reserve_bytes < 0:
            raise GpuError(f"--gpu-reserve {self.reserve_bytes}: give a size of 0 or more")

    @property
    def wants_gpu(self) -> bool:
        return bool(self.offload) or self.gpu_layers not in (None, 0)

    def to_dict(self) -> dict:
        return {"gpu_layers": self.gpu_layers, "offload": list(self.offload),
                "gpus": None if self.gpus is None else list(self.gpus),
                "exclude_gpus": list(self.exclude_gpus), "reserve_bytes": self.reserve_bytes,
                "min_compute_capability": "%d.%d" % self.min_compute_capability,
                "kv_dtype": self.kv_dtype}


@dataclass(frozen=True)
class LayerPlan:
    index: int                     # block number; n_layer for the output head
    device: int | None             # GPU index, None = CPU
    tensors: tuple[str, ...]       # GGUF names of the unit's tensors
    weight_bytes: int              # as stored in the GGUF
    kv_bytes: int                  # its KV cache where it runs (GPU kv_dtype, or the CPU's cache types)

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
                    "kv_bytes": u.kv_bytes, "tensors": list(u.tensors)}

        return {
            "schema": SCHEMA, "model": self.model, "n_ctx": self.n_ctx, "n_batch": self.n_batch,
            "request": self.request.to_dict(),
            "devices": [{**d.device.to_dict(), "reserve": d.reserve, "usable": d.usable,
                         "weights": d.weights, "kv": d.kv, "buffers": d.buffers, "total": d.total,
                         "layers": list(d.layers)} for _, d in sorted(self.devices.items())],
            "layers": [unit(u) for u in self.layers], "output": unit(self.output),
            "host": {"weights": self.host_weights, "kv": self.host_kv, "total": self.host_bytes},
            "skipped": [{"index": i, "reason": why} for i, why in self.skipped],
            "notes": list(self.notes), "no_gpu": self.no_gpu,
            "gpu_share": round(self.gpu_share(), 4), "processor": self.processor(),
        }


def processor_split(cpu_bytes: int, gpu_bytes: int) -> str:
    total = cpu_bytes + gpu_bytes
    gpu = round(100 * gpu_bytes / total) if total else 0
    if gpu == 0:
        return "100% CPU"
    if gpu == 100:
        return "100% GPU"
    return f"{100 - gpu}%/{gpu}% CPU/GPU"


# -- byte formulas (planner and loader) --------------------------------------------------------

def layer_kv_bytes(args, n_ctx: int, kv_dtype: str, type_v: str | None = None) -> int:
    """K and V of one block for n_ctx positions, keys in `kv_dtype` (a numallm.cache_types name)
    and values in type_v (None: the same): the config's one KV formula
    (models.base.BaseArgs.layer_kv_bytes)."""
    return args.layer_kv_bytes(n_ctx, kv_dtype, type_v)


# Activations a device holds at once, by row width, while a block's forward (models/base.py and
# the architectures' overrides, run by numallm.gpu.device) goes through it: every op makes a new
# tensor, freed when the forward drops it. Counted for the forward as written:
#   n_embd: the layer's input (its caller keeps it), x after attention, the normed x, an update;
#   q_dim:  q (before and after a bias or norm), then q and the attention output;
#   kv_dim: k and v, each before and after a bias or norm (qwen2, qwen3);
#   n_ff:   gate, up and silu(gate) * up.
ACTIVATIONS = {"n_embd": 4, "q_dim": 2, "kv_dim": 4, "n_ff": 3}


def device_buffers(args, n_ctx: int, n_batch: int = DEFAULT_N_BATCH,
                   output: bool = False) -> dict[str, tuple[tuple[int, ...], str]]:
    """The scratch a device allocates once, shared by its blocks, sized from the config for a
    pass of T = min(n_batch, n_ctx) tokens: width name -> ((count, T, width), dtype) activation
    slots (ACTIVATIONS), and the RoPE table. The executor (numallm.gpu.device) allocates exactly
    these, so the plan's buffer bytes are the loader's; a forward that needed more would allocate
    more and the load report would show it. Attention keeps no score matrix (online softmax over
    the cache, numallm.gpu.cuda_ops), so nothing here grows with the context; the KV cache does,
    per block. output: the device also runs the output head (its logits)."""
    t = min(n_batch, n_ctx)
    bufs = {name: ((count, t, getattr(args, name)), "f32") for name, count in ACTIVATIONS.items()}
    bufs["rope_inv_freq"] = ((args.rope_dim // 2,), "f64")   # RoPE angles in float64, as ops.Rope
    if output:
        bufs["n_vocab"] = ((1, t, args.n_vocab), "f32")
    return bufs


DTYPE_BYTES = {"f16": 2, "f32": 4, "f64": 8}


def device_buffer_bytes(args, n_ctx: int, n_batch: int = DEFAULT_N_BATCH, output: bool = False) -> int:
    """Bytes of device_buffers: the activations and scratch each device holds."""
    total = 0
    for shape, dtype in device_buffers(args, n_ctx, n_batch, output).values():
        n = DTYPE_BYTES[dtype]
        for d in shape:
            n *= d
        total += n
    return total


def model_args(gguf):
    """The model's BaseArgs (validated metadata), as the model classes read it."""
    from ..models import get_module

    return get_module(gguf.architecture).Model.Args.from_gguf(gguf)


# -- units -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Unit:
    index: int
    tensors: tuple[str, ...]
    weight_bytes: int
    unsupported: tuple[str, ...]   # "name (TYPE)" of tensors the GPU kernels cannot compute


def _units(gguf, n_layer: int) -> tuple[list[_Unit], _Unit]:
    per_block: list[list[str]] = [[] for _ in range(n_layer)]
    for name in gguf.tensors:
        m = _BLOCK.match(name)
        if m and int(m.group(1)) < n_layer:
            per_block[int(m.group(1))].append(name)
    # output_norm stays a host vector: the model applies it before calling the head
    head = ["output.weight" if "output.weight" in gguf.tensors else "token_embd.weight"]

    def unit(i: int, names: list[str]) -> _Unit:
        ts = [gguf.tensors[n] for n in names]
        bad = tuple(f"{t.name} ({t.qtype.name})" for t in ts if t.qtype not in GPU_TYPES)
        return _Unit(i, tuple(names), sum(t.nbytes for t in ts), bad)

    return [unit(i, names) for i, names in enumerate(per_block)], unit(n_layer, head)


# -- device policy -----------------------------------------------------------------------------

def _size(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / MIB:.0f} MiB"


def _select(devices: list[GpuDevice], req: OffloadRequest,
            host_gbps: tuple[float, str] | None) -> tuple[list[GpuDevice], list[tuple[int, str]]]:
    """Devices the policy allows, fastest first, and (index, why) for the others."""
    known = {d.index for d in devices}
    for flag, ids in (("--gpus", req.gpus or ()), ("--exclude-gpus", req.exclude_gpus)):
        bad = [i for i in ids if i not in known]
        if bad and devices:
            raise GpuError(f"{flag} {','.join(map(str, ids))}: no GPU {','.join(map(str, bad))} here "
                           f"(GPUs: {','.join(map(str, sorted(known)))}; see `numallm topo`)")
    mcc = req.min_compute_capability
    ok, skipped = [], []
    for d in devices:
        if req.gpus is not None and d.index not in req.gpus:
            why = f"not in --gpus {','.join(map(str, req.gpus))}"
        elif d.index in req.exclude_gpus:
            why = "excluded by --exclude-gpus"
        elif d.compute_capability < mcc:
            why = (f"compute capability {d.cc} < {mcc[0]}.{mcc[1]}, the minimum for numallm's GPU path "
                   f"(--gpu-min-cc {d.cc} to try it anyway)")
        elif d.mem_free - req.reserve_bytes <= 0:
            why = f"{_size(d.mem_free)} free, not more than the {_size(req.reserve_bytes)} reserve"
        elif (host_gbps and d.bandwidth_gbps and d.bandwidth_gbps < host_gbps[0]
              and not (req.gpus and d.index in req.gpus)):
            why = (f"{d.bandwidth_gbps:.0f} GB/s is below the CPU's {host_gbps[0]:.0f} GB/s "
                   f"({host_gbps[1]}): its layers would run slower than on the CPU (name it in "
                   f"--gpus to use it anyway)")
        else:
            ok.append(d)
            continue
        skipped.append((d.index, why))
    # fastest first; devices of unknown bandwidth after the listed ones, by index
    ok.sort(key=lambda d: (-(d.bandwidth_gbps or 0.0), d.index))
    return ok, skipped


# -- assignment ------------------------------------------------------------------------------------

@dataclass
class _Fill:
    device: GpuDevice
    usable: int
    units: list[_Unit] = field(default_factory=list)
    weights: int = 0
    kv: int = 0
    buffers: int = 0

    @property
    def total(self) -> int:
        return self.weights + self.kv + self.buffers


def _assign(queue: list[_Unit], head: _Unit | None, order: list[GpuDevice], args, n_ctx: int,
            n_batch: int, kv: int, reserve: int
            ) -> tuple[dict[int, _Fill], list[_Unit], bool, list[tuple[int, str]]]:
    """Place the head (when given) and then `queue` (blocks, last first) on `order`, moving to the
    next device when one is full and never back, so each device holds one contiguous run.
    Returns (fills, blocks placed, head placed, (GPU index, why) for devices nothing fitted on)."""
    fills = {d.index: _Fill(d, d.mem_free - reserve) for d in order}
    base = device_buffer_bytes(args, n_ctx, n_batch)
    with_head = device_buffer_bytes(args, n_ctx, n_batch, output=True)

    def cost(f: _Fill, u: _Unit, is_head: bool) -> tuple[int, int]:
        """(weight + kv bytes, new buffer total) if u were added to f."""
        has_head = is_head or any(x is head for x in f.units)
        buf = with_head if has_head else base
        return u.weight_bytes + (0 if is_head else kv), buf

    def fits(f: _Fill, u: _Unit, is_head: bool) -> bool:
        add, buf = cost(f, u, is_head)
        return f.weights + f.kv + add + buf <= f.usable

    def put(f: _Fill, u: _Unit, is_head: bool) -> None:
        add, buf = cost(f, u, is_head)
        f.units.append(u)
        f.weights += u.weight_bytes
        f.kv += 0 if is_head else kv
        f.buffers = buf

    head_placed = False
    if head is not None:
        for d in order:
            if fits(fills[d.index], head, True):
                put(fills[d.index], head, True)
                head_placed = True
                break
    placed: list[_Unit] = []
    k = 0
    # blocks go after the head's device in the order (it holds the last blocks)
    start = next((i for i, d in enumerate(order) if fills[d.index].units), 0)
    devs = order[start:] + order[:start]
    misses: list[tuple[int, str]] = []
    for u in queue:
        while k < len(devs) and not fits(fills[devs[k].index], u, False):
            f = fills[devs[k].index]
            if not f.units:
                one = u.weight_bytes + kv + base
                misses.append((f.device.index, f"not even one layer fits: {_size(one)} needed (weights "
                               f"{_size(u.weight_bytes)} + KV {_size(kv)} + buffers {_size(base)}), "
                               f"{_size(f.usable)} usable after the reserve"))
            k += 1
        if k == len(devs):
            break
        put(fills[devs[k].index], u, False)
        placed.append(u)
    return {i: f for i, f in fills.items() if f.units}, placed, head_placed, misses


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
    blocks, head = _units(gguf, args.n_layer)
    kv_gpu = layer_kv_bytes(args, n_ctx, request.kv_dtype)
    kv_cpu = layer_kv_bytes(args, n_ctx, *host_kv)
    notes: list[str] = []
    order, skipped = _select(list(devices), request, host_bandwidth)

    # what the request wants offloaded: blocks (last first) and whether the head is wanted
    g = request.gpu_layers
    all_blocks = list(reversed(blocks))
    want_head, fill_all = False, False
    if request.offload:
        hits = {n for n in gguf.tensors if any(re.search(p, n) for p in request.offload)}
        queue = [u for u in all_blocks if hits.intersection(u.tensors)]
        want_head = bool(hits.intersection(head.tensors))
        partial = [u for u in queue if not hits.issuperset(u.tensors)]
        if partial:
            notes.append(f"--offload matched only some tensors of {len(partial)} block(s) "
                         f"({', '.join(f'blk.{u.index}' for u in sorted(partial, key=lambda u: u.index)[:4])}"
                         f"{', ...' if len(partial) > 4 else ''}): whole blocks are offloaded")
        if "token_embd.weight" in hits and "token_embd.weight" not in head.tensors:
            notes.append("token_embd stays on the CPU (a row lookup per token; GPU memory is better "
                         "spent on blocks)")
        if not hits:
            notes.append(f"--offload {' '.join(request.offload)} matches no tensor of this model")
    elif g in (None, 0):
        queue = []
    elif g == "auto":
        queue, want_head, fill_all = all_blocks, True, True
    elif g == "all" or g > args.n_layer:
        queue, want_head, fill_all = all_blocks, True, True
    else:
        queue = all_blocks
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
            fills, placed, head_placed, misses = _assign(queue, head if want_head else None, order, args,
                                                         n_ctx, n_batch, kv_gpu, request.reserve_bytes)
            if want_head and fill_all and len(placed) < len(queue):
                # auto/all: the head is the lowest priority; redo without it so blocks get its room
                fills, placed, head_placed, misses = _assign(queue, None, order, args, n_ctx, n_batch,
                                                             kv_gpu, request.reserve_bytes)
                notes.append("the output head stays on the CPU: not every block fits on the GPUs")
            elif want_head and not head_placed:
                notes.append(f"the output head ({_size(head.weight_bytes)}) fits on no selected GPU; "
                             f"it stays on the CPU")
    skipped += misses

    where = {u.index: d for d, f in fills.items() for u in f.units if u is not head}
    n_asked = len(queue)
    if n_asked and len(placed) < n_asked and order:
        nxt = queue[len(placed)]
        what = "auto" if g == "auto" else f"{n_asked} layers asked for"
        notes.append(f"{what}: {len(placed)} of {n_asked} layers fit on the GPUs; the next, blk.{nxt.index} "
                     f"({_size(nxt.weight_bytes)} + KV {_size(kv_gpu)}), fits on no selected GPU "
                     f"under the reserve; the rest run on the CPU")
    elif g == "auto" and placed:
        notes.append(f"auto: all {len(placed)} layers fit on the GPUs")
    used = ",".join(str(d) for d in fills)
    for d in order:
        if d.index not in fills and placed and not any(i == d.index for i, _ in skipped):
            notes.append(f"GPU {d.index} ({d.name}) is not needed: the layers fit on GPU {used}, "
                         f"which come first (fastest first, then by number)")

    layers = [LayerPlan(u.index, where.get(u.index), u.tensors, u.weight_bytes,
                        kv_gpu if u.index in where else kv_cpu) for u in blocks]
    head_dev = next((d for d, f in fills.items() if head in f.units), None) if head_placed else None
    output = LayerPlan(head.index, head_dev, head.tensors, head.weight_bytes, 0)
    devs = {d: DeviceUse(f.device, f.weights, f.kv, f.buffers, request.reserve_bytes,
                         tuple(sorted(u.index for u in f.units))) for d, f in sorted(fills.items())}

    # host: every tensor not on a GPU (token_embd always), and the KV cache of CPU blocks
    on_gpu = {n for u in (*layers, output) if u.device is not None for n in u.tensors}
    host_weights = sum(t.nbytes for n, t in gguf.tensors.items() if n not in on_gpu)
    if output.device is not None and "token_embd.weight" in output.tensors:
        host_weights += gguf.tensors["token_embd.weight"].nbytes   # tied: lookup copy stays too
    host_kv = sum(u.kv_bytes for u in layers if u.device is None)
    host = host_weights + host_kv
    return OffloadPlan(layers, output, devs, host, skipped,
                       notes, n_ctx, n_batch, request, str(getattr(gguf, "path", "")), host_weights,
                       host_kv, (no_gpu or "the GPU inventory is empty") if not devices else None)
