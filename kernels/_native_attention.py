"""Decode attention as a native task (see _native): one task row runs attention.attend over
the KV heads it is given, for one pair of cache types (the slot: ATTN + 3 * K's kind + V's kind,
kinds in CACHE_KINDS order: f32, f16, q8_0).

Task row (_native.TASK_FIELDS int64): slot, q address, T, H, hd, k address, v address, n_kv,
n_ctx, out address, scores address, scores' columns, pos0, scale (float32 bits), k's and v's
scale-array addresses (q8_0; the values' own address for f32 / f16).
"""
from __future__ import annotations

import numpy as np
from numba import carray, njit

from . import attention
from ._native import ATTN, address, f32_from_bits, ptr_f32, ptr_i8, ptr_u16

# cache array dtype -> its kind in an attention slot (numallm_kernels.kvcache: f32, f16, q8_0)
CACHE_KINDS = {np.dtype(np.float32): 0, np.dtype(np.uint16): 1, np.dtype(np.int8): 2}


def attention_task(q, k, kd, v, vd, out, scores, pos0: int, scale: float) -> tuple:
    """A task running attention.attend(q, k, kd, v, vd, pos0, scale, out, scores), every array
    C-contiguous: q float32 (T, H, hd), k and v cache arrays (n_kv, n_ctx, hd) with their scale
    arrays kd, vd (numallm_kernels.kvcache), out float32 (T, H * hd), scores float32
    (H, >= pos0 + T). Only where `available()`."""
    slot = ATTN + 3 * CACHE_KINDS[k.dtype] + CACHE_KINDS[v.dtype]
    return (slot, q, k, kd, v, vd, out, scores, pos0, scale)


ATTN_POS0 = 12      # the field of an attention row holding pos0 (a replayed table rewrites it)


def _encode_attention(row, q, k, kd, v, vd, out, scores, pos0, scale) -> None:
    slot = ATTN + 3 * CACHE_KINDS[k.dtype] + CACHE_KINDS[v.dtype]
    row[:] = (slot, address(q), q.shape[0], q.shape[1], q.shape[2], address(k), address(v),
              k.shape[0], k.shape[1], address(out), address(scores), scores.shape[1], pos0,
              int(np.float32(scale).view(np.int32)), address(kd), address(vd))


@njit(nogil=True, cache=True, inline="always")
def _attn_scores(f, kind, q, t, n_s, scale, scores, tmp):
    n_kv, n_ctx, hd = f[7], f[8], f[4]
    if kind == 0:
        k = carray(ptr_f32(f[5]), (n_kv, n_ctx, hd))
        attention._scores(q, k, k, t, n_s, scale, scores, tmp)
    elif kind == 1:
        kh = carray(ptr_u16(f[5]), (n_kv, n_ctx, hd))
        attention._scores(q, kh, kh, t, n_s, scale, scores, tmp)
    else:
        kq = carray(ptr_i8(f[5]), (n_kv, n_ctx, hd))
        attention._scores(q, kq, carray(ptr_u16(f[14]), (n_kv, n_ctx, hd // 32)), t, n_s, scale,
                          scores, tmp)


@njit(nogil=True, cache=True, inline="always")
def _attn_values(f, kind, scores, n_s, out, tmp):
    n_kv, n_ctx, hd = f[7], f[8], f[4]
    if kind == 0:
        v = carray(ptr_f32(f[6]), (n_kv, n_ctx, hd))
        attention._values(scores, v, v, n_s, out, tmp)
    elif kind == 1:
        vh = carray(ptr_u16(f[6]), (n_kv, n_ctx, hd))
        attention._values(scores, vh, vh, n_s, out, tmp)
    else:
        vq = carray(ptr_i8(f[6]), (n_kv, n_ctx, hd))
        attention._values(scores, vq, carray(ptr_u16(f[15]), (n_kv, n_ctx, hd // 32)), n_s, out, tmp)


@njit(nogil=True, cache=True)
def _run_attention(f):
    # attention.attend with the cache types of the slot: each pass specialized per type (three
    # of each, not nine of attend)
    n_t, n_h, hd, pos0 = f[2], f[3], f[4], f[12]
    kinds = f[0] - ATTN
    q = carray(ptr_f32(f[1]), (n_t, n_h, hd))
    out = carray(ptr_f32(f[9]), (n_t, n_h * hd))
    scores = carray(ptr_f32(f[10]), (n_h, f[11]))
    scale = f32_from_bits(f[13])
    tmp = attention.scratch(hd)
    for t in range(n_t):
        n_s = pos0 + t + 1
        _attn_scores(f, kinds // 3, q, t, n_s, scale, scores, tmp)
        attention._softmax(scores, n_s)
        _attn_values(f, kinds % 3, scores, n_s, out[t], tmp)
