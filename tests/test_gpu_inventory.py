"""GPU inventory: NVML through a fake pynvml module (no GPU here), inventories given as data
(NUMALLM_FAKE_GPUS), listed bandwidths, CUDA_VISIBLE_DEVICES, and `numallm topo`'s GPU lines."""
from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest

from numallm.cli import main
from numallm.gpu.inventory import (GpuDevice, GpuError, discover_gpus, listed_bandwidth, load_fake,
                                   parse_size)

GIB = 1 << 30
FIX = Path(__file__).parent / "fixtures" / "topo"
HALFNODE = str(FIX / "container_halfnode")      # an NVIDIA GPU at 0000:c1:00.0 on node 1


def fake_nvml(gpus, init_error: Exception | None = None, broken: tuple[int, ...] = ()):
    """A pynvml module describing `gpus`: (name, (major, minor), total, free, bus id)."""
    m = types.ModuleType("pynvml")
    state = {"up": False}

    def init():
        if init_error is not None:
            raise init_error
        state["up"] = True

    def handle(i):
        if i in broken:
            raise RuntimeError("Unknown Error")
        return i

    m.nvmlInit, m.nvmlShutdown = init, lambda: state.update(up=False)
    m.nvmlDeviceGetCount = lambda: len(gpus)
    m.nvmlDeviceGetHandleByIndex = handle
    m.nvmlDeviceGetName = lambda h: gpus[h][0].encode()
    m.nvmlDeviceGetCudaComputeCapability = lambda h: gpus[h][1]
    m.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(total=gpus[h][2], free=gpus[h][3])
    m.nvmlDeviceGetPciInfo = lambda h: types.SimpleNamespace(busId=gpus[h][4].encode())
    m.state = state
    return m


TWO = [("NVIDIA GeForce RTX 3060", (8, 6), 12 * GIB, 11 * GIB, "00000000:C1:00.0"),
       ("Tesla M10", (5, 0), 8 * GIB, 8 * GIB, "00000000:C2:00.0")]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    monkeypatch.delenv("NUMALLM_FAKE_GPUS", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


def test_nvml_devices_with_listed_bandwidth_and_slot_node(monkeypatch):
    nvml = fake_nvml(TWO)
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    devices, why = discover_gpus(HALFNODE)
    assert why is None and not nvml.state["up"]            # NVML shut down again
    assert devices[0] == GpuDevice(0, "NVIDIA GeForce RTX 3060", (8, 6), 12 * GIB, 11 * GIB, 360.0, 1,
                                   "0000:c1:00.0", "listed", "nvml")
    assert (devices[1].name, devices[1].cc, devices[1].bandwidth_gbps, devices[1].numa_node) == (
        "Tesla M10", "5.0", 83.0, None)                     # no sysfs entry for c2:00.0: node unknown


def test_one_broken_gpu_does_not_hide_the_others(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(TWO, broken=(0,)))
    devices, why = discover_gpus(HALFNODE)
    assert why is None and [d.index for d in devices] == [1]
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(TWO, broken=(0, 1)))
    assert discover_gpus(HALFNODE) == ([], "NVML could not describe any GPU (GPU 0: Unknown Error; "
                                           "GPU 1: Unknown Error)")


def test_reasons_when_there_is_no_gpu(monkeypatch, tmp_path):
    class NVMLError_LibraryNotFound(Exception):
        pass

    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(TWO))
    assert discover_gpus(str(FIX / "vm_1node")) == ([], "no NVIDIA GPU on the PCI bus")
    monkeypatch.setitem(sys.modules, "pynvml", None)                       # import -> ImportError
    assert discover_gpus(HALFNODE)[1].startswith("NVML not installed (pip install nvidia-ml-py")
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(TWO, NVMLError_LibraryNotFound("NVML Shared Library Not Found")))
    assert discover_gpus(HALFNODE)[1].startswith("no NVIDIA driver (libnvidia-ml not found")
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(TWO, RuntimeError("Driver Not Loaded")))
    assert "Driver Not Loaded" in discover_gpus(HALFNODE)[1]
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml([]))
    assert discover_gpus(HALFNODE) == ([], "NVML reports no GPUs")


def test_cuda_visible_devices(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(TWO))
    for env, want in (("1", [1]), ("1,0", [1, 0]), ("0,7,1", [0]), ("GPU-1234abcd", [0, 1])):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", env)
        assert [d.index for d in discover_gpus(HALFNODE)[0]] == want, env
    for env in ("", "-1"):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", env)
        assert discover_gpus(HALFNODE) == ([], f"CUDA_VISIBLE_DEVICES={env!r} hides every GPU")


@pytest.mark.parametrize("name, gbps", [
    ("NVIDIA GeForce RTX 3060", 360), ("NVIDIA GeForce RTX 3060 Ti", 448), ("Tesla M10", 83),
    ("NVIDIA A10", 600), ("NVIDIA A100-PCIE-40GB", 1555), ("NVIDIA A100-SXM4-80GB", 2039),
    ("NVIDIA A100 80GB PCIe", 1935), ("NVIDIA H100 PCIe", 2000), ("NVIDIA H100 80GB HBM3", 3350),
    ("NVIDIA H200", 4800), ("Tesla V100-SXM2-16GB", 900), ("NVIDIA GeForce RTX 4070 Ti SUPER", 672),
    ("Tesla T4", 320), ("NVIDIA RTX A6000", 768), ("Some Future GPU 9000", None),
])
def test_listed_bandwidth_by_whole_words(name, gbps):
    assert listed_bandwidth(name) == gbps


def test_fake_inventory_file(tmp_path, monkeypatch):
    inv = tmp_path / "gpus.json"
    inv.write_text(json.dumps([
        {"name": "NVIDIA GeForce RTX 3060", "compute_capability": "8.6", "mem_total": "12GiB",
         "mem_free": "10.5GiB", "numa_node": 1},
        {"index": 5, "name": "Prototype", "compute_capability": [9, 0], "mem_total": 1 << 34,
         "bandwidth_gbps": 2500, "pci_bus_id": "0000:81:00.0"}]))
    monkeypatch.setenv("NUMALLM_FAKE_GPUS", str(inv))
    devices, why = discover_gpus()
    assert why is None
    assert devices == [GpuDevice(0, "NVIDIA GeForce RTX 3060", (8, 6), 12 * GIB, int(10.5 * GIB), 360.0, 1,
                                 None, "listed", "fake"),
                       GpuDevice(5, "Prototype", (9, 0), 1 << 34, 1 << 34, 2500.0, None, "0000:81:00.0",
                                 "given", "fake")]
    inv.write_text("[]")
    assert discover_gpus() == ([], f"NUMALLM_FAKE_GPUS={inv} lists no GPUs")


@pytest.mark.parametrize("content, needle", [
    ("{", "not valid JSON"),
    ('{"name": "x"}', "the top level must be a list"),
    ('[{"name": "x", "compute_capability": "8.6"}]', "gpus[0] lacks mem_total"),
    ('[{"name": "x", "compute_capability": "eight", "mem_total": 1}]', "compute_capability must be like"),
    ('[{"name": "x", "compute_capability": "8.6", "mem_total": "1GiB", "mem_free": "2GiB"}]', "more than mem_total"),
    ('[{"name": "x", "compute_capability": "8.6", "mem_total": "12 apples"}]', "is not a size"),
    ('[{"name": "x", "compute_capability": "8.6", "mem_total": 1, "memory": 2}]', "unknown field(s) memory"),
    ('[{"name": "x", "compute_capability": "8.6", "mem_total": 1, "bandwidth_gbps": -3}]', "positive number"),
    ('[{"name": "a", "compute_capability": "8.6", "mem_total": 1, "index": 1}, '
     '{"name": "b", "compute_capability": "8.6", "mem_total": 1}]', "two GPUs have the same index"),
])
def test_bad_fake_inventory_is_one_clear_error(tmp_path, content, needle):
    inv = tmp_path / "gpus.json"
    inv.write_text(content)
    with pytest.raises(GpuError) as e:
        load_fake(str(inv))
    assert needle in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(GpuError, match="cannot read it"):
        load_fake(str(tmp_path / "missing.json"))


def test_parse_size():
    assert parse_size("2GiB") == 2 * GIB and parse_size("2G") == 2 * GIB and parse_size("2GB") == 2 * 10 ** 9
    assert parse_size("512 MiB") == 512 << 20 and parse_size("1.5g") == int(1.5 * GIB)
    assert parse_size(4096) == 4096 and parse_size("0") == 0
    for bad in ("-1GiB", "GiB", "2 parsecs", "1e9"):
        with pytest.raises(GpuError, match="is not a size"):
            parse_size(bad, "--gpu-reserve")


def test_topo_lists_gpus_with_bandwidth_or_says_why_none(tmp_path, monkeypatch, capsys):
    inv = tmp_path / "gpus.json"
    inv.write_text(json.dumps([{"name": "Tesla M10", "compute_capability": "5.0", "mem_total": "8GiB",
                                "numa_node": 0},
                               {"name": "NVIDIA GeForce RTX 3060", "compute_capability": "8.6",
                                "mem_total": "12GiB", "mem_free": "11GiB", "numa_node": 0}]))
    monkeypatch.setenv("NUMALLM_FAKE_GPUS", str(inv))
    assert main(["topo"]) == 0
    out = capsys.readouterr().out
    assert "GPU 1: NVIDIA GeForce RTX 3060, compute 8.6, 12.0 GiB (11.0 GiB free), 360 GB/s, PCIe on node 0 (fake)" in out
    assert "GPU 0 (Tesla M10) has compute capability 5.0, older than 6.0" in out
    assert main(["topo", "--json"]) == 0
    gpus = json.loads(capsys.readouterr().out)["gpus"]
    assert [(g["name"], g["bandwidth_gbps"], g["source"]) for g in gpus] == [
        ("Tesla M10", 83.0, "fake"), ("NVIDIA GeForce RTX 3060", 360.0, "fake")]
    assert main(["topo", "--sysfs-root", str(FIX / "vm_1node")]) == 0
    assert "GPUs: none on the PCI bus (GPU offload off: every layer runs on the CPU)" in capsys.readouterr().out
