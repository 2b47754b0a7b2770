"""The page check of `numallm topo MODEL --verify` and chat's /stats (numallm.placement_check).

On this machine every node is real node 0 (or virtual nodes carved from it), so a misplaced page
cannot be made here: the WARNING path is driven by replacing move_pages' answer for one slice
(numa_mem.where). tests/system/test_numa_vm.py moves real pages to the wrong node in a 2-node VM.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import numallm
from numallm import numa_mem, placement_check, synth
from numallm.cli import main

needs_two = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 allowed CPUs")
needs_libnuma = pytest.mark.skipif(not numa_mem.status().available, reason=numa_mem.status().note)


@pytest.fixture(scope="module")
def tiny(synth_dir) -> str:
    return str(synth.cached_model(synth_dir, "llama", "Q4_0", "tiny"))


def cli(*argv):
    return subprocess.run([sys.executable, "-m", "numallm", *argv], capture_output=True, text=True,
                          timeout=300)


def off_node_for(target: np.ndarray, share_off: float, monkeypatch) -> None:
    """numa_mem.where reports `share_off` of `target`'s pages on memory node 99."""
    real = numa_mem.where
    addr = target.__array_interface__["data"][0]

    def where(a):
        counts = real(a)
        if a.__array_interface__["data"][0] != addr:
            return counts
        (home,) = counts                                    # all on one node really
        n = counts[home]
        return {home: n - round(n * share_off), 99: round(n * share_off)}

    monkeypatch.setattr(numa_mem, "where", where)


@needs_two
@needs_libnuma
def test_topo_verify_json_every_slice_local_on_virtual_nodes(tiny):
    r = cli("topo", tiny, "--verify", "--numa", "shard", "--virtual-nodes", "2", "-c", "64", "--json")
    assert r.returncode == 0, r.stderr
    v = json.loads(r.stdout)["verify"]
    real = numa_mem.status().nodes[0]
    assert v["strategy"] == "shard" and v["verified"] and v["ok"] and v["warnings"] == []
    assert [(n["node"], n["mem_node"], n["local"]) for n in v["nodes"]] == [(0, real, 100.0), (1, real, 100.0)]
    assert len(v["slices"]) > 20 and all(s["local"] == 100.0 for s in v["slices"])
    # the one-token forward wrote KV pages, and they were read back too
    assert v["kv"] and all(k["local"] == 100.0 for k in v["kv"])
    assert "100% local pages" in v["summary"]


@needs_libnuma
def test_topo_verify_on_the_real_nodes_here_is_all_local(tiny):
    r = cli("topo", tiny, "--verify", "--numa", "shard", "-c", "64", "--json")
    assert r.returncode == 0, r.stderr
    v = json.loads(r.stdout)["verify"]
    real = sorted({n["id"] for n in json.loads(r.stdout)["nodes"] if n["cpus"]})
    assert [n["mem_node"] for n in v["nodes"]] == real and v["ok"]
    assert all(s["local"] == 100.0 for s in v["slices"]) and all(k["local"] == 100.0 for k in v["kv"])


@needs_two
@needs_libnuma
def test_topo_verify_text_says_ok_and_lists_every_slice_with_v(tiny):
    r = cli("topo", tiny, "--verify", "--numa", "shard", "--virtual-nodes", "2", "-c", "64", "-v")
    assert r.returncode == 0, r.stderr
    assert "page check (move_pages; threshold 100% local): OK: all " in r.stdout
    assert "blk.0.attn_q.weight rows 0-256 on node 0" in r.stdout and "100% local" in r.stdout


@needs_two
@needs_libnuma
def test_a_slice_off_its_node_is_a_warning(tiny, monkeypatch):
    with numallm.load(tiny, n_ctx=32, numa="shard", virtual_nodes=2) as llm:
        victim = next(p for m in llm.placement.linears if m.name == "blk.2.ffn_up.weight" for p in m.parts
                      if p.group == 1)
        off_node_for(victim.arrays[0], 0.25, monkeypatch)
        c = placement_check.check(llm.placement)
        assert not c.ok and [s.tensor for s in c.below] == ["blk.2.ffn_up.weight"]
        lines = c.lines()
        assert lines[1].startswith("WARNING: 1 of 60 weight slices have under 100% of their pages on "
                                   "their node (worst: blk.2.ffn_up.weight rows 512-1024 at 75.0%)")
        assert "blk.2.ffn_up.weight rows 512-1024 on node 1" in lines[2]
        assert placement_check.check(llm.placement, threshold=0.7).ok      # --min-local 70
        d = c.to_dict()
        assert not d["ok"] and [n["worst_slice"] for n in d["nodes"]] == [100.0, 75.0]


@needs_two
@needs_libnuma
def test_cli_exit_status_1_and_warning_when_pages_are_off(tiny, monkeypatch, capsys):
    real = numa_mem.where

    def where(a):                      # every array: one page in ten on node 99
        counts = real(a)
        n = sum(counts.values())
        return {0: n - n // 10, 99: n // 10} if n >= 10 else counts

    monkeypatch.setattr(numa_mem, "where", where)
    rc = main(["topo", tiny, "--verify", "--numa", "shard", "--virtual-nodes", "2", "-c", "32"])
    out = capsys.readouterr().out
    assert rc == 1 and "WARNING: " in out and "weight slices have under 100% of their pages" in out
    assert "... and " in out                            # more than MAX_LISTED slices listed
    assert main(["topo", tiny, "--verify", "--numa", "shard", "--virtual-nodes", "2", "-c", "32",
                 "--min-local", "80"]) == 0


@needs_two
def test_chat_stats_shows_the_page_check(shared_models):
    r = subprocess.run([sys.executable, "-m", "numallm", "chat", str(shared_models / "stories260K.gguf"),
                        "--numa", "shard", "--virtual-nodes", "2", "--temp", "0", "-n", "4"],
                       input="Hi\n/stats\n/bye\n", capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    if numa_mem.status().available:
        assert "page check (move_pages; threshold 100% local): OK: all 74 weight slices" in r.stdout
    else:
        assert "page check (move_pages; threshold 100% local): not verifiable here" in r.stdout


def test_topo_verify_with_numa_off_says_nothing_is_placed(tiny):
    r = cli("topo", tiny, "--verify", "--numa", "off", "-c", "32")
    assert r.returncode == 0, r.stderr
    assert "nothing placed (--numa off)" in r.stdout


@pytest.mark.parametrize("argv,msg", [
    (["--verify"], "--verify needs a MODEL"),
    (["{m}", "--numa", "shard"], "add --verify"),
    (["{m}", "--verify", "--min-local", "150"], "--min-local 150.0: give a percentage"),
    (["{m}", "--verify", "--topology", "x.json"], "drop --topology/--sysfs-root"),
])
def test_bad_verify_flags_are_one_line_errors(tiny, argv, msg):
    r = cli("topo", *[a.format(m=tiny) for a in argv])
    assert r.returncode == 1 and msg in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_share_never_rounds_up_to_100():
    assert placement_check.pct(1.0) == "100%"
    assert placement_check.pct(0.99996) == "99.9%" and placement_check.pct(0.5) == "50.0%"
