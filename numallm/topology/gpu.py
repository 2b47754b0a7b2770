"""GPUs: NVML (nvidia-ml-py, optional) for compute capability and memory, sysfs PCI for the rest.

NVML is consulted only for the live machine (a fixture root describes another machine). Any NVML
failure - not installed, no driver, one broken device - becomes a note, never an exception.
"""
from __future__ import annotations

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


def nvml_gpus(r: Reader) -> list[Gpu] | None:
    """NVIDIA GPUs through NVML, or None (with a note) when NVML cannot be used."""
    try:
        import pynvml
    except ImportError:
        r.note("NVML not installed (pip install nvidia-ml-py): GPUs are listed from sysfs, "
               "without compute capability or memory")
        return None
    try:
        pynvml.nvmlInit()
    except Exception as e:  # noqa: BLE001 - NVMLError subclasses, or a missing libnvidia-ml.so
        r.note(f"NVML present but unusable ({e}); GPUs are listed from sysfs")
        return None
    gpus = []
    try:
        count = pynvml.nvmlDeviceGetCount()
        for i in range(count):
            try:
                h = pynvml.nvmlDeviceGetHandleByIndex(i)
                name = pynvml.nvmlDeviceGetName(h)
                name = name.decode() if isinstance(name, bytes) else str(name)
                major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(h)
                mem = pynvml.nvmlDeviceGetMemoryInfo(h)
                bus_id = _sysfs_bus_id(pynvml.nvmlDeviceGetPciInfo(h).busId)
            except Exception as e:  # noqa: BLE001 - one bad GPU must not hide the others
                r.note(f"NVML could not describe GPU {i} ({e}); left out")
                continue
            gpus.append(Gpu(index=i, name=name, pci_bus_id=bus_id, numa_node=_numa_node(r, bus_id),
                            compute_capability=f"{major}.{minor}", mem_total_bytes=int(mem.total),
                            mem_free_bytes=int(mem.free), source="nvml"))
    except Exception as e:  # noqa: BLE001
        r.note(f"NVML failed while listing GPUs ({e}); GPUs are listed from sysfs")
        return None
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:  # noqa: BLE001 - shutting down is best effort
            pass
    return gpus


def discover_gpus(r: Reader, live: bool) -> list[Gpu]:
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
