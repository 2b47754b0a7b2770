"""The Numba per-token ops (numallm_kernels.fused, used by ops.py) against plain numpy / float64 formulas."""
from __future__ import annotations

import numpy as np
import pytest
from numba import njit

from numallm import kvcache, ops
from numallm_kernels import fused


def nmse(got, want):
    want = np.asarray(want, np.float64)
    return float(np.sum((got.astype(np.float64) - want) ** 2) / np.sum(want ** 2))


@njit(cache=False)
def _exp_all(x, out):
    for i in range(x.shape[0]):
        out[i] = fused.exp(x[i])


def test_exp_accuracy_and_special_values():
    x = np.linspace(-87.0, 88.5, 400001).astype(np.float32)
    got = np.empty_like(x)
    _exp_all(x, got)
    want = np.exp(x.astype(np.float64))
    assert np.max(np.abs(got - want) / want) < 3e-7
    special = np.array([np.nan, np.inf, -np.inf, -200.0, 200.0, 0.0], np.float32)
    got = np.empty_like(special)
    _exp_all(special, got)
    assert np.isnan(got[0]) and got[1] == np.inf and got[2] == 0.0 and got[3] == 0.0
    assert got[4] == np.inf and got[5] == 1.0


def test_rms_norm_matches_float64():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 5, 96)).astype(np.float32) * 3
    w = rng.standard_normal(96).astype(np.float32)
    x64 = x.astype(np.float64)
    want = x64 / np.sqrt(np.mean(x64 ** 2, axis=-1, keepdims=True) + 1e-5) * w
    got = ops.rms_norm(x, w, 1e-5)
    assert got.shape == x.shape and nmse(got, want) < 1e-13
    assert np.isnan(ops.rms_norm(np.full((1, 96), np.nan, np.float32), w, 1e-5)).all()


@pytest.mark.parametrize("neox", [False, True])
def test_rope_is_bit_equal_to_the_numpy_formula(neox):
    rng = np.random.default_rng(1)
    rope = ops.Rope(48, 10000.0, neox, freq_scale=0.5,
                    freq_factors=rng.uniform(1, 4, 24).astype(np.float32))
    x = rng.standard_normal((5, 3, 64)).astype(np.float32)
    pos0, d = 300, 48       # positions past the first table size: the tables grow
    ang = (np.arange(pos0, pos0 + 5, dtype=np.float64) * 0.5)[:, None] * rope.inv_freq[None, :]
    cos = np.cos(ang).astype(np.float32)[:, None, :]
    sin = np.sin(ang).astype(np.float32)[:, None, :]
    want = x.copy()
    ia, ib = (slice(0, d // 2), slice(d // 2, d)) if neox else (slice(0, d, 2), slice(1, d, 2))
    a, b = x[..., ia], x[..., ib]
    want[..., ia], want[..., ib] = a * cos - b * sin, a * sin + b * cos
    got = x.copy()
    rope(got, pos0)
    np.testing.assert_array_equal(got, want)   # also: features past `dim` untouched


@pytest.mark.parametrize("t", [1, 3])
def test_fused_attention_matches_the_batched_numpy_path(t, monkeypatch):
    rng = np.random.default_rng(2)
    n_head, n_kv, hd, pos0 = 8, 2, 16, 37
    prefix_k = rng.standard_normal((pos0, n_kv, hd)).astype(np.float32)
    prefix_v = rng.standard_normal((pos0, n_kv, hd)).astype(np.float32)
    q = rng.standard_normal((t, n_head, hd)).astype(np.float32) * 2
    k = rng.standard_normal((t, n_kv, hd)).astype(np.float32)
    v = rng.standard_normal((t, n_kv, hd)).astype(np.float32)
    outs = []
    for max_t in (kvcache.FUSED_ATTENTION_MAX_T, 0):     # fused, then numpy/BLAS
        monkeypatch.setattr(kvcache, "FUSED_ATTENTION_MAX_T", max_t)
        cache = ops.KVCache(64, n_kv, hd, type_k="f32", type_v="f32")
        cache.store(prefix_k, prefix_v, 0)
        outs.append(ops.attention(q, k, v, cache, pos0))
    assert outs[0].shape == (t, n_head * hd)
    assert nmse(outs[0], outs[1]) < 1e-12


def test_swiglu():
    rng = np.random.default_rng(3)
    g = rng.standard_normal((2, 300)).astype(np.float32) * 6
    u = rng.standard_normal((2, 300)).astype(np.float32)
    g64 = g.astype(np.float64)
    assert nmse(ops.swiglu(g, u), g64 / (1 + np.exp(-g64)) * u) < 1e-13


def _reference_attention(q, keys, vals, pos0):
    """float64 causal GQA: q (T, H, hd), keys/vals (n_kv, S, hd) -> (T, H * hd)."""
    t, n_h, hd = q.shape
    group = n_h // keys.shape[0]
    out = np.empty((t, n_h, hd))
    for i in range(t):
        for h in range(n_h):
            kk, vv = keys[h // group, :pos0 + i + 1], vals[h // group, :pos0 + i + 1]
            s = kk.astype(np.float64) @ q[i, h] / np.sqrt(hd)
            p = np.exp(s - s.max())
            out[i, h] = p / p.sum() @ vv
    return out.reshape(t, n_h * hd)


@pytest.mark.parametrize("types", [("f32", "f32"), ("f16", "f16"), ("q8_0", "q8_0"), ("q8_0", "f16")],
                         ids=lambda ts: "-".join(ts))
@pytest.mark.parametrize("t,pos0", [(3, 37), (70, 5), (130, 0)])
def test_attention_paths_match_a_float64_reference(t, pos0, types):
    """Both paths (fused for few positions, blocked BLAS for more, blocks of 64 with the
    causal mask on the diagonal block) against a plain float64 loop over the values the cache
    holds (its f16 / q8_0 rounding is the cache's, checked in test_kv_cache.py): the kernels
    read every cache type as stored."""
    rng = np.random.default_rng(4)
    n_head, n_kv, hd = 6, 2, 32
    cache = ops.KVCache(256, n_kv, hd, type_k=types[0], type_v=types[1])
    cache.store(rng.standard_normal((pos0, n_kv, hd)).astype(np.float32),
                rng.standard_normal((pos0, n_kv, hd)).astype(np.float32), 0)
    q = rng.standard_normal((t, n_head, hd)).astype(np.float32) * 2
    k = rng.standard_normal((t, n_kv, hd)).astype(np.float32)
    v = rng.standard_normal((t, n_kv, hd)).astype(np.float32)
    got = ops.attention(q, k, v, cache, pos0)
    want = _reference_attention(q, cache.k.rows(pos0 + t), cache.v.rows(pos0 + t), pos0)
    assert nmse(got, want) < 1e-12


@pytest.mark.parametrize("renorm", [True, False])
def test_moe_topk_matches_numpy(renorm):
    """Routing: softmax, the k most probable best first, renormalised or not; ties by index."""
    from numallm import ops

    rng = np.random.default_rng(4)
    logits = (3 * rng.standard_normal((40, 64))).astype(np.float32)
    logits[0, [5, 9, 30]] = 20.0                             # a three-way tie at the top
    p = np.exp(logits.astype(np.float64) - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    want_ids = np.argsort(-p, axis=1, kind="stable")[:, :8]
    want_w = np.take_along_axis(p, want_ids, 1)
    if renorm:
        want_w /= want_w.sum(1, keepdims=True)
    ids, w = ops.moe_route(logits, 8, renorm)
    assert ids.dtype == np.int64 and w.dtype == np.float32
    np.testing.assert_array_equal(ids, want_ids)
    assert list(ids[0, :3]) == [5, 9, 30]
    np.testing.assert_allclose(w, want_w, rtol=2e-6, atol=1e-7)


def test_rope_tables_grow_consistently_under_concurrent_callers():
    """NUMA node leaders rotate with one shared Rope at once: a caller never sees a grown cos
    beside a shorter sin (that read past the sin table and gave NaN logits under shard)."""
    import threading

    bad = []
    for _ in range(20):
        rope = ops.Rope(64, 10000.0, False)
        start = threading.Barrier(4)

        def grow(end):
            start.wait()
            cos, sin = rope.tables(end)
            if cos.shape != sin.shape or cos.shape[0] < end:
                bad.append((cos.shape, sin.shape, end))

        ts = [threading.Thread(target=grow, args=(e,)) for e in (300, 600, 1200, 2400)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
    assert not bad, bad[:3]
