"""--numa shard on a machine with two real NUMA nodes: a VM booted by numa_vm.py (QEMU, this
machine's kernel and filesystem, 2 nodes of 1 vCPU and 2 GiB each).

One boot runs vm_payload.py over a small synthetic Q4_0 model, a small Q4_0 MoE model (qwen3moe
"tiny-moe": 8 experts, top-2, each node holding its share of every expert) and stories260K (when
../shared/models has it); the tests below judge what it recorded. Skips with the reason when the
VM cannot boot here (not Linux x86_64, no virtme-ng, or QEMU/kernel/busybox missing and not root
on apt to install them; NUMALLM_VM_INSTALL=0 forbids installing). NUMALLM_VM_ACCEL=kvm|tcg skips
the KVM probe. Time: 3-6 minutes under emulation (TCG) on 2 busy cores, mostly Python and Numba
start-up inside the guest; see README "NUMA".

Numba under emulation: the guest CPU differs from the host's, so host-compiled code would not
match Numba's cache. Both sides therefore compile for NUMBA_CPU_NAME=generic with the plain-Numba
kernel variant (NUMALLM_KERNEL=numba-f32; the AVX2 variants are other tests' business), the host
runs the payload first to fill a persistent cache dir, and the guest loads from it.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import numa_vm
from checks import check_local, check_workers
from numallm import synth

pytestmark = [pytest.mark.system, pytest.mark.slow]

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
PAYLOAD = HERE / "vm_payload.py"
STORIES = REPO.parent / "shared" / "models" / "stories260K.gguf"
VM_TIMEOUT_S = 1500
MODELS = ["synthetic", "moe", "stories260K"]


def numba_cache_dir() -> Path:
    base = os.environ.get("NUMALLM_CACHE_DIR") or Path.home() / ".cache" / "numallm"
    return Path(base) / "numa-vm" / "numba"


@pytest.fixture(scope="module")
def vm(tmp_path_factory, synth_dir) -> dict:
    why = numa_vm.unavailable_reason(install=os.environ.get("NUMALLM_VM_INSTALL", "1") != "0")
    if why:
        pytest.skip(why)
    models = {"synthetic": str(synth.cached_model(synth_dir, "llama", "Q4_0", "tiny")),
              "moe": str(synth.cached_model(synth_dir, "qwen3moe", "Q4_0", "tiny-moe"))}
    if STORIES.exists():
        models["stories260K"] = str(STORIES)
    out = tmp_path_factory.mktemp("numa-vm")
    cache = numba_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    env = {"NUMBA_CACHE_DIR": str(cache), "NUMBA_CPU_NAME": "generic", "NUMALLM_KERNEL": "numba-f32",
           "NUMALLM_CACHE_DIR": str(out)}
    cmd = [sys.executable, str(PAYLOAD)]
    # host first: compiles into the cache the guest reads (and shows the payload runs at all)
    host = subprocess.run([*cmd, str(out / "host.json"), *models.values()], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=600)
    assert host.returncode == 0, f"the payload failed on the host:\n{host.stderr[-3000:]}"
    r = numa_vm.run([*cmd, str(out / "vm.json"), *models.values()], nodes=2,
                    rwdirs=(str(out), str(cache)), env=env, cwd=str(REPO), timeout=VM_TIMEOUT_S)
    result = out / "vm.json"
    if r.returncode != 0 or not result.exists():
        pytest.fail(f"the VM run failed (exit {r.returncode}, {r.seconds:.0f} s, {r.accel}):\n"
                    f"{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    data = json.loads(result.read_text())
    data["by_name"] = dict(zip(models, data["models"]))
    print(f"\nNUMA VM ({r.accel}): {r.seconds:.0f} s from boot to exit; inside: start-up {data['import_s']} s, "
          + ", ".join(f"{n} off {m['seconds']['off']} s / shard {m['seconds']['shard']} s"
                      for n, m in data["by_name"].items()))
    return data


def model(vm, name) -> dict:
    if name not in vm["by_name"]:
        pytest.skip(f"{STORIES} absent")
    return vm["by_name"][name]


def test_guest_has_two_real_nodes(vm):
    assert vm["topo"]["rc"] == 0, vm["topo"]["text"]
    topo = vm["topo"]["json"]
    assert not topo["virtual"] and [sorted(n["cpus"]) for n in topo["nodes"]] == [[0], [1]]
    assert vm["numa_mem"]["available"] and vm["numa_mem"]["nodes"] == [0, 1], vm["numa_mem"]["note"]


@pytest.mark.parametrize("name", MODELS)
def test_shard_gives_the_same_greedy_tokens(vm, name):
    m = model(vm, name)
    assert len(m["off_tokens"]) == 8 and m["shard_tokens"] == m["off_tokens"]


@pytest.mark.parametrize("name", MODELS)
def test_every_slice_and_kv_page_is_on_its_own_node(vm, name):
    m = model(vm, name)
    assert [(g["node"], g["cpus"]) for g in m["groups"]] == [(0, [0]), (1, [1])]
    check_local(m, mem_nodes=[0, 1])


@pytest.mark.parametrize("name", MODELS)
def test_workers_run_only_on_their_nodes_cpus(vm, name):
    check_workers(model(vm, name))


def test_moe_expert_slices_are_on_their_nodes(vm):
    """Every expert tensor is cut over both nodes (each node its share of every expert), and the
    page report (above) covers those slices."""
    exps = [r for r in model(vm, "moe")["report"] if "_exps." in r["tensor"]]
    names = {r["tensor"] for r in exps}
    assert len(names) == 3 * 4 and all({r["node"] for r in exps if r["tensor"] == n} == {0, 1}
                                       for n in names), exps[:6]


def test_topo_verify_reports_every_slice_local_on_both_nodes(vm):
    v = vm["topo_verify"]
    assert v["rc"] == 0 and v["json"] is not None, v["text"][-2000:]
    check = v["json"]["verify"]
    assert check["strategy"] == "shard" and check["ok"] and not check["warnings"]
    assert [(n["node"], n["mem_node"], n["local"]) for n in check["nodes"]] == [(0, 0, 100.0), (1, 1, 100.0)]
    assert {s["node"] for s in check["slices"]} == {0, 1}
    assert all(s["local"] == 100.0 and s["mem_node"] == s["node"] for s in check["slices"])
    assert check["kv"] and all(k["local"] == 100.0 for k in check["kv"])


@pytest.mark.parametrize("name", MODELS)
def test_page_check_notices_a_slice_moved_to_the_wrong_node(vm, name):
    mis = model(vm, name)["misplaced"]
    assert mis["moved_pages"] > 0 and not mis["ok"]
    # the moved slice is reported; so may be slices packed next to it (sharing its pages), no other
    assert mis["tensor"] in mis["below"], mis["below"]
    assert set(mis["below"]) <= {mis["tensor"], *mis["neighbors"]}, (mis["below"], mis["neighbors"])
    assert any(line.startswith("WARNING: ") and mis["tensor"] in line for line in mis["lines"]), mis["lines"]
