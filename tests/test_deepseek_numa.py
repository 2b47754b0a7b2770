"""DeepSeek (MLA) over NUMA nodes: `--numa shard` gives each node whole MLA heads (their rows of
attn_q / attn_q_b, their absorbed per-head products, their attn_output columns) and a whole copy
of the latent cache, written on every node; experts as in the MoE shard. Greedy tokens equal
`off`'s on the deepseek2 fixtures, pages on their nodes."""
from __future__ import annotations

import numpy as np
import pytest

import numallm
from numallm import synth_deepseek
from numallm_kernels import _native
from numallm.placement.heads import LocalHeads, ShardedHeads

from test_placement import TOKENS, assert_same_up_to_rounding, two_cores

CASES = [("tiny-v2-lite", "F16"), ("tiny-v3", "Q8_0"), ("tiny-v3-kb", "F16")]


@two_cores
@pytest.mark.parametrize("shape,qtype", CASES, ids=[f"{s}-{q}" for s, q in CASES])
def test_mla_shard_matches_off(synth_dir, shape, qtype):
    path = synth_deepseek.cached_deepseek(synth_dir, qtype, shape, seed=0)
    with numallm.load(path, n_ctx=64) as off, \
            numallm.load(path, n_ctx=64, numa="shard", virtual_nodes=2) as shard:
        a = shard.args
        for sb in shard.placement.blocks:
            assert sb.mla and sb.heads == [(0, a.n_head // 2), (a.n_head // 2, a.n_head)]
            for name in ("attn_uk", "attn_uv"):
                rec = getattr(sb, name)
                assert isinstance(rec, ShardedHeads) and [p.group for p in rec.parts] == [0, 1]
                assert all(isinstance(getattr(v, name), LocalHeads) and getattr(v, name).shape[0] == 2
                           for v in sb.views)
        want = off.logits(TOKENS)
        assert_same_up_to_rounding(off, shard, want, shard.logits(TOKENS))
        assert shard.generate(TOKENS, 12, temperature=0).tokens == off.generate(TOKENS, 12, temperature=0).tokens
        if qtype == "F16":       # no activation quantization: the partial sums' rounding only
            np.testing.assert_allclose(shard.logits(TOKENS), want, rtol=0, atol=1e-4 * np.abs(want).max())


@two_cores
def test_mla_slices_and_latent_copies_are_local(synth_dir):
    """Every node's slices (MLA heads, absorbed products, experts) hold the weights once between
    them with their pages on the node's memory; each node has a whole latent cache of its own,
    written (decode writes every node's copy), its pages local."""
    path = synth_deepseek.cached_deepseek(synth_dir, "Q8_0", "tiny-v3", seed=0)
    with numallm.load(path, n_ctx=32, numa="shard", virtual_nodes=2) as llm:
        a, pl = llm.args, llm.placement
        llm.generate(TOKENS, 3, temperature=0)
        rep = pl.report()
        for layer, sb in enumerate(pl.blocks):
            for name in ("attn_q_b", "attn_output", "attn_uk", "attn_uv"):
                rec = getattr(sb, name)
                mine = [r for r in rep if r.tensor == rec.name]
                assert sorted(r.node for r in mine) == [0, 1], rec.name
                assert sum(r.nbytes for r in mine) == rec.nbytes
                assert all(r.local in (None, 1.0) for r in mine), rec.name
        kv = pl.kv_report()
        assert sorted((k.layer, k.node) for k in kv) == [(i, n) for i in range(a.n_layer) for n in (0, 1)]
        assert all(k.nbytes == 32 * a.kv_bytes_per_token() // a.n_layer for k in kv)  # whole latents
        assert all(k.local in (None, 1.0) for k in kv)
        for sb in pl.blocks:                                        # every copy written alike
            nc = sb._last_cache()
            c0, c1 = nc.parts
            assert c0.n == c1.n > len(TOKENS) and np.array_equal(c0.k.rows(c0.n), c1.k.rows(c1.n))
            assert (nc._table is not None) == _native.available()   # decode: the flat native path
        # the plan: ~half the weights per node, the latent cache on both
        plan = pl.plan
        assert max(n.weights for n in plan.nodes) < 0.62 * llm.weight_bytes
        assert [n.kv for n in plan.nodes] == [a.kv_bytes(32)] * 2


@two_cores
@pytest.mark.parametrize("numa", ["off", "shard"])
def test_head_products_replay_matches_the_encoded_dispatch(synth_dir, numa, monkeypatch):
    """A decode step's per-head product replayed from its encoded table (inputs refilled) equals
    the dispatch encoded for the token, input after input, on one pool and over the nodes."""
    from numallm import heads, ops, threads

    path = synth_deepseek.cached_deepseek(synth_dir, "Q8_0", "tiny-v3", seed=0)
    kw = {"n_threads": 2} if numa == "off" else {"numa": numa, "virtual_nodes": 2}
    rng = np.random.default_rng(4)
    with numallm.load(path, n_ctx=16, **kw) as llm:
        blk = llm.model.blk[1]
        with threads.activate(llm.pool):
            for w in (blk.attn_uk, blk.attn_uv):
                for _ in range(4):
                    x = rng.standard_normal((w.shape[0], 1, w.shape[2])).astype(np.float32)
                    got = ops.head_matmul(x, w)
                    assert heads._replay(x, w, w.pool()) is not None
                    with monkeypatch.context() as m:
                        m.setattr(heads, "_replay", lambda *args: None)
                        want = ops.head_matmul(x, w)
                    np.testing.assert_array_equal(got, want)
