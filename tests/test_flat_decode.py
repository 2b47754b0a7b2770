"""The pieces of the sharded decode step: a flat native dispatch over every node's threads
(NodePools.run_tasks / run_encoded), attention as a native task, column views of one encoded
input (Activations.columns), and a replayed dispatch with an exchange step."""
from __future__ import annotations

import os

import numpy as np
import pytest

import numallm_kernels as nk
from numallm import ops, placement, threads
from numallm.gguf_file import GGMLQuantizationType as T
from numallm_kernels import _native
from numallm_kernels.base import Activations

native = pytest.mark.skipif(not _native.available(), reason="no native kernel tasks on this CPU")


def _nodes(n_threads=(2, 1)) -> threads.NodePools:
    cpus = sorted(os.sched_getaffinity(0))
    return threads.NodePools([cpus] * len(n_threads), list(n_threads))


@native
def test_flat_dispatch_runs_every_share_and_counts_one_join():
    rng = np.random.default_rng(0)
    unit = nk.get(T.Q4_K)
    n, k = 8 * 21, 512
    w = unit.prepare(unit.synthetic(n, k, rng))
    acts = Activations(rng.standard_normal((1, k)).astype(np.float32))
    unit.prepare_x(acts)
    ref = np.zeros((1, n), np.float32)
    unit.matmul_x(w, acts, ref, 0, n)
    pools = _nodes()
    try:
        for n_shares in (3, 2, 1):
            out = np.zeros_like(ref)
            ranges = threads.split_rows(n, n_shares, 8)
            shares = [[ops.task(unit, w, acts, out, a, b)] for a, b in ranges]
            before = (pools.joins, pools.wall_s, pools.slowest_s)
            pools.run_tasks(shares)
            np.testing.assert_array_equal(out.view(np.uint32), ref.view(np.uint32))
            assert pools.joins == before[0] + 1                    # flat: one join, no leaders
            assert 0 < pools.slowest_s - before[2] <= pools.wall_s - before[1]
        out = np.zeros_like(ref)                                   # encoded once, run twice
        table, spans = pools.encode([[ops.task(unit, w, acts, out, a, b)]
                                     for a, b in threads.split_rows(n, 3, 8)])
        for _ in range(2):
            out[:] = 0
            pools.run_encoded(table, spans)
            np.testing.assert_array_equal(out.view(np.uint32), ref.view(np.uint32))
    finally:
        pools.close()


@native
@pytest.mark.parametrize("types", [("f32", "f32"), ("f16", "q8_0"), ("q8_0", "f16")],
                         ids=lambda ts: "-".join(ts))
@pytest.mark.parametrize("pos0", [0, 37])
def test_attention_task_equals_the_cache_attention(pos0, types):
    """Attention as native tasks over KV head ranges on several threads == ops' attention, for
    each cache type of K and V (the task's slot says which)."""
    rng = np.random.default_rng(1)
    n_kv, group, hd, n_ctx = 4, 3, 32, 64
    cache = ops.KVCache(n_ctx, n_kv, hd, type_k=types[0], type_v=types[1])
    for p in range(pos0):                                  # earlier positions
        k, v = rng.standard_normal((2, 1, n_kv, hd)).astype(np.float32)
        ops.attention(rng.standard_normal((1, n_kv * group, hd)).astype(np.float32), k, v, cache, p)
    q = rng.standard_normal((1, n_kv * group, hd)).astype(np.float32)
    k, v = rng.standard_normal((2, 1, n_kv, hd)).astype(np.float32)
    ref = ops.attention(q, k, v, cache, pos0)              # (1, n_head * hd)
    out = np.full_like(ref, np.nan)
    shares = []
    for g0, g1 in ((0, 1), (1, 3), (3, 4)):                # uneven KV head ranges
        a, b = g0 * group, g1 * group
        shares.append([_native.attention_task(q[:, a:b], *cache.k.part(g0, g1), *cache.v.part(g0, g1),
                                              out[:, a * hd:b * hd],
                                              np.empty((b - a, pos0 + 1), np.float32),
                                              pos0, 1 / np.sqrt(hd))])
    pools = _nodes()
    try:
        pools.run_tasks(shares)
    finally:
        pools.close()
    np.testing.assert_array_equal(out, ref)


@pytest.mark.parametrize("qt", [T.Q4_0, T.Q8_0, T.Q4_K, T.Q6_K, T.F16])
def test_column_views_of_one_encoding_give_the_column_product(qt):
    """A column part of a matrix times the columns view of the input's encoding == the same part
    times an encoding of just those columns, bit for bit; a refill keeps the views current."""
    rng = np.random.default_rng(2)
    unit = nk.get(qt)
    n, k, a, b = 16, 1024, 256, 768
    raw = unit.synthetic(n, k, rng)
    bs, ts = unit.block_size, unit.type_size
    part = unit.prepare(np.ascontiguousarray(raw[:, a // bs * ts:b // bs * ts]))
    acts = Activations(rng.standard_normal((1, k)).astype(np.float32))
    unit.prepare_x(acts)
    view = acts.columns(a, b)
    for _ in range(2):
        alone = Activations(np.ascontiguousarray(acts.x[:, a:b]))
        unit.prepare_x(alone)
        want = np.zeros((1, n), np.float32)
        unit.matmul_x(part, alone, want, 0, n)
        got = np.zeros((1, n), np.float32)
        unit.matmul_x(part, view, got, 0, n)
        np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
        if acts.makers:
            acts.refill(rng.standard_normal((1, k)).astype(np.float32))
        else:
            break
    with pytest.raises(ValueError):
        Activations(np.zeros((2, k), np.float32)).columns(a, b)     # one token only


@native
def test_replayed_column_split_matches_one_matrix():
    """A column-split ShardedLinear in a replayed decode dispatch (flat tasks + the exchange's
    sum) gives the unsplit product within float32 rounding, token after token."""
    rng = np.random.default_rng(3)
    unit = nk.get(T.Q4_K)
    n, k = 64, 1024
    raw = unit.synthetic(n, k, rng)

    class Q:                                   # what ops.Linear reads from a GGUF tensor
        qtype, data, name, shape, nbytes = T.Q4_K, raw, "m", (n, k), raw.nbytes

    lin = ops.Linear(Q())
    pools = _nodes((1, 1))
    try:
        ex = placement.Exchange()
        parts = [placement._slice(lin, i, 1, a, b, None) for i, (a, b) in enumerate([(0, 512), (512, 1024)])]
        sharded = placement.ShardedLinear(lin, parts, pools, ex, axis=1)
        with threads.activate(pools):
            for step in range(3):
                x = rng.standard_normal((1, k)).astype(np.float32)
                got = ops.matmuls(x, sharded)[0]
                want = np.zeros((1, n), np.float32)
                acts = Activations(x)
                unit.prepare_x(acts)
                unit.matmul_x(lin.w, acts, want, 0, n)
                np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
            assert any(r.ok and r.steps for r in sharded._replays.values())
    finally:
        pools.close()


@native
def test_f32_product_is_a_native_task_and_replays():
    """An F32 matrix (a MoE router) runs as a native task, so its decode dispatch is encoded once
    and replayed like the quantized ones: the same bits as the unit's matmul, each token's row as
    it gets alone, within float32 rounding of float64."""
    rng = np.random.default_rng(2)
    unit = nk.get(T.F32)
    n, k = 36, 520                                   # rows not a multiple of 4, K of 8
    w = unit.prepare(rng.standard_normal((n, k)).astype(np.float32).view(np.uint8))
    x = rng.standard_normal((5, k)).astype(np.float32)
    acts = Activations(x)
    unit.prepare_x(acts)
    ref = np.zeros((5, n), np.float32)
    unit.matmul_x(w, acts, ref, 0, n)
    exact = x.astype(np.float64) @ w.T.astype(np.float64)
    assert np.abs(ref - exact).max() < 1e-5 * np.abs(exact).max()
    one = np.zeros((1, n), np.float32)
    unit.matmul(w, x[3:4].copy(), one, 0, n)
    np.testing.assert_array_equal(one[0], ref[3])               # a token's row as it gets alone
    pools = _nodes()
    try:
        out = np.zeros_like(ref)
        tasks = [ops.task(unit, w, acts, out, a, b) for a, b in threads.split_rows(n, 3, 1)]
        assert all(type(t) is tuple for t in tasks)               # native, not Python calls
        table, spans = pools.encode([[t] for t in tasks])
        pools.run_encoded(table, spans)
        np.testing.assert_array_equal(out, ref)
        lin = ops.Linear.__new__(ops.Linear)                      # the router's decode dispatch
        lin.unit, lin.w, lin.shape, lin.name = unit, w, (n, k), "router"
        with threads.activate(pools):
            for t in range(3):
                got = ops.matmuls(x[t:t + 1], lin)[0]
                np.testing.assert_array_equal(got[0], ref[t])
        assert len(lin._replays) == 1 and next(iter(lin._replays.values())).ok
    finally:
        pools.close()
