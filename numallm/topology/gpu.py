"""GPUs: NVML (nvidia-ml-py, optional) for compute capability and memory, sysfs PCI for the rest.

NVML is consulted only for the live machine (a fixture root describes another machine). Any NVML
failure - not installed, no driver, one broken device - becomes a note, never an exception.
"""
from __future__ import annotations

import os

from .model import Gpu
from .sysfs import Reader

_VENDORS = {"0x10de": "NVIDIA", "0x1002": "AMD", "0x8086": "Intel"}
_PCI = "sys/bus/pci/devices"


def _sysfs_bus_id(nvml_bus_id) -> str:
    """NVML's '00000000:C1:00.0' -> sysfs '0000:c1:00.0'."""
    s = nvml_bus_id.decode() if isinstance(nvml_bus_id, bytes) else str(nvml_bus_id)
    dom, _, rest = s.partition(":")
    return f"{int(dom, 16):04x}:{rest.lower()}"


def _numa_node(r: Reader, bus_id: str) -> int | None:
    v = r.int(f"{_PCI}/{bus_id}/numa_node", quiet=True)
    return None if v is None or v < 0 else v  # -1: firmware did not say (common in VMs)


def sysfs_gpus(r: Reader) -> list[Gpu]:
    """Display/3D controllers on the PCI bus (class 0x03xxxx), with the node of their slot."""
    gpus = []
    for bus_id in sorted(r.listdir(_PCI)):
        cls = r.line(f"{_PCI}/{bus_id}/class", quiet=True) or ""
        if not cls.startswith("0x03"):
            continue
        vendor = r.line(f"{_PCI}/{bus_id}/vendor", quiet=True) or "?"
        if vendor not in _VENDORS:  # skip BMC/ASPEED VGA and other board graphics
            continue
        device = r.line(f"{_PCI}/{bus_id}/device", quiet=True) or "?"
        gpus.append(Gpu(index=len(gpus), name=f"{_VENDORS[vendor]} GPU {device}", pci_bus_id=bus_id,
                        numa_node=_numa_node(r, bus_id), source="sysfs"))
    return gpus


def _from_device(d) -> Gpu:
    """numallm.gpu.inventory.GpuDevice -> Gpu."""
    return Gpu(index=d.index, name=d.name, pci_bus_id=d.pci_bus_id or "", numa_node=d.numa_node,
               compute_capability=d.cc, mem_total_bytes=d.mem_total, mem_free_bytes=d.mem_free,
               source=d.source, bandwidth_gbps=d.bandwidth_gbps)


def nvml_gpus(r: Reader) -> list[Gpu] | None:
    """NVIDIA GPUs through NVML (numallm.gpu.inventory reads it), or None with a note."""
    from ..gpu.inventory import nvml_devices  # imported here: that module imports this one

    devices, why = nvml_devices(r)
    if why:
        r.note(f"{why}: GPUs are listed from sysfs, without compute capability or memory")
        return None
    return [_from_device(d) for d in devices]


def discover_gpus(r: Reader, live: bool) -> list[Gpu]:
    if live and os.environ.get("NUMALLM_FAKE_GPUS"):  # an inventory given as data (docs/gpu.md)
        from ..gpu.inventory import FAKE_ENV, load_fake

        return [_from_device(d) for d in load_fake(os.environ[FAKE_ENV])]
    from_sysfs = sysfs_gpus(r)
    if not live:
        return from_sysfs
    # ask NVML only where there is an NVIDIA GPU, so GPU-less machines get no "NVML missing" note
    has_nvidia = (any(g.name.startswith("NVIDIA") for g in from_sysfs)
                  or r.text("proc/driver/nvidia/version", quiet=True) is not None)
    from_nvml = nvml_gpus(r) if has_nvidia else None
    if from_nvml is None:
        return from_sysfs
    # NVML knows NVIDIA GPUs only: keep the others from sysfs, renumbered after them
    nv_ids = {g.pci_bus_id for g in from_nvml}
    others = [g for g in from_sysfs if g.pci_bus_id not in nv_ids and not g.name.startswith("NVIDIA")]
    return from_nvml + [Gpu(len(from_nvml) + i, g.name, g.pci_bus_id, g.numa_node, source="sysfs")
                        for i, g in enumerate(others)]
