"""GPU inventory for offload: what each NVIDIA GPU is, how much memory it has free, how fast it is.

    devices, why_none = discover_gpus()      # ([GpuDevice, ...], None) or ([], "one-line reason")

Sources, in order: NUMALLM_FAKE_GPUS=/path/inventory.json (a list of GpuDevice fields: how tests,
simulator runs and `numallm plan` demos give an inventory as data), else NVML (nvidia-ml-py, the
`gpu` extra). Never raises for a machine without GPUs: the reason comes back as one line. A broken
fake inventory file is a user error and raises GpuError.

Light on purpose (no numpy, no Numba): `numallm topo` imports it. GPU numbers are NVML's (PCI bus
order, as nvidia-smi numbers them); executors address a device by `pci_bus_id`, so
CUDA_DEVICE_ORDER does not matter.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, fields, replace

from ..errors import NumallmError

FAKE_ENV = "NUMALLM_FAKE_GPUS"

# The oldest GPUs offload uses by default: Pascal (6.0) and newer. The kernels themselves
# (numallm.gpu.cuda_kernels/cuda_ops: byte-level decoding, float32 math, float16 only as stored
# KV/F16 weights) compile for every target of the CUDA 12 toolkit that numba-cuda[cu12] brings,
# i.e. 5.0 and up; but CUDA 12 deprecates Maxwell (5.x: Tesla M10/M40/M60, GTX 9xx), nothing here
# is tested on it, and those cards stream 80-340 GB/s, so a default run leaves them out and says
# so. --gpu-min-cc 5.0 lets them in.
MIN_COMPUTE_CAPABILITY = (6, 0)


class GpuError(NumallmError):
    """A GPU inventory or GPU option the user gave is unusable."""


@dataclass(frozen=True)
class GpuDevice:
    index: int                              # NVML index (nvidia-smi's number)
    name: str
    compute_capability: tuple[int, int]
    mem_total: int                          # bytes
    mem_free: int                           # bytes, when the inventory was taken
    bandwidth_gbps: float | None            # device memory bandwidth, listed (by name) or measured
    numa_node: int | None                   # NUMA node of the PCIe slot; None when unknown
    pci_bus_id: str | None                  # sysfs form, e.g. 0000:c1:00.0
    bandwidth_source: str | None = None     # "listed", "measured", "given" (inventory file) or None
    source: str = "nvml"                    # nvml or fake

    @property
    def cc(self) -> str:
        return f"{self.compute_capability[0]}.{self.compute_capability[1]}"

    def to_dict(self) -> dict:
        return {"index": self.index, "name": self.name, "compute_capability": self.cc,
                "mem_total": self.mem_total, "mem_free": self.mem_free,
                "bandwidth_gbps": self.bandwidth_gbps, "bandwidth_source": self.bandwidth_source,
                "numa_node": self.numa_node, "pci_bus_id": self.pci_bus_id, "source": self.source}


# -- listed bandwidth ----------------------------------------------------------------------------

# Vendor-listed device memory bandwidth in GB/s, keyed by the model as it appears in NVML names
# ("NVIDIA GeForce RTX 3060", "Tesla M10", "NVIDIA A100-SXM4-80GB"). The longest key whose words
# all appear in order in the name wins, so "RTX 3060 TI" beats "RTX 3060". Where one name covers
# several memory configurations, the common one is listed (RTX 3060: the 12 GB card).
LISTED_GBPS = {
    # Maxwell / Pascal / Volta / Turing data center
    "M10": 83, "M40": 288, "M60": 160, "P4": 192, "P40": 346, "P100": 732, "V100": 900,
    "V100S": 1134, "V100 SXM2": 900, "T4": 320, "TITAN V": 653, "TITAN XP": 548, "TITAN X": 480,
    # Ampere / Ada / Hopper / Blackwell data center
    "A2": 200, "A10": 600, "A10G": 600, "A16": 200, "A30": 933, "A40": 696, "A100": 1555,
    "A100 80GB": 1935, "A100 SXM4 80GB": 2039, "A800": 1935, "L4": 300, "L40": 864, "L40S": 864,
    "H100": 3350, "H100 PCIE": 2000, "H100 NVL": 3900, "H800": 3350, "H200": 4800, "H20": 4000,
    "GH200": 4000, "B200": 8000,
    # workstation
    "RTX A2000": 288, "RTX A4000": 448, "RTX A4500": 640, "RTX A5000": 768, "RTX A6000": 768,
    "RTX 4000 ADA": 360, "RTX 5000 ADA": 576, "RTX 6000 ADA": 960, "QUADRO RTX 8000": 672,
    # GeForce
    "GTX 970": 224, "GTX 980": 224, "GTX 980 TI": 336, "GTX 1060": 192, "GTX 1070": 256,
    "GTX 1070 TI": 256, "GTX 1080": 320, "GTX 1080 TI": 484, "GTX 1650": 128, "GTX 1660": 192,
    "GTX 1660 SUPER": 336, "GTX 1660 TI": 288, "RTX 2060": 336, "RTX 2070": 448, "RTX 2080": 448,
    "RTX 2080 TI": 616, "TITAN RTX": 672, "RTX 3050": 224, "RTX 3060": 360, "RTX 3060 TI": 448,
    "RTX 3070": 448, "RTX 3070 TI": 608, "RTX 3080": 760, "RTX 3080 TI": 912, "RTX 3090": 936,
    "RTX 3090 TI": 1008, "RTX 4060": 272, "RTX 4060 TI": 288, "RTX 4070": 504,
    "RTX 4070 TI": 504, "RTX 4070 TI SUPER": 672, "RTX 4080": 717, "RTX 4080 SUPER": 736,
    "RTX 4090": 1008, "RTX 5060 TI": 448, "RTX 5070": 672, "RTX 5070 TI": 896, "RTX 5080": 960,
    "RTX 5090": 1792,
}


def _words(name: str) -> list[str]:
    return re.sub(r"[^A-Z0-9]+", " ", name.upper()).split()


def listed_bandwidth(name: str) -> float | None:
    """The listed memory bandwidth (GB/s) of a GPU by its NVML name, or None when unlisted."""
    words = _words(name)
    best, best_len = None, 0
    for key, gbps in LISTED_GBPS.items():
        kw = _words(key)
        # key words must appear contiguously, in order, as whole words
        hit = any(words[i:i + len(kw)] == kw for i in range(len(words) - len(kw) + 1))
        if hit and len(kw) > best_len:
            best, best_len = float(gbps), len(kw)
    return best


# -- sizes ---------------------------------------------------------------------------------------

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "KIB": 1 << 10, "KB": 10 ** 3, "M": 1 << 20,
          "MIB": 1 << 20, "MB": 10 ** 6, "G": 1 << 30, "GIB": 1 << 30, "GB": 10 ** 9,
          "T": 1 << 40, "TIB": 1 << 40, "TB": 10 ** 12}


def parse_size(text: str | int, what: str = "size") -> int:
    """'2GiB' / '512M' / '1.5G' / 1024 -> bytes. K/M/G alone are binary (GiB); KB/MB/GB decimal."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise GpuError(f"{what} {text}: give a non-negative number of bytes")
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([A-Za-z]*)\s*", str(text))
    unit = m.group(2).upper() if m else None
    if not m or unit not in _UNITS:
        raise GpuError(f"{what} {text!r} is not a size; write it like 2GiB, 512MiB or 1500MB")
    return int(float(m.group(1)) * _UNITS[unit])


# -- sources -------------------------------------------------------------------------------------

def _cc(v, what: str) -> tuple[int, int]:
    if isinstance(v, str) and re.fullmatch(r"\d+\.\d+", v.strip()):
        major, minor = v.strip().split(".")
        return int(major), int(minor)
    if isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(x, int) for x in v):
        return int(v[0]), int(v[1])
    raise GpuError(f"{what}.compute_capability must be like \"8.6\" or [8, 6], not {v!r}")


def load_fake(path: str) -> list[GpuDevice]:
    """A list of GpuDevice fields as JSON; sizes may be strings ("12GiB"), bandwidth may be left out
    (then it is looked up by name), index defaults to the position in the list."""
    where = f"{FAKE_ENV}={path}"
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as e:
        raise GpuError(f"{where}: cannot read it ({e.strerror or e}); point it at a JSON list of GPUs "
                       f"(docs/gpu.md) or unset it") from None
    except json.JSONDecodeError as e:
        raise GpuError(f"{where}: not valid JSON ({e}); see docs/gpu.md for the format") from None
    if not isinstance(data, list):
        raise GpuError(f"{where}: the top level must be a list of GPU objects (docs/gpu.md)")
    known = {f.name for f in fields(GpuDevice)}
    out = []
    for i, d in enumerate(data):
        what = f"{where}: gpus[{i}]"
        if not isinstance(d, dict):
            raise GpuError(f"{what} must be an object with name, compute_capability, mem_total...")
        extra = sorted(set(d) - known)
        if extra:
            raise GpuError(f"{what} has unknown field(s) {', '.join(extra)}; known: {', '.join(sorted(known))}")
        for key in ("name", "compute_capability", "mem_total"):
            if key not in d:
                raise GpuError(f"{what} lacks {key}")
        total = parse_size(d["mem_total"], f"{what}.mem_total")
        free = parse_size(d.get("mem_free", total), f"{what}.mem_free")
        if free > total:
            raise GpuError(f"{what}: mem_free {free} is more than mem_total {total}")
        bw = d.get("bandwidth_gbps")
        if bw is not None and (not isinstance(bw, (int, float)) or bw <= 0):
            raise GpuError(f"{what}.bandwidth_gbps must be a positive number of GB/s")
        node = d.get("numa_node")
        if node is not None and (not isinstance(node, int) or node < 0):
            raise GpuError(f"{what}.numa_node must be a node number or null")
        index = d.get("index", i)
        if not isinstance(index, int) or index < 0:
            raise GpuError(f"{what}.index must be a non-negative integer")
        name = str(d["name"])
        listed = listed_bandwidth(name)
        out.append(GpuDevice(index=index, name=name, compute_capability=_cc(d["compute_capability"], what),
                             mem_total=total, mem_free=free,
                             bandwidth_gbps=float(bw) if bw is not None else listed,
                             numa_node=node, pci_bus_id=d.get("pci_bus_id"),
                             bandwidth_source="given" if bw is not None else ("listed" if listed else None),
                             source="fake"))
    if len({g.index for g in out}) != len(out):
        raise GpuError(f"{where}: two GPUs have the same index")
    return sorted(out, key=lambda g: g.index)


def nvml_devices(r) -> tuple[list[GpuDevice], str | None]:
    """NVIDIA GPUs through NVML: (devices, None), or ([], why not) in one line. A GPU NVML cannot
    describe is left out with a note on `r` (a topology.sysfs.Reader; one bad GPU must not hide the
    others)."""
    # imported here: numallm.topology imports this module (for MIN_COMPUTE_CAPABILITY)
    from ..topology.gpu import _numa_node, _sysfs_bus_id

    try:
        import pynvml
    except ImportError:
        return [], "NVML not installed (pip install nvidia-ml-py, or 'numallm[gpu]')"
    try:
        pynvml.nvmlInit()
    except Exception as e:  # noqa: BLE001 - NVMLError subclasses, or a missing libnvidia-ml.so
        text = str(e) or type(e).__name__
        if "LibraryNotFound" in type(e).__name__ or "not found" in text.lower():
            return [], f"no NVIDIA driver (libnvidia-ml not found: {text})"
        return [], f"NVML present but unusable ({text}); is the NVIDIA driver loaded?"
    out, failed = [], []
    try:
        for i in range(pynvml.nvmlDeviceGetCount()):
            try:
                h = pynvml.nvmlDeviceGetHandleByIndex(i)
                name = pynvml.nvmlDeviceGetName(h)
                name = name.decode() if isinstance(name, bytes) else str(name)
                major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(h)
                mem = pynvml.nvmlDeviceGetMemoryInfo(h)
                bus = _sysfs_bus_id(pynvml.nvmlDeviceGetPciInfo(h).busId)
            except Exception as e:  # noqa: BLE001
                failed.append(f"GPU {i}: {e}")
                r.note(f"NVML could not describe GPU {i} ({e}); left out")
                continue
            listed = listed_bandwidth(name)
            out.append(GpuDevice(i, name, (int(major), int(minor)), int(mem.total), int(mem.free),
                                 listed, _numa_node(r, bus), bus, "listed" if listed else None))
    except Exception as e:  # noqa: BLE001
        return [], f"NVML failed while listing GPUs ({e})"
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:  # noqa: BLE001 - shutting down is best effort
            pass
    if not out:
        return [], (f"NVML could not describe any GPU ({'; '.join(failed)})" if failed
                    else "NVML reports no GPUs")
    return out, None


def _visible(devices: list[GpuDevice], env: str | None) -> tuple[list[GpuDevice], str | None]:
    """Apply CUDA_VISIBLE_DEVICES. Numbers are taken in nvidia-smi (PCI bus) order, which is CUDA's
    order only with CUDA_DEVICE_ORDER=PCI_BUS_ID (docs/gpu.md); UUID entries are left to CUDA."""
    if env is None:
        return devices, None
    items = [x.strip() for x in env.split(",") if x.strip()]
    if not items or items[0] == "-1":
        return [], f"CUDA_VISIBLE_DEVICES={env!r} hides every GPU"
    if not all(x.isdigit() for x in items):
        return devices, None  # UUIDs: CUDA resolves them; we cannot map them without NVML UUIDs
    keep = []
    for x in items:  # CUDA stops at the first invalid number
        match = [g for g in devices if g.index == int(x)]
        if not match:
            break
        keep.append(match[0])
    if not keep:
        return [], f"CUDA_VISIBLE_DEVICES={env!r} names no GPU of this machine"
    return keep, None


def discover_gpus(root: str = "/") -> tuple[list[GpuDevice], str | None]:
    """(devices, None) or ([], one line saying why there are none)."""
    fake = os.environ.get(FAKE_ENV)
    if fake:
        devices = load_fake(fake)
        return (devices, None) if devices else ([], f"{FAKE_ENV}={fake} lists no GPUs")
    from ..topology.gpu import sysfs_gpus
    from ..topology.sysfs import Reader

    r = Reader(root)
    has_nvidia = (any(g.name.startswith("NVIDIA") for g in sysfs_gpus(r))
                  or r.text("proc/driver/nvidia/version", quiet=True) is not None)
    if not has_nvidia:
        return [], "no NVIDIA GPU on the PCI bus"
    devices, why = nvml_devices(r)
    if why:
        return [], why
    return _visible(devices, os.environ.get("CUDA_VISIBLE_DEVICES"))


def with_bandwidth(device: GpuDevice, gbps: float, source: str = "measured") -> GpuDevice:
    """The same device with a measured (or otherwise known) bandwidth."""
    return replace(device, bandwidth_gbps=float(gbps), bandwidth_source=source)
