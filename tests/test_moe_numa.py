"""Mixture-of-Experts models over NUMA nodes: `--numa shard` splits every expert's feed-forward
over the nodes (one copy of the weights, each node's share in its memory) and gives `off`'s
greedy tokens; `replicate` gives every node a whole copy of the experts."""
from __future__ import annotations

import numpy as np
import pytest

import numallm
from numallm import ops, synth
from numallm.placement.experts import LocalExperts, ShardedExperts

from test_placement import TOKENS, assert_same_up_to_rounding, two_cores

EXPERTS = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")
CASES = [("qwen3moe", "F16"), ("qwen2moe", "Q8_0"), ("llama", "Q8_0")]


def moe_path(synth_dir, arch, qtype):
    return synth.cached_model(synth_dir, arch=arch, qtype=qtype, shape="tiny-moe", seed=7)


@two_cores
@pytest.mark.parametrize("arch,qtype", CASES, ids=[f"{a}-{q}" for a, q in CASES])
def test_moe_shard_matches_off(synth_dir, arch, qtype):
    path = moe_path(synth_dir, arch, qtype)
    # F16: float32 KV too, so only the sums' order differs (as test_placement's F16 case)
    kv = dict(cache_type_k="f32", cache_type_v="f32") if qtype == "F16" else {}
    with numallm.load(path, n_ctx=64, **kv) as off, \
            numallm.load(path, n_ctx=64, numa="shard", virtual_nodes=2, **kv) as shard:
        sb = shard.placement.blocks[0]
        assert shard.model.blk[0] is sb
        for name in EXPERTS:                      # each node its slice of every expert
            rec = getattr(sb, name)
            assert isinstance(rec, ShardedExperts) and [p.group for p in rec.parts] == [0, 1]
            assert all(isinstance(getattr(v, name), LocalExperts) for v in sb.views)
        assert_same_up_to_rounding(off, shard, off.logits(TOKENS), shard.logits(TOKENS))
        if qtype == "F16":       # no activation quantization: the partial sums' rounding only
            np.testing.assert_allclose(shard.logits(TOKENS), off.logits(TOKENS), rtol=0, atol=1e-4)


@two_cores
def test_every_expert_slice_is_on_its_node_once(synth_dir):
    """The report lists each node's slice of each expert tensor, its pages on the node's memory;
    the slices of a tensor cover its ff rows (gate/up) or columns (down) exactly once and hold
    its bytes once between them; the build's whole copy is gone."""
    path = moe_path(synth_dir, "qwen2moe", "Q8_0")
    with numallm.load(path, n_ctx=16, numa="shard", virtual_nodes=2) as llm:
        a, pl = llm.args, llm.placement
        llm.generate(TOKENS, 2, temperature=0)
        rep = pl.report()
        for layer, sb in enumerate(pl.blocks):
            for name, width in [(n, a.n_ff_exp) for n in EXPERTS] + \
                    [(f"ffn_{n}_shexp", a.n_ff_shexp) for n in ("gate", "up", "down")]:
                full = f"blk.{layer}.{name}.weight"
                mine = [r for r in rep if r.tensor == full]
                assert sorted(r.node for r in mine) == [0, 1], full
                spans = sorted((r.cols if "down" in name else r.rows) for r in mine)
                assert spans[0][0] == 0 and spans[0][1] == spans[1][0] and spans[1][1] == width
                rec = getattr(sb, name)
                assert sum(r.nbytes for r in mine) == rec.nbytes, full       # one copy
                assert all(r.local in (None, 1.0) for r in mine)
                if isinstance(rec, ShardedExperts):
                    assert rec.ws is None and all(len(p.ws) == a.n_expert for p in rec.parts)
        # the plan's bytes per node: about half the weights each, the experts once in all
        plan = pl.plan
        total = sum(n.weights for n in plan.nodes)
        routers = sum(r.nbytes for r in rep if "ffn_gate_inp." in r.tensor)
        assert total == pytest.approx(llm.weight_bytes + routers / 2, rel=0.01)
        assert max(n.weights for n in plan.nodes) < 0.6 * llm.weight_bytes


@two_cores
def test_moe_replicate_copies_experts_and_matches_off(synth_dir):
    path = moe_path(synth_dir, "qwen3moe", "F16")
    with numallm.load(path, n_ctx=64) as off, \
            numallm.load(path, n_ctx=64, numa="replicate", virtual_nodes=2) as rep:
        rec = rep.model.blk[0].ffn_gate_exps
        assert isinstance(rec, ShardedExperts) and all(p.full for p in rec.parts)
        assert [p.nbytes for p in rec.parts] == [rec.nbytes] * 2     # a whole copy per node
        np.testing.assert_allclose(rep.logits(TOKENS), off.logits(TOKENS), rtol=0, atol=1e-4)
        assert rep.generate(TOKENS, 8, temperature=0).tokens == off.generate(TOKENS, 8, temperature=0).tokens


@two_cores
@pytest.mark.parametrize("numa", ["off", "shard", "replicate"])
def test_decode_replay_matches_the_encoded_dispatch(synth_dir, numa, monkeypatch):
    """A decode step's routed feed-forward replayed from its encoded tables (each task pointed at
    the expert its slot got) equals the dispatch encoded for the token, for many routings."""
    from numallm import experts, threads

    path = moe_path(synth_dir, "qwen2moe", "Q8_0")
    kw = {"n_threads": 2} if numa == "off" else {"numa": numa, "virtual_nodes": 2}
    rng = np.random.default_rng(3)
    with numallm.load(path, n_ctx=16, **kw) as llm:
        blk = llm.model.blk[1]
        a = llm.args
        gate, up, down = blk.ffn_gate_exps, blk.ffn_up_exps, blk.ffn_down_exps
        with threads.activate(llm.pool):
            for _ in range(6):
                x = rng.standard_normal((1, a.n_embd)).astype(np.float32)
                ids = rng.permutation(a.n_expert)[:a.n_expert_used][None]        # (1, k)
                w = rng.random((1, a.n_expert_used)).astype(np.float32)
                got = ops.moe_ffn(x, ids, w, gate, up, down)
                assert experts._replay(x, a.n_expert_used, gate, up, down, gate.pool()) is not None
                with monkeypatch.context() as m:
                    m.setattr(experts, "_replay", lambda *args: None)
                    want = ops.moe_ffn(x, ids, w, gate, up, down)
                np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())


@two_cores
@pytest.mark.parametrize("arch,qtype", CASES, ids=[f"{a}-{q}" for a, q in CASES])
def test_whole_experts_per_node_match_off(synth_dir, arch, qtype):
    """--moe-split experts: node i holds experts [a, b) whole (its memory holds their bytes once,
    the other node's none of them), prefill and decode give off's logits and greedy tokens."""
    path = moe_path(synth_dir, arch, qtype)
    # F16: the exact comparison needs float32 caches (a float32-level difference can move an f16
    # cache entry by one step, ~5e-4 in the logits, as in test_shard_matches_off)
    kv = dict(cache_type_k="f32", cache_type_v="f32") if qtype == "F16" else {}
    with numallm.load(path, n_ctx=64, **kv) as off, \
            numallm.load(path, n_ctx=64, numa="shard", virtual_nodes=2, moe_split="experts",
                         **kv) as ep:
        n_exp = ep.args.n_expert
        assert ep.plan.splits["experts"] == [(0, n_exp // 2), (n_exp // 2, n_exp)]
        sb = ep.placement.blocks[0]
        for name in EXPERTS:
            rec = getattr(sb, name)
            assert [p.experts for p in rec.parts] == [(0, n_exp // 2), (n_exp // 2, n_exp)]
            for p in rec.parts:
                e0, e1 = p.experts
                assert all((w is None) == (not e0 <= e < e1) for e, w in enumerate(p.ws))
                assert p.shape == rec.shape and p.nbytes == rec.nbytes // 2
        assert_same_up_to_rounding(off, ep, off.logits(TOKENS), ep.logits(TOKENS))
        if qtype == "F16":
            np.testing.assert_allclose(ep.logits(TOKENS), off.logits(TOKENS), rtol=0, atol=1e-4)


def test_moe_split_auto_says_ff_and_why(synth_dir):
    from numallm.engine import plan_model
    from numallm.errors import NumallmError
    from numallm.placement import Request

    path = moe_path(synth_dir, "llama", "Q8_0")
    plan = plan_model(path, Request(numa="shard", n_ctx=64), 2)[2]
    assert "experts" not in plan.splits and plan.reason.startswith("moe split auto: ff (")
    plan = plan_model(path, Request(numa="shard", n_ctx=64, moe_split="experts"), 2)[2]
    assert plan.splits["experts"] == [(0, 4), (4, 8)] and plan.reason is None
    assert plan_model(path, Request(numa="off", n_ctx=64, moe_split="experts"))[2].reason is None   # one node
    with pytest.raises(NumallmError, match="--moe-split tensor"):
        Request(numa="shard", n_ctx=64, moe_split="tensor")
