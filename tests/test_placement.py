"""NUMA placement over virtual nodes: same results as --numa off, threads stay on their node,
every slice's pages on its memory node."""
import ctypes
import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

import numallm
from numallm import numa_mem, ops, placement, synth, threads
from numallm.errors import NumallmError
from numallm.topology import discover, virtual_nodes

TOKENS = [1, 5, 9, 33, 70, 200, 7]
# Slicing whole rows leaves each row's dot product unchanged, so the sharded logits should match
# to float32 rounding; this bound leaves room for a kernel that tiles differently per slice.
LOGIT_ATOL = 1e-4

two_cores = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 allowed CPUs")


def model_path(synth_dir, arch, qtype, **kw):
    if qtype.endswith("_K"):
        pytest.importorskip("llama_cpp", reason="synthetic K-quants need llama-cpp-python")
    return synth.cached_model(synth_dir, arch, qtype, "tiny", **kw)


def task_cpus(tid: int) -> set[int]:
    """Cpus_allowed_list of one thread, read back from the kernel."""
    with open(f"/proc/self/task/{tid}/status") as f:
        line = next(x for x in f if x.startswith("Cpus_allowed_list:"))
    out = set()
    for part in line.split(":", 1)[1].strip().split(","):
        a, _, b = part.partition("-")
        out.update(range(int(a), int(b or a) + 1))
    return out


def test_split_units_is_proportional_and_complete():
    assert placement.split_units(10, [1, 1]) == [(0, 5), (5, 10)]
    assert placement.split_units(10, [3, 1]) == [(0, 8), (8, 10)]      # 7.5/2.5: remainder to 0
    assert placement.split_units(7, [1, 1, 1]) == [(0, 3), (3, 5), (5, 7)]
    assert placement.split_units(1, [1, 1]) == [(0, 1), (1, 1)]          # a node may get nothing
    for n in (0, 1, 13, 4096):
        r = placement.split_units(n, [5, 2, 3])
        assert r[0][0] == 0 and r[-1][1] == n and all(a[1] == b[0] for a, b in zip(r, r[1:]))


@two_cores
@pytest.mark.parametrize("arch,qtype", [("llama", "Q4_0"), ("qwen2", "Q8_0"), ("qwen3", "F16"),
                                        ("llama", "Q4_K"), ("qwen3", "Q6_K")])
def test_shard_matches_off(synth_dir, arch, qtype):
    path = model_path(synth_dir, arch, qtype)
    with numallm.load(path, n_ctx=64) as off, \
            numallm.load(path, n_ctx=64, numa="shard", virtual_nodes=2) as shard:
        assert all(isinstance(m, placement.ShardedLinear) for m in shard.model.linears())
        assert shard.weight_bytes == off.weight_bytes
        np.testing.assert_allclose(shard.logits(TOKENS), off.logits(TOKENS), rtol=0, atol=LOGIT_ATOL)
        want = off.generate(TOKENS, 12, temperature=0).tokens
        assert shard.generate(TOKENS, 12, temperature=0).tokens == want


@two_cores
def test_slices_keep_heads_whole_and_cover_every_row(synth_dir):
    with numallm.load(model_path(synth_dir, "llama", "Q8_0"), n_ctx=16, numa="shard",
                      virtual_nodes=2) as llm:
        a = llm.args
        group = a.n_head // a.n_head_kv
        for blk in llm.model.blk:
            q, k, v = blk.attn_q.parts, blk.attn_k.parts, blk.attn_v.parts
            assert [p.group for p in q] == [p.group for p in k] == [p.group for p in v]
            for pq, pk in zip(q, k):
                assert pk.r0 % a.head_dim == 0 and pk.r1 % a.head_dim == 0
                assert (pq.r0, pq.r1) == (pk.r0 * group, pk.r1 * group)  # query heads ride with KV
        for lin in llm.model.linears():
            assert lin.parts[0].r0 == 0 and lin.parts[-1].r1 == lin.shape[0]
            assert all(p.r1 == n.r0 for p, n in zip(lin.parts, lin.parts[1:]))
            assert sum(p.arrays[0].nbytes for p in lin.parts) == lin.nbytes   # raw rows, no copy kept
            assert lin.raw is None


@two_cores
def test_tied_output_is_placed_once(synth_dir):
    path = model_path(synth_dir, "llama", "Q8_0", tied_embeddings=True)
    with numallm.load(path, n_ctx=16, numa="shard", virtual_nodes=2) as llm:
        assert llm.model.output is llm.model.token_embd
        names = [m.name for m in llm.placement.linears]
        assert names.count("token_embd.weight") == 1


@two_cores
def test_workers_are_pinned_to_their_node_and_caller_restored(synth_dir):
    topo = virtual_nodes(discover(), 2)
    before = os.sched_getaffinity(0)
    with numallm.load(model_path(synth_dir, "llama", "Q4_0"), n_ctx=16, numa="shard",
                      virtual_nodes=2, threads_per_node=2) as llm:
        pool = llm.placement.pool
        assert pool.n_threads == 4 and [g.node for g in llm.placement.groups] == [0, 1]
        node_cpus = [set(n.cpus) for n in topo.nodes]
        # thread order is node by node: 0,1 on node 0 (0 = the caller), 2,3 on node 1
        for tid, want in zip(pool.native_ids, [node_cpus[0], node_cpus[1], node_cpus[1]]):
            assert task_cpus(tid) == want
        with threads.activate(pool):
            assert task_cpus(threading.get_native_id()) == node_cpus[0]
        assert os.sched_getaffinity(0) == before


@two_cores
def test_no_thread_runs_outside_its_node_during_a_forward(synth_dir, monkeypatch):
    libc = ctypes.CDLL(None)
    with numallm.load(model_path(synth_dir, "llama", "Q4_0"), n_ctx=32, numa="shard",
                      virtual_nodes=2) as llm:
        pl = llm.placement
        unit = llm.model.blk[0].attn_q.unit
        owner = {id(p.w): set(pl.groups[p.group].cpus) for m in pl.linears for p in m.parts}
        seen = []
        real_matmul_x = unit.matmul_x

        def record(w):
            seen.append((id(w), libc.sched_getcpu(), os.sched_getaffinity(0)))

        # every row range of every product goes through matmul_x (prefill and decode)
        monkeypatch.setattr(unit, "matmul_x", lambda w, *a: (record(w), real_matmul_x(w, *a))[1])
        llm.generate(TOKENS, 4, temperature=0)
    # every matrix slice but the embedding (read by row lookup, not matvec) was computed
    embd = {id(p.w) for p in llm.model.token_embd.parts}
    assert len(seen) > 100 and {w for w, _, _ in seen} == set(owner) - embd
    for w, cpu, allowed in seen:
        assert cpu in owner[w] and allowed == owner[w]


@two_cores
@pytest.mark.skipif(not numa_mem.status().available, reason=numa_mem.status().note)
def test_every_slice_is_verified_local(synth_dir):
    with numallm.load(model_path(synth_dir, "qwen2", "Q4_0"), n_ctx=16, numa="shard",
                      virtual_nodes=2) as llm:
        rep = llm.placement.report()
        assert len(rep) == 2 * len(llm.model.linears())
        assert {r.mem_node for r in rep} == {numa_mem.status().nodes[0]}
        assert all(r.local == 1.0 for r in rep)
        text = llm.placement.summary()
        assert "100.0% local pages" in text and "WARNING" not in text and "virtual" in text


def test_isolate_uses_one_node_and_off_changes_nothing(synth_dir):
    path = model_path(synth_dir, "llama", "Q4_0")
    with numallm.load(path, n_ctx=16, numa="isolate") as iso, numallm.load(path, n_ctx=16) as off:
        assert len(iso.placement.groups) == 1
        assert all(len(m.parts) == 1 for m in iso.model.linears())
        assert type(off.model.blk[0].ffn_up) is ops.Linear and off.placement.report() == []
        assert "numa: off" in off.placement.summary()
        assert iso.generate(TOKENS, 4, temperature=0).tokens == off.generate(TOKENS, 4, temperature=0).tokens


def test_bad_strategy_and_node_are_one_line_errors(synth_dir):
    path = model_path(synth_dir, "llama", "Q4_0")
    with pytest.raises(NumallmError, match="--numa spread: unknown strategy"):
        numallm.load(path, n_ctx=16, numa="spread")
    with pytest.raises(NumallmError, match=r"--nodes 0,7: node\(s\) 7 have no CPUs"):
        numallm.load(path, n_ctx=16, numa="shard", nodes=[0, 7])


STORIES = Path(__file__).resolve().parents[1].parent / "shared" / "models" / "stories260K.gguf"
needs_stories = pytest.mark.skipif(not STORIES.exists(), reason=f"{STORIES} absent")


def cli(*argv, stdin=None):
    r = subprocess.run([sys.executable, "-m", "numallm", *argv], input=stdin, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return r


@two_cores
@needs_stories
def test_cli_run_shard_matches_off_on_stories():
    args = ["run", str(STORIES), "Once upon a time", "-n", "24", "--temp", "0", "--json"]
    off = json.loads(cli(*args).stdout)
    shard = json.loads(cli(*args, "--numa", "shard", "--virtual-nodes", "2").stdout)
    assert shard["tokens"] == off["tokens"] and "Lily" in shard["text"]


@two_cores
@needs_stories
def test_chat_stats_shows_per_node_placement():
    r = cli("chat", str(STORIES), "--numa", "shard", "--virtual-nodes", "2", "--temp", "0", "-n", "5",
            stdin="Hi\n/stats\n/bye\n")
    assert "numa: shard over 2 virtual node(s)" in r.stdout
    for node in (0, 1):
        assert re.search(rf"node {node}: 1 threads on CPUs \d+, \d+ slices, [\d.]+ MiB", r.stdout)


def test_bad_node_list_flag_is_a_usage_error():
    r = subprocess.run([sys.executable, "-m", "numallm", "run", "m.gguf", "x", "--nodes", "a,b"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "not a comma-separated list of node numbers" in r.stderr
