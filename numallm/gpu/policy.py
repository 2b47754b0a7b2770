"""The device policy of the GPU planner: which GPUs may be used (fastest first), and the fill of
blocks onto them under each one's free memory less the reserve (docs/gpu.md, "Policy")."""
from __future__ import annotations

from dataclasses import dataclass, field

from typing import TYPE_CHECKING

from .inventory import GpuDevice, GpuError
from .sizes import GIB, MIB, device_buffer_bytes

if TYPE_CHECKING:
    from .plan import OffloadRequest, _Unit


# -- device policy -----------------------------------------------------------------------------

def _size(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / MIB:.0f} MiB"


def select(devices: list[GpuDevice], req: OffloadRequest,
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
class Fill:
    device: GpuDevice
    usable: int
    units: list[_Unit] = field(default_factory=list)
    weights: int = 0
    kv: int = 0
    buffers: int = 0

    @property
    def total(self) -> int:
        return self.weights + self.kv + self.buffers


def assign(queue: list[_Unit], head: _Unit | None, order: list[GpuDevice], args, n_ctx: int,
            n_batch: int, kv: int, reserve: int
            ) -> tuple[dict[int, Fill], list[_Unit], bool, list[tuple[int, str]]]:
    """Place the head (when given) and then `queue` (blocks, last first) on `order`, moving to the
    next device when one is full and never back, so each device holds one contiguous run.
    Returns (fills, blocks placed, head placed, (GPU index, why) for devices nothing fitted on)."""
    fills = {d.index: Fill(d, d.mem_free - reserve) for d in order}
    bufs = {(o, e): device_buffer_bytes(args, n_ctx, n_batch, output=o, experts=e)
            for o in (False, True) for e in (False, True)}
    base = bufs[False, False]

    def cost(f: Fill, u: _Unit, is_head: bool) -> tuple[int, int]:
        """(weight + kv bytes, new buffer total) if u were added to f."""
        has_head = is_head or any(x is head for x in f.units)
        has_experts = u.experts or any(x.experts for x in f.units)
        return u.weight_bytes + (0 if is_head else kv), bufs[has_head, has_experts]

    def fits(f: Fill, u: _Unit, is_head: bool) -> bool:
        add, buf = cost(f, u, is_head)
        return f.weights + f.kv + add + buf <= f.usable

    def put(f: Fill, u: _Unit, is_head: bool) -> None:
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


