"""MLA's fused element-wise steps (numallm.heads.mla_split / mla_scores_q, numallm_kernels.mla)
against the numpy steps they replace."""
from __future__ import annotations

import math

import numpy as np
import pytest

from numallm import ops


def _reference(q, kva, norm_w, eps, rope, pos0, scale):
    """The unfused steps, in float64 where they do not round: (qn, qc's rope part, latent)."""
    t, h, hd = q.shape
    lat = norm_w.shape[0]
    n_rope = kva.shape[1] - lat
    cos, sin = rope.tables(int(np.max(pos0)) + t)
    pos = pos0 if isinstance(pos0, np.ndarray) else np.arange(pos0, pos0 + t)
    cos, sin = cos[pos].astype(np.float64), sin[pos].astype(np.float64)       # (T, rope / 2)

    def rot(x):                                           # (T, n, rope), adjacent pairs
        a, b = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2] = a * cos[:, None] - b * sin[:, None]
        out[..., 1::2] = a * sin[:, None] + b * cos[:, None]
        return out
    q64, kva64 = q.astype(np.float64), kva.astype(np.float64)
    c = kva64[:, :lat]
    c = c / np.sqrt((c * c).mean(axis=1, keepdims=True) + eps) * norm_w
    latent = np.concatenate([c, rot(kva64[:, None, lat:])[:, 0]], axis=1)
    return q64[..., :hd - n_rope].transpose(1, 0, 2), rot(q64[..., hd - n_rope:]) * scale, latent


@pytest.mark.parametrize("t, pos0", [(1, 37), (5, 0), (3, np.array([4, 0, 19]))])
def test_mla_split_matches_the_steps(t, pos0):
    rng = np.random.default_rng(1)
    h, nope, n_rope, lat = 4, 16, 8, 32
    q = rng.standard_normal((t, h, nope + n_rope)).astype(np.float32)
    kva = rng.standard_normal((t, lat + n_rope)).astype(np.float32)
    norm_w = rng.standard_normal(lat).astype(np.float32)
    rope = ops.Rope(n_rope, 10000.0, False, 0.25, ext_factor=1.0, corr_dims=(1.0, 3.0), mscale=1.2)
    scale = 0.3 * math.sqrt(lat + n_rope)
    qn, qc, latent = ops.mla_split(q, kva, norm_w, 1e-6, rope, pos0, scale)
    want_qn, want_pe, want_lat = _reference(q, kva, norm_w, 1e-6, rope, pos0, scale)
    assert qc.shape == (t, h, lat + n_rope) and latent.shape == (t, 1, lat + n_rope)
    assert qn.shape == (h, t, nope)
    np.testing.assert_array_equal(qn, want_qn)
    np.testing.assert_allclose(qc[..., lat:], want_pe, rtol=2e-6, atol=2e-6)
    np.testing.assert_allclose(latent[:, 0], want_lat, rtol=2e-6, atol=2e-6)
    q_lat = rng.standard_normal((h, t, lat)).astype(np.float32)
    ops.mla_scores_q(q_lat, scale, qc)
    np.testing.assert_array_equal(qc[..., :lat], q_lat.transpose(1, 0, 2) * np.float32(scale))


def _route_reference(logits, k, renorm, sigmoid, bias, groups, scale):
    """moe_route's steps in numpy (llama.cpp's build_moe_ffn order): float64 probabilities."""
    x = logits.astype(np.float64)
    if sigmoid:
        p = 1.0 / (1.0 + np.exp(-x))
    else:
        p = np.exp(x - x.max(axis=-1, keepdims=True))
        p /= p.sum(axis=-1, keepdims=True)
    sel = p if bias is None else p + bias
    n_group, n_used = groups
    if n_group > 1 and n_used < n_group:
        g = sel.reshape(sel.shape[0], n_group, -1)                     # (T, groups, E/groups)
        score = np.sort(g, axis=-1)[..., -2:].sum(axis=-1)             # (T, groups)
        keep = np.argsort(-score, axis=-1, kind="stable")[:, :n_used]
        mask = np.full(score.shape, -np.inf)
        np.put_along_axis(mask, keep, 0.0, axis=-1)
        sel = (g + mask[..., None]).reshape(sel.shape[0], -1)
    ids = np.argsort(-sel, axis=-1, kind="stable")[:, :k]
    w = np.take_along_axis(p, ids, axis=-1)
    if renorm:
        w /= np.maximum(w.sum(axis=-1, keepdims=True), 6.103515625e-5)
    return ids, w * (scale or 1.0)


@pytest.mark.parametrize("sigmoid, bias, groups, renorm, scale", [
    (True, True, (8, 3), True, 2.5),      # DeepSeek-V3 / R1
    (True, True, (0, 0), False, 0.0),
    (False, False, (4, 2), True, 1.0),    # grouped softmax
    (False, True, (0, 0), False, 16.0),
])
def test_moe_route_kernel_matches_the_steps(sigmoid, bias, groups, renorm, scale):
    rng = np.random.default_rng(2)
    logits = rng.standard_normal((7, 64)).astype(np.float32)
    b = rng.standard_normal(64).astype(np.float32) * 0.1 if bias else None
    ids, w = ops.moe_route(logits, 8, renorm, sigmoid=sigmoid, bias=b, groups=groups, scale=scale)
    want_ids, want_w = _route_reference(logits, 8, renorm, sigmoid, b, groups, scale)
    assert ids.dtype == np.int64 and w.dtype == np.float32
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(w, want_w, rtol=3e-6)
    if groups[0]:                     # every pick from the kept groups only
        assert all(len(set(row // (64 // groups[0]))) <= groups[1] for row in ids)


class _Held(np.ndarray):
    """An array type the fused path does not take (as an executor's tensors): the steps run."""


def test_mla_split_steps_path_agrees():
    rng = np.random.default_rng(3)
    q = rng.standard_normal((2, 4, 24)).astype(np.float32)
    kva = rng.standard_normal((2, 40)).astype(np.float32)
    norm_w = rng.standard_normal(32).astype(np.float32)
    rope = ops.Rope(8, 10000.0, False)
    fused = ops.mla_split(q, kva, norm_w, 1e-6, rope, 5, 1.7)
    steps = ops.mla_split(q.view(_Held), kva.view(_Held), norm_w, 1e-6, rope, 5, 1.7)
    (qn, qc, lat), (qn2, qc2, lat2) = fused, [np.asarray(a) for a in steps]
    np.testing.assert_array_equal(qn2, qn)
    np.testing.assert_allclose(qc2[..., 32:], qc[..., 32:], rtol=1e-6, atol=1e-6)   # the rope part
    np.testing.assert_allclose(lat2, lat, rtol=1e-6, atol=1e-6)


def test_two_thread_decode_is_the_one_thread_decode(synth_dir):
    """A decode step on two threads (latent attention cut by heads, per-head products and
    routed experts replayed) gives the one-thread step's logits bit for bit: every head and row
    is computed by the same kernel either way."""
    import numallm
    from numallm import synth_deepseek, threads
    from numallm_kernels import _native

    path = synth_deepseek.cached_deepseek(synth_dir, "Q8_0", "tiny-v3", seed=0)
    toks = np.random.default_rng(6).integers(0, 512, 12)
    got = []
    for n in (1, 2):
        with numallm.load(path, n_ctx=32, n_threads=n) as llm, threads.activate(llm.pool):
            llm.model(toks[:4], llm.cache, 0)
            got.append(np.concatenate([llm.model(toks[i:i + 1], llm.cache, i) for i in range(4, 12)]))
            if n == 2:        # the cut attention ran (where tasks run natively)
                assert all(bool(c.__dict__.get("_attends")) == _native.available() for c in llm.cache)
    np.testing.assert_array_equal(got[1], got[0])
