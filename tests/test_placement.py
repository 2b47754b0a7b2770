"""NUMA placement over virtual nodes: the sharded layer flow computes the same layers as --numa
off, heads stay whole with their KV cache on their node, threads stay on their node, every
slice's pages are on its memory node, and auto decides sensibly on fixture machines."""
import ctypes
import dataclasses
import errno
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
from numallm.gguf_file import GGUFFile
from numallm.models import get_module
from numallm.topology import discover, virtual_nodes

TOKENS = [1, 5, 9, 33, 70, 200, 7]
# Given the same input, a node's partial sums add up to the unsplit layer to float32 rounding.
PART_ATOL = 1e-4
# End to end the residual stream differs from --numa off at float32 rounding (partial sums are
# added in another order), and the int8 activation quantization of the q8act kernels turns a
# rounding difference that crosses a quantization step into a difference of one step: measured
# up to 1.4% of the largest logit on these 4-layer random models (0 for dense F16, whose kernel
# does not quantize activations). Row-only splits (replicate) change no sum: LOGIT_ATOL there.
LOGIT_RTOL = 0.03
LOGIT_ATOL = 1e-4
FIXTURES = Path(__file__).parent / "fixtures" / "topo"

two_cores = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 allowed CPUs")
needs_libnuma = pytest.mark.skipif(not numa_mem.status().available, reason=numa_mem.status().note)

# GQA 4:1 with 3 KV heads: 2 nodes get 2 and 1, 3 nodes one each
GQA3 = synth.ModelShape(vocab=512, hidden=768, n_layers=2, n_heads=12, n_kv_heads=3, n_ff=1536)


def model_path(synth_dir, arch, qtype, shape="tiny", **kw):
    if qtype.endswith("_K"):
        pytest.importorskip("llama_cpp", reason="synthetic K-quants need llama-cpp-python")
    return synth.cached_model(synth_dir, arch, qtype, shape, **kw)


def task_cpus(tid: int) -> set[int]:
    """Cpus_allowed_list of one thread, read back from the kernel."""
    with open(f"/proc/self/task/{tid}/status") as f:
        line = next(x for x in f if x.startswith("Cpus_allowed_list:"))
    out = set()
    for part in line.split(":", 1)[1].strip().split(","):
        a, _, b = part.partition("-")
        out.update(range(int(a), int(b or a) + 1))
    return out


def nodes_topology(n: int):
    """n virtual nodes of one core each on this machine; past the core count, more nodes share
    the first cores (enough to run and check a 3-node split on 2 cores)."""
    cores = len(os.sched_getaffinity(0))
    topo = virtual_nodes(discover(), min(n, cores))
    extra = tuple(dataclasses.replace(topo.nodes[i % cores], id=len(topo.nodes) + i)
                  for i in range(n - len(topo.nodes)))
    return dataclasses.replace(topo, nodes=topo.nodes + extra)


def build(path):
    return get_module(GGUFFile(path).architecture).Model(GGUFFile(path))


def all_logits(model, pool, tokens, pl=None) -> np.ndarray:
    cache = model.new_cache(64) if pl is None else pl.adopt_cache(model.new_cache(64))
    with threads.activate(pool):
        return model(np.asarray(tokens), cache, 0, last_only=False)


def assert_same_up_to_rounding(off, shard, off_logits, shard_logits, n=12):
    """Logits within LOGIT_RTOL of the largest; greedy tokens identical, except after a near tie
    of off's top two logits (closer than the tolerance), which rounding may break either way."""
    tol = LOGIT_RTOL * np.abs(off_logits).max()
    np.testing.assert_allclose(shard_logits, off_logits, rtol=0, atol=tol)
    want = off.generate(TOKENS, n, temperature=0).tokens
    got = shard.generate(TOKENS, n, temperature=0).tokens
    if got != want:
        d = next(i for i, (a, b) in enumerate(zip(got, want)) if a != b)
        top = np.sort(off.logits(TOKENS + want[:d])[-1])
        assert top[-1] - top[-2] < tol, f"tokens differ at {d} without a near tie"


def test_split_units_is_proportional_and_complete():
    assert placement.split_units(10, [1, 1]) == [(0, 5), (5, 10)]
    assert placement.split_units(10, [3, 1]) == [(0, 8), (8, 10)]      # 7.5/2.5: remainder to 0
    assert placement.split_units(7, [1, 1, 1]) == [(0, 3), (3, 5), (5, 7)]
    assert placement.split_units(1, [1, 1]) == [(0, 1), (1, 1)]          # a node may get nothing
    for n in (0, 1, 13, 4096):
        r = placement.split_units(n, [5, 2, 3])
        assert r[0][0] == 0 and r[-1][1] == n and all(a[1] == b[0] for a, b in zip(r, r[1:]))


def test_heads_per_unit_keeps_attn_output_columns_in_whole_blocks():
    assert placement.heads_per_unit(32, 8, 64, 256) == 1        # 4 query heads x 64 = 256
    assert placement.heads_per_unit(32, 32, 64, 256) == 4       # MHA: 4 heads per K-quant block
    assert placement.heads_per_unit(32, 32, 64, 32) == 1
    assert placement.heads_per_unit(14, 2, 64, 32) == 1         # 7 x 64 = 448 = 14 blocks
    assert placement.heads_per_unit(24, 4, 32, 256) == 4        # 6 x 32 = 192: only all 4 heads


COMBOS = [("llama", "Q4_0", "tiny"), ("qwen2", "Q8_0", "tiny"), ("qwen3", "F16", "tiny"),
          ("llama", "Q4_K", "tiny"), ("qwen3", "Q6_K", "tiny"), ("qwen2", "Q4_0", GQA3),
          ("llama", "Q4_K", GQA3)]


@two_cores
@pytest.mark.parametrize("n_nodes", [2, 3])
@pytest.mark.parametrize("arch,qtype,shape", COMBOS)
def test_node_partials_add_up_to_the_layer(synth_dir, arch, qtype, shape, n_nodes):
    """Each node's attn / ffn partial (its heads with their KV cache, its ff rows) adds up to the
    unsplit block's, for a prefill and then a decode step that reads the node-local cache."""
    path = model_path(synth_dir, arch, qtype, shape)
    off, model = build(path), build(path)
    pl = placement.apply(model, nodes_topology(n_nodes), "shard")
    try:
        x = np.random.default_rng(1).standard_normal((6, off.args.n_embd)).astype(np.float32)
        for blk, sb in zip(off.blk, pl.blocks):
            ref = ops.KVCache(16, off.args.n_head_kv, off.args.head_dim)
            cache = sb.make_cache(ref)
            for pos0, xs in ((0, x[:5]), (5, x[5:])):
                want_a, want_f = blk.attn(xs, ref, pos0), blk.ffn(xs)
                with threads.activate(pl.pool):
                    got_a = [v.attn(xs, c, pos0) for v, c, (h0, h1) in zip(sb.views, cache.parts, sb.heads)
                             if h1 > h0]
                    got_f = [v.ffn(xs) for v, (f0, f1) in zip(sb.views, sb.ff) if f1 > f0]
                np.testing.assert_allclose(sum(got_a), want_a, rtol=0, atol=PART_ATOL)
                np.testing.assert_allclose(sum(got_f), want_f, rtol=0, atol=PART_ATOL)
    finally:
        pl.close()


@two_cores
@pytest.mark.parametrize("arch,qtype", [("llama", "Q4_0"), ("qwen2", "Q8_0"), ("qwen3", "F16"),
                                        ("llama", "Q4_K"), ("qwen3", "Q6_K")])
def test_shard_matches_off(synth_dir, arch, qtype):
    path = model_path(synth_dir, arch, qtype)
    # F16: float32 KV too, so only the sums' order differs (an f16 cache turns a float32
    # difference at a rounding boundary into one f16 step, ~5e-4 relative, past LOGIT_ATOL)
    kv = dict(cache_type_k="f32", cache_type_v="f32") if qtype == "F16" else {}
    with numallm.load(path, n_ctx=64, **kv) as off, \
            numallm.load(path, n_ctx=64, numa="shard", virtual_nodes=2, **kv) as shard:
        assert all(isinstance(m, placement.ShardedLinear) for m in shard.model.linears())
        # each layer is a ShardedBlock running the block class's own forward over its halves,
        # and no method of the block is shadowed by an instance attribute
        blk, sb = shard.model.blk[1], shard.placement.blocks[1]
        assert blk is sb and sb.block_class is type(off.model.blk[1])
        assert not {"attn", "ffn", "__call__"} & set(vars(sb.flat)) and "attn" not in vars(sb)
        assert shard.weight_bytes == off.weight_bytes
        assert_same_up_to_rounding(off, shard, off.logits(TOKENS), shard.logits(TOKENS))
        if qtype == "F16":     # no activation quantization: rounding only
            np.testing.assert_allclose(shard.logits(TOKENS), off.logits(TOKENS), rtol=0, atol=LOGIT_ATOL)


@two_cores
@pytest.mark.parametrize("arch,qtype", [("qwen2", "Q4_0"), ("llama", "Q4_K")])
def test_three_nodes_with_uneven_kv_heads_match_off(synth_dir, arch, qtype):
    path = model_path(synth_dir, arch, qtype, GQA3)
    off, model = build(path), build(path)
    off_pool = threads.RowPool(1)
    pl = placement.apply(model, nodes_topology(3), "shard")
    try:
        assert pl.blocks[0].heads == [(0, 1), (1, 2), (2, 3)]
        want, got = all_logits(off, off_pool, TOKENS), all_logits(model, pl.pool, TOKENS, pl)
        np.testing.assert_allclose(got, want, rtol=0, atol=LOGIT_RTOL * np.abs(want).max())
        assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.8
    finally:
        pl.close()
        off_pool.close()


@two_cores
def test_heads_stay_whole_and_every_row_and_column_is_covered(synth_dir):
    with numallm.load(model_path(synth_dir, "llama", "Q4_K", GQA3), n_ctx=16, numa="shard",
                      virtual_nodes=2) as llm:
        a = llm.args
        group, hd = a.n_head // a.n_head_kv, a.head_dim
        for sb in llm.placement.blocks:
            assert sb.heads == [(0, 2), (2, 3)]                     # 3 KV heads over 2 nodes
            for v, (h0, h1), (f0, f1), c in zip(sb.views, sb.heads, sb.ff, llm.cache[sb.layer].parts):
                assert (v.attn_k.a, v.attn_k.b) == (h0 * hd, h1 * hd) == (v.attn_v.a, v.attn_v.b)
                assert (v.attn_q.a, v.attn_q.b) == (h0 * group * hd, h1 * group * hd)
                assert (v.attn_output.axis, v.attn_output.a, v.attn_output.b) == (1, v.attn_q.a, v.attn_q.b)
                assert (v.ffn_gate.a, v.ffn_gate.b) == (v.ffn_up.a, v.ffn_up.b) == (f0, f1)
                assert (v.ffn_down.axis, v.ffn_down.a, v.ffn_down.b) == (1, f0, f1)
                assert f0 % 256 == 0 and v.attn_output.a % 256 == 0     # whole Q4_K blocks
                assert (v.a.n_head_kv, v.a.n_head, v.a.n_ff) == (h1 - h0, (h1 - h0) * group, f1 - f0)
                assert c.k.a.shape == c.v.a.shape == (h1 - h0, 16, hd)       # its heads' cache only
        for lin in llm.model.linears():
            cover = [(p.a, p.b) for p in lin.parts]
            assert cover[0][0] == 0 and cover[-1][1] == lin.shape[lin.parts[0].axis]
            assert all(p[1] == n[0] for p, n in zip(cover, cover[1:]))
            assert sum(p.nbytes for p in lin.parts) == lin.nbytes
            held = sum(a.nbytes for p in lin.parts for a in p.arrays)     # one copy (+ row padding)
            assert lin.nbytes <= held < 1.1 * lin.nbytes
            assert lin.raw is None


@two_cores
def test_qwen2_biases_follow_their_heads(synth_dir):
    with numallm.load(model_path(synth_dir, "qwen2", "Q4_0", GQA3), n_ctx=16, numa="shard",
                      virtual_nodes=2) as llm, \
            numallm.load(model_path(synth_dir, "qwen2", "Q4_0", GQA3), n_ctx=16) as off:
        blk, sb = off.model.blk[0], llm.placement.blocks[0]
        for v in sb.views:
            np.testing.assert_array_equal(v.attn_q_bias, blk.attn_q_bias[v.attn_q.a:v.attn_q.b])
            np.testing.assert_array_equal(v.attn_k_bias, blk.attn_k_bias[v.attn_k.a:v.attn_k.b])


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
        # node 0: the caller and one worker; node 1: its leader and one worker
        assert len(pool.native_ids(0)) == 1 and len(pool.native_ids(1)) == 2
        for node in (0, 1):
            for tid in pool.native_ids(node):
                assert task_cpus(tid) == node_cpus[node]
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

        # every row range of every product goes through matmul_x (prefill and decode) once the
        # unit hands out no native tasks (those run inside Numba, on the same pool threads)
        monkeypatch.setattr(unit, "native_task", lambda *a: None)
        monkeypatch.setattr(unit, "matmul_x", lambda w, *a: (record(w), real_matmul_x(w, *a))[1])
        llm.generate(TOKENS, 4, temperature=0)
    # every matrix slice but the embedding (read by row lookup, not matvec) was computed
    embd = {id(p.w) for p in llm.model.token_embd.parts}
    assert len(seen) > 100 and {w for w, _, _ in seen} == set(owner) - embd
    for w, cpu, allowed in seen:
        assert cpu in owner[w] and allowed == owner[w]


@two_cores
def test_cross_node_joins_per_layer(synth_dir):
    """Prefill: each node's leader runs a half-layer, 2 joins per layer; decode: flat native
    dispatches, 5 per layer (q/k/v, attention, attn_output, gate/up, ffn_down); +1 per forward
    for the output matrix."""
    with numallm.load(model_path(synth_dir, "llama", "Q4_0"), n_ctx=32, numa="shard",
                      virtual_nodes=2) as llm:
        n = llm.args.n_layer
        before = llm.placement.sync_stats()
        llm.generate(TOKENS, 1, temperature=0)           # 1 prefill
        mid = llm.placement.sync_stats()
        assert (mid - before).joins == 2 * n + 1
        llm.generate(TOKENS + [1, 2], 3, temperature=0)  # 2 new prompt tokens + 2 decode forwards
        st = llm.placement.sync_stats() - mid
        assert st.joins == (2 * n + 1) + 2 * (5 * n + 1)
        assert 0 < st.slowest_s <= st.wall_s and st.exchange_s > 0
        assert "decode 5 per layer + 1 per token" in llm.placement.summary()


@two_cores
@needs_libnuma
def test_every_slice_and_kv_page_is_verified_local(synth_dir):
    with numallm.load(model_path(synth_dir, "qwen2", "Q4_0"), n_ctx=64, numa="shard",
                      virtual_nodes=2) as llm:
        node = numa_mem.status().nodes[0]
        rep = llm.placement.report()
        assert len(rep) == 2 * len(llm.model.linears())
        assert {r.mem_node for r in rep} == {node}
        assert all(r.local == 1.0 for r in rep)
        kv = llm.placement.kv_report()
        assert len(kv) == 2 * llm.args.n_layer and all(k.local is None for k in kv)   # none written
        c = llm.cache[0].parts[1]
        assert not any(a.any() for a in c.arrays)       # fresh node pages read as zeros
        llm.generate(TOKENS, 4, temperature=0)
        for cache in llm.cache:
            for part in cache.parts:
                for a in part.arrays:
                    counts = numa_mem.where(a)
                    # -EFAULT: the shared zero page, for pages read (by .any() above) but not written
                    assert counts.get(node, 0) > 0
                    assert set(counts) <= {node, numa_mem.NOT_PRESENT, -errno.EFAULT}
        assert all(k.local == 1.0 for k in llm.placement.kv_report())
        text = llm.placement.summary()
        assert "100% local pages" in text and "WARNING" not in text and "virtual" in text
        assert "100% of written pages local" in text


def test_isolate_uses_one_node_and_off_changes_nothing(synth_dir):
    path = model_path(synth_dir, "llama", "Q4_0")
    with numallm.load(path, n_ctx=16, numa="isolate") as iso, numallm.load(path, n_ctx=16) as off:
        assert len(iso.placement.groups) == 1
        assert all(len(m.parts) == 1 for m in iso.model.linears())
        assert type(off.model.blk[0].ffn_up) is ops.Linear and off.placement.report() == []
        assert "numa: off" in off.placement.summary() and off.placement.sync_stats() is None
        np.testing.assert_allclose(iso.logits(TOKENS), off.logits(TOKENS), rtol=0, atol=LOGIT_ATOL)
        assert iso.generate(TOKENS, 4, temperature=0).tokens == off.generate(TOKENS, 4, temperature=0).tokens


@two_cores
def test_replicate_holds_a_copy_per_node_and_matches_off_exactly(synth_dir):
    path = model_path(synth_dir, "qwen2", "Q4_K")
    with numallm.load(path, n_ctx=64, numa="replicate", virtual_nodes=2) as rep, \
            numallm.load(path, n_ctx=64) as off:
        rows = rep.placement.report()
        for g in rep.placement.groups:
            assert sum(r.nbytes for r in rows if r.node == g.node) >= rep.weight_bytes
        # rows only are split: every dot product is the unsplit one
        np.testing.assert_allclose(rep.logits(TOKENS), off.logits(TOKENS), rtol=0, atol=LOGIT_ATOL)
        assert rep.generate(TOKENS, 8, temperature=0).tokens == off.generate(TOKENS, 8, temperature=0).tokens
        assert "4 per layer" in rep.placement.summary()


def test_replicate_refuses_when_copies_do_not_fit(synth_dir, monkeypatch):
    real = virtual_nodes

    def starved(topo, n):
        t = real(topo, n)
        return dataclasses.replace(t, nodes=tuple(dataclasses.replace(nd, mem_free_bytes=1 << 20)
                                                  for nd in t.nodes))
    monkeypatch.setattr("numallm.topology.virtual_nodes", starved)
    with pytest.raises(NumallmError, match=r"--numa replicate: node 0 needs [\d.]+ GiB .* has 0.0 GiB "
                                           r"free; use --numa shard"):
        numallm.load(model_path(synth_dir, "llama", "Q4_0"), n_ctx=16, numa="replicate", virtual_nodes=1)


def test_bad_strategy_and_node_are_one_line_errors(synth_dir):
    path = model_path(synth_dir, "llama", "Q4_0")
    with pytest.raises(NumallmError, match="--numa spread: unknown strategy; use one of auto, off"):
        numallm.load(path, n_ctx=16, numa="spread")
    with pytest.raises(NumallmError, match=r"--nodes 0,7: node\(s\) 7 have no CPUs"):
        numallm.load(path, n_ctx=16, numa="shard", nodes=[0, 7])


def test_node_pools_run_each_thread_on_its_node_and_raise_worker_errors():
    cpus = sorted(os.sched_getaffinity(0))
    pools = threads.NodePools([cpus[:1], cpus[-1:]], [2, 1])
    try:
        assert pools.n_threads == 3 and len(pools.cpus) == 3
        assert list(pools.tids(0)) == [0, 1] and list(pools.tids(1)) == [2]
        seen = {}

        def note(i):
            seen[i] = (threading.get_native_id(), os.sched_getaffinity(0))
        with threads.activate(pools):
            pools.run_each([lambda i=i: note(i) for i in range(3)])
            assert pools.joins == 1 and len({tid for tid, _ in seen.values()}) == 3
            assert seen[0][1] == seen[1][1] == {cpus[0]} and seen[2][1] == {cpus[-1]}
            pools.run_each([lambda: note(5)])                    # fewer calls than threads
            assert 5 in seen and pools.joins == 2

            def boom():
                raise RuntimeError("node 1 failed")
            with pytest.raises(RuntimeError, match="node 1 failed"):
                pools.run_nodes([None, boom])
    finally:
        pools.close()


# -- auto ------------------------------------------------------------------------------------------

def needs(gib=38.0, n_kv=8, per=1, layers=80):
    return placement.Needs(int(gib * 2**30), 327_680, layers, n_kv, per)


def fixture(name):
    return discover(str(FIXTURES / name))


def test_auto_is_off_on_one_node_and_isolate_on_one_chosen_node():
    assert placement.decide(needs(), fixture("vm_1node"), 4096) == ("off", "numa auto: off (one NUMA node)")
    assert placement.decide(needs(), fixture("cxl_memonly"), 4096)[0] == "off"     # one node has CPUs
    strategy, why = placement.decide(needs(), fixture("xeon6254_4s"), 4096, nodes=[2])
    assert (strategy, why) == ("isolate", "numa auto: isolate (node 2 only)")


def test_auto_shards_a_big_model_whose_heads_spread():
    strategy, why = placement.decide(needs(38), fixture("epyc9554_nps4"), 4096)
    assert strategy == "shard"
    assert why == "numa auto: shard (8 nodes, a 38 GiB model: ~4.8 GiB and its heads' KV cache per node)"


def test_auto_replicates_when_few_kv_heads_cannot_spread_and_copies_fit():
    strategy, why = placement.decide(needs(4, n_kv=2), fixture("xeon6254_4s"), 4096)
    assert strategy == "replicate"
    assert ("2 KV heads in groups of 1 cannot be spread evenly: node 0 would do 50% of the attention "
            "with 25% of the threads") in why and "4 GiB copy per node fits" in why
    # the same model on a machine with a nearly full node: no copy there, so shard
    strategy, why = placement.decide(needs(4, n_kv=2), fixture("epyc9554_nps4"), 4096)
    assert strategy == "shard" and "does not fit in half of every node's free memory" in why


def test_auto_isolates_a_model_too_small_to_gain_from_more_nodes():
    strategy, why = placement.decide(needs(0.001, layers=5), fixture("xeon6254_4s"), 512)
    assert strategy == "isolate"
    joins_ms = re.escape(f"{26 * placement.JOIN_COST_S * 1e3:.2f}")   # 5 per layer + 1
    assert re.fullmatch(r"numa auto: isolate \(a 0\.001 GiB model: one node reads it in ~[\d.]+ ms per "
                        rf"token, 4 nodes would save less than the ~{joins_ms} ms per token their 26 joins "
                        r"cost\)", why)


def test_auto_counts_threads_not_cores_when_threads_are_given():
    # -t 4 on 4 nodes: one thread each; --threads-per-node overrides
    strategy, _ = placement.decide(needs(4, n_kv=8), fixture("xeon6254_4s"), 4096, n_threads=4)
    assert strategy == "shard"
    strategy, why = placement.decide(needs(4, n_kv=8), fixture("xeon6254_4s"), 4096, n_threads=2)
    assert strategy == "shard" and "2 nodes" in why             # 2 threads reach 2 nodes only


def test_auto_on_this_machine_is_off_and_loads_like_off(synth_dir):
    if len(discover().cpu_nodes) != 1:
        pytest.skip("this machine has several NUMA nodes")
    with numallm.load(model_path(synth_dir, "llama", "Q4_0"), n_ctx=16, numa="auto") as llm:
        assert llm.placement.strategy == "off" and llm.placement.reason == "numa auto: off (one NUMA node)"


# -- CLI ---------------------------------------------------------------------------------------------

STORIES = Path(__file__).resolve().parents[1].parent / "shared" / "models" / "stories260K.gguf"
needs_stories = pytest.mark.skipif(not STORIES.exists(), reason=f"{STORIES} absent")


def cli(*argv, stdin=None):
    r = subprocess.run([sys.executable, "-m", "numallm", *argv], input=stdin, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return r


def test_cli_numa_choices_are_placements():
    from numallm.commands import common
    assert common.STRATEGIES == placement.STRATEGIES


@two_cores
@needs_stories
def test_cli_run_shard_matches_off_on_stories():
    args = ["run", str(STORIES), "Once upon a time", "-n", "24", "--temp", "0", "--json"]
    off = cli(*args)
    shard = cli(*args, "--numa", "shard", "--virtual-nodes", "2")
    assert json.loads(shard.stdout)["tokens"] == json.loads(off.stdout)["tokens"]
    assert "Lily" in json.loads(shard.stdout)["text"]
    assert off.stderr == "" and shard.stderr == ""


@two_cores
@needs_stories
def test_cli_auto_says_why():
    r = cli("run", str(STORIES), "Once", "-n", "4", "--temp", "0", "--numa", "auto", "--virtual-nodes", "2")
    assert re.search(r"^numallm: numa auto: isolate \(a [\d.e-]+ GiB model: one node reads it",
                     r.stderr, re.M)


@two_cores
@needs_stories
def test_chat_stats_shows_per_node_placement():
    r = cli("chat", str(STORIES), "--numa", "shard", "--virtual-nodes", "2", "--temp", "0", "-n", "5",
            stdin="Hi\n/stats\n/bye\n")
    assert "numa: shard over 2 virtual node(s)" in r.stdout
    for node in (0, 1):
        assert re.search(rf"node {node}: 1 threads on CPUs \d+, \d+ slices, [\d.]+ MiB", r.stdout)
    assert "KV cache of its heads" in r.stdout and "cross-node joins" in r.stdout


def test_bad_node_list_flag_is_a_usage_error():
    r = subprocess.run([sys.executable, "-m", "numallm", "run", "m.gguf", "x", "--nodes", "a,b"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "not a comma-separated list of node numbers" in r.stderr


# -- with the GPU offload ----------------------------------------------------------------------------

@two_cores
def test_layers_left_on_the_cpu_by_the_gpu_offload_are_sharded(synth_dir, tmp_path, monkeypatch):
    """blk.1 on a (simulated) GPU, blk.0 sharded over 2 virtual nodes: the offload's bookkeeping
    still sees blk.0 run on the CPU, and tokens match the CPU-only run (float kernels, so the
    partial sums differ from it by float32 rounding only)."""
    cuda = pytest.importorskip("numba.cuda")
    if not cuda.is_available():
        pytest.skip("no CUDA device and the simulator is off")
    from numallm.gpu import OffloadRequest
    import numallm_kernels as nk

    gpus = tmp_path / "gpus.json"
    gpus.write_text(json.dumps([{"name": "NVIDIA GeForce RTX 3060", "compute_capability": "8.6",
                                 "mem_total": "12GiB"}]))
    monkeypatch.setenv("NUMALLM_FAKE_GPUS", str(gpus))
    monkeypatch.setenv("NUMALLM_KERNEL", "blas-tile")
    for t in nk.registered_types():
        if nk.get(t).calibrated:
            monkeypatch.setattr(nk.get(t), "_choice", None)
    shape = dict(vocab=320, hidden=64, n_layers=2, n_heads=4, n_kv_heads=2, n_ff=128, ctx=256)
    path = synth.cached_model(synth_dir, "llama", "Q4_0", shape)
    with numallm.load(path, n_ctx=32, n_threads=1) as ref:
        want = ref.generate(TOKENS, 4, temperature=0).tokens
    with numallm.load(path, n_ctx=32, numa="shard", virtual_nodes=2,
                      offload=OffloadRequest(gpu_layers=1)) as llm:
        assert llm.offload.applied and [b.layer for b in llm.placement.blocks] == [0]
        assert isinstance(llm.cache[0], placement.NodeCaches)
        assert not isinstance(llm.cache[1], placement.NodeCaches)        # the GPU's own cache
        assert llm.generate(TOKENS, 4, temperature=0).tokens == want
        assert llm.offload.where() == [("blk.0", "CPU", 4), ("blk.1", "GPU 0", 4)]
