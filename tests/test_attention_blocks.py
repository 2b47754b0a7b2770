"""Decode attention in blocks of cache rows (numallm_kernels._attn_simd): against a float64
reference at every block edge, per head the same bits whether heads go one or several at a
time, and vector code in the compiled kernels. Speed: benchmarks (`numallm bench -d N`)."""
from __future__ import annotations

import numpy as np
import pytest
from numba import types

from numallm.kvcache import KVArray
from numallm_kernels import attention
from numallm_kernels._attn_simd import LANES

B = max(LANES, 8)         # positions around a block's edges (the row loop's too, without SIMD)
from numallm_kernels.base import fresh_asm


def _reference(q: np.ndarray, keys: np.ndarray, values: np.ndarray, n: int) -> np.ndarray:
    """float64 softmax(q k^T / sqrt(hd)) v per query head; q (H, hd), keys/values (n_kv, >= n, hd)."""
    n_head, hd = q.shape
    group = n_head // keys.shape[0]
    out = np.empty((n_head, hd))
    for h in range(n_head):
        s = keys[h // group, :n].astype(np.float64) @ q[h] / np.sqrt(hd)
        p = np.exp(s - s.max())
        out[h] = (p / p.sum()) @ values[h // group, :n]
    return out.reshape(-1)


def _cache(kind: str, n_kv: int, n_ctx: int, hd: int, rng) -> tuple[KVArray, KVArray]:
    k, v = KVArray(kind, (n_kv, n_ctx, hd)), KVArray(kind, (n_kv, n_ctx, hd))
    k.store(rng.standard_normal((n_ctx, n_kv, hd)).astype(np.float32), 0)
    v.store(rng.standard_normal((n_ctx, n_kv, hd)).astype(np.float32), 0)
    return k, v


def _attend(q: np.ndarray, k: KVArray, v: KVArray, pos: int) -> np.ndarray:
    n_head, hd = q.shape[1], q.shape[2]
    out = np.empty((q.shape[0], n_head * hd), np.float32)
    scores = np.empty((n_head, k.a.shape[1]), np.float32)
    attention.attend(q, k.a, k.d, v.a, v.d, pos, np.float32(1 / np.sqrt(hd)), out, scores)
    return out


# (heads, KV heads, head size): GQA groups of 8, 4 (two-head and four-head tiles), MHA (one
# head at a time), MLA's one latent head of 576, and a head size that is no multiple of the
# block (the row loop)
SHAPES = [(32, 4, 64), (32, 8, 128), (12, 12, 80), (6, 2, 72), (16, 1, 576), (10, 2, 64)]


@pytest.mark.parametrize("kind", ["f32", "f16", "q8_0"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_float64_reference_at_block_edges(shape, kind):
    n_head, n_kv, hd = shape
    if kind == "q8_0" and hd % 32:
        pytest.skip("q8_0 rows are whole 32-value blocks")
    rng = np.random.default_rng(hd + n_head)
    n_ctx = 3 * B + 5
    k, v = _cache(kind, n_kv, n_ctx, hd, rng)
    keys, values = k.rows(n_ctx), v.rows(n_ctx)       # as stored (f16 / q8_0 rounding included)
    for pos in (0, 1, B - 2, B - 1, B, 2 * B - 1, 2 * B + 3, n_ctx - 1):
        q = rng.standard_normal((1, n_head, hd)).astype(np.float32)
        got = _attend(q, k, v, pos)[0]
        want = _reference(q[0], keys, values, pos + 1)
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * np.abs(want).max(),
                                   err_msg=f"pos {pos}")


@pytest.mark.parametrize("kind", ["f32", "f16"])
@pytest.mark.parametrize("group", [2, 4, 8])
def test_a_head_gets_the_same_bits_in_a_group_as_alone(group, kind):
    # grouped heads go through the two- and four-head tiles (dot_rows2, axpy_heads); the same
    # heads each over its own copy of the KV head (MHA) go one at a time (dot_rows, axpy_rows):
    # the per-head sums are the same, in the same order
    rng = np.random.default_rng(group)
    n_kv, hd, n_ctx = 2, 64, 2 * B + 7
    k, v = _cache(kind, n_kv, n_ctx, hd, rng)
    k1, v1 = (KVArray(kind, (n_kv * group, n_ctx, hd)) for _ in range(2))
    k1.store(np.repeat(k.rows(n_ctx), group, axis=0).transpose(1, 0, 2).copy(), 0)
    v1.store(np.repeat(v.rows(n_ctx), group, axis=0).transpose(1, 0, 2).copy(), 0)
    for pos in (B - 1, n_ctx - 1):
        q = rng.standard_normal((1, n_kv * group, hd)).astype(np.float32)
        np.testing.assert_array_equal(_attend(q, k, v, pos).view(np.uint32),
                                      _attend(q, k1, v1, pos).view(np.uint32))


def test_block_kernels_are_vector_code():
    if LANES == 0:
        pytest.skip("no SIMD target: the row loop runs")
    reg = "zmm" if LANES == 16 else "ymm"
    f32_3d, f32_2d, f32_1d = (types.Array(types.float32, n, "C") for n in (3, 2, 1))
    scores = fresh_asm(attention._scores, (f32_3d, f32_3d, f32_3d, types.int64, types.int64,
                                           types.float32, f32_2d, f32_1d))
    values = fresh_asm(attention._values, (f32_2d, f32_3d, f32_3d, types.int64, f32_1d, f32_1d))
    for name, asm in (("_scores", scores), ("_values", values)):
        fmas = [ln for ln in asm.splitlines() if "vfmadd" in ln and f"%{reg}" in ln]
        assert len(fmas) >= LANES, f"{name}: {len(fmas)} packed FMAs on {reg}"
