"""Decode attention: a few query positions against a KV cache. The thread pools' native
executor (_native) runs it as a task too, without the GIL, on a node's own KV heads.

`exp` below is a polynomial (LLVM cannot vectorize calls to libm's expf, and numpy's SIMD exp is
not reachable from Numba): relative error < 2e-7 over the float32 range, exact 0 for very
negative inputs (a masked score), NaN in -> NaN out.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload

from ._attn_simd import (CHUNKS, HEADS, LANES, axpy_heads, axpy_rows, dot_rows,
                         dot_rows2)
from .kvcache import kv_block, kv_row

# reassociation lets LLVM vectorize the float reductions (sums of squares, dot products); the
# other fast-math flags (no-NaN, no-inf) stay off: non-finite values must propagate
_FM = {"reassoc", "contract", "nsz"}

_LOG2E = np.float32(1.4426950408889634)
_LN2_HI = np.float32(0.693145751953125)
_LN2_LO = np.float32(1.428606765330187e-06)


@intrinsic
def _f32_from_bits(typingctx, b):
    """The float32 whose bits are the int32 b."""
    sig = types.float32(types.int32)

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen


@njit(nogil=True, cache=True, inline="always", fastmath=_FM)
def exp(x):
    """float32 e^x: x = n ln2 + r (|r| <= ln2/2), e^r by its degree-6 Taylor polynomial, 2^n
    from the float's exponent bits. Below -87.3 the result is 0, above 88.7 it is inf; NaN stays
    NaN. Branch-free, so loops over it vectorize."""
    xc = min(max(x, np.float32(-87.3)), np.float32(88.8))
    n = np.floor(xc * _LOG2E + np.float32(0.5))
    r = (xc - n * _LN2_HI) - n * _LN2_LO
    p = np.float32(1.0 / 720.0)
    p = p * r + np.float32(1.0 / 120.0)
    p = p * r + np.float32(1.0 / 24.0)
    p = p * r + np.float32(1.0 / 6.0)
    p = p * r + np.float32(0.5)
    p = p * r + np.float32(1.0)
    p = p * r + np.float32(1.0)
    ni = np.int32(n)
    n1 = ni >> np.int32(1)           # 2^n as 2^n1 * 2^(n - n1): both factors stay normal floats
    y = (p * _f32_from_bits((n1 + np.int32(127)) << np.int32(23))
         * _f32_from_bits((ni - n1 + np.int32(127)) << np.int32(23)))
    y = np.float32(0.0) if x < np.float32(-87.3) else y
    y = np.float32(np.inf) if x > np.float32(88.7) else y
    return x if x != x else y


def _c_layout(a):
    """Whether a is typed C-contiguous (a constant of its type): the blocks address by flat
    offsets."""
    raise NotImplementedError("_c_layout is called from Numba code only")


@overload(_c_layout, inline="always")
def _c_layout_impl(a):
    c = a.layout == "C"
    return lambda a: c


@njit(nogil=True, cache=True, inline="always")
def scratch(hd):
    """The float32 scratch of _scores / _values for head size hd: one block of decoded cache
    rows and one block of scores (a row loop uses its first hd values)."""
    return np.empty(max(LANES, 1) * hd + LANES, dtype=np.float32)


@njit(nogil=True, cache=True, fastmath=_FM)
def _scores_rows(q, k, kd, t, n_s, scale, scores, tmp):
    # scores[h, s] = scale * q[t, h] . k[h // group, s]: each cached key row read (and decoded,
    # kv_row) once for the query heads of its group
    n_h, hd = q.shape[1], q.shape[2]
    group = n_h // k.shape[0]
    for g in range(k.shape[0]):
        for s in range(n_s):
            kr = kv_row(k, kd, g, s, tmp)
            for h in range(g * group, (g + 1) * group):
                acc = np.float32(0.0)
                for j in range(hd):
                    acc += q[t, h, j] * kr[j]
                scores[h, s] = acc * scale


@njit(nogil=True, cache=True, fastmath=_FM)
def _scores_blocks(q, k, kd, t, n_s, scale, scores, tmp):
    # _scores_rows LANES rows at a time (_attn_simd), where the head size and layouts allow
    n_h, hd = q.shape[1], q.shape[2]
    group = n_h // k.shape[0]
    if hd % LANES != 0 or not (_c_layout(q) and _c_layout(k) and _c_layout(scores)):
        _scores_rows(q, k, kd, t, n_s, scale, scores, tmp)
        return
    tail = tmp[LANES * hd:LANES * hd + LANES]            # (LANES,) a last, partial block's scores
    cols = scores.shape[1]
    for g in range(k.shape[0]):
        for s0 in range(0, n_s, LANES):
            n = min(LANES, n_s - s0)
            blk, off = kv_block(k, kd, g, s0, n, LANES, tmp)        # (LANES, hd) at off
            h0 = g * group                   # two heads at a time, each key chunk loaded once
            if n == LANES:
                while h0 + 2 <= (g + 1) * group:
                    for r in range(0, LANES, LANES // 2):
                        dot_rows2(q, (t * n_h + h0) * hd, hd, blk, off + r * hd, hd, scores,
                                  h0 * cols + s0 + r, cols, scale)
                    h0 += 2
            for h in range(h0, (g + 1) * group):
                if n == LANES:
                    dot_rows(q, (t * n_h + h) * hd, 0, blk, off, hd, scores, h * cols + s0, 0, scale)
                else:
                    dot_rows(q, (t * n_h + h) * hd, 0, blk, off, hd, tail, 0, 0, scale)
                    scores[h, s0:s0 + n] = tail[:n]


_scores = _scores_blocks if LANES else _scores_rows


@njit(nogil=True, cache=True, inline="always", fastmath=_FM)
def _row_max(r, n_s):
    # max of r[:n_s] in eight independent chains: one chain is a compare-select per element in
    # series (LLVM does not vectorize a float max without no-NaNs); a NaN is skipped here and
    # shows in the softmax anyway (exp(NaN - m))
    m0 = m1 = m2 = m3 = m4 = m5 = m6 = m7 = np.float32(-np.inf)
    s = 0
    while s + 8 <= n_s:
        v = r[s]
        m0 = v if v > m0 else m0
        v = r[s + 1]
        m1 = v if v > m1 else m1
        v = r[s + 2]
        m2 = v if v > m2 else m2
        v = r[s + 3]
        m3 = v if v > m3 else m3
        v = r[s + 4]
        m4 = v if v > m4 else m4
        v = r[s + 5]
        m5 = v if v > m5 else m5
        v = r[s + 6]
        m6 = v if v > m6 else m6
        v = r[s + 7]
        m7 = v if v > m7 else m7
        s += 8
    for s in range(s, n_s):
        v = r[s]
        m0 = v if v > m0 else m0
    m0 = m1 if m1 > m0 else m0
    m2 = m3 if m3 > m2 else m2
    m4 = m5 if m5 > m4 else m4
    m6 = m7 if m7 > m6 else m6
    m0 = m2 if m2 > m0 else m0
    m4 = m6 if m6 > m4 else m4
    return m4 if m4 > m0 else m0


@njit(nogil=True, cache=True, fastmath=_FM)
def _softmax(scores, n_s):
    # each row's first n_s entries -> softmax (in place), in float32 throughout (a float64 max
    # made the exp polynomial float64 and scalar)
    for h in range(scores.shape[0]):
        r = scores[h]
        m = _row_max(r, n_s)
        z = np.float32(0.0)
        for s in range(n_s):
            e = exp(r[s] - m)
            r[s] = e
            z += e
        inv = np.float32(1.0) / z
        for s in range(n_s):
            r[s] *= inv


@njit(nogil=True, cache=True, fastmath=_FM)
def _values_rows(scores, v, vd, n_s, out, tmp):
    # out[h * hd:(h + 1) * hd] = sum_s scores[h, s] * v[h // group, s]
    n_h, hd = scores.shape[0], v.shape[2]
    group = n_h // v.shape[0]
    out[:] = 0.0
    for g in range(v.shape[0]):
        for s in range(n_s):
            vr = kv_row(v, vd, g, s, tmp)
            for h in range(g * group, (g + 1) * group):
                p = scores[h, s]
                o = out[h * hd:(h + 1) * hd]
                for j in range(hd):
                    o[j] += p * vr[j]


@njit(nogil=True, cache=True, fastmath=_FM)
def _values_blocks(scores, v, vd, n_s, out, tmp):
    # _values_rows LANES rows at a time (_attn_simd), where the head size and layouts allow
    n_h, hd = scores.shape[0], v.shape[2]
    group = n_h // v.shape[0]
    if hd % LANES != 0 or not (_c_layout(scores) and _c_layout(v) and _c_layout(out)):
        _values_rows(scores, v, vd, n_s, out, tmp)
        return
    out[:] = 0.0
    tail = tmp[LANES * hd:LANES * hd + LANES]            # (LANES,) a partial block's weights
    cols = scores.shape[1]
    for g in range(v.shape[0]):
        for s0 in range(0, n_s, LANES):
            n = min(LANES, n_s - s0)
            blk, off = kv_block(v, vd, g, s0, n, LANES, tmp)        # (LANES, hd) at off
            h0 = g * group                   # HEADS heads at a time where whole tiles fit
            if n == LANES and hd % (CHUNKS * LANES) == 0:
                while h0 + HEADS <= (g + 1) * group:
                    axpy_heads(scores, h0 * cols + s0, cols, blk, off, hd, out, h0 * hd)
                    h0 += HEADS
            for h in range(h0, (g + 1) * group):
                if n == LANES:
                    axpy_rows(scores, h * cols + s0, 0, blk, off, hd, out, h * hd)
                else:
                    tail[:n] = scores[h, s0:s0 + n]
                    tail[n:] = 0.0
                    axpy_rows(tail, 0, 0, blk, off, hd, out, h * hd)


_values = _values_blocks if LANES else _values_rows


@njit(nogil=True, cache=True)
def attend(q, k, kd, v, vd, pos0, scale, out, scores):
    """Causal grouped-query attention over a KV cache, for a few query positions (decode).

    q: float32 (T, H, hd) at positions pos0..pos0+T-1; k, v: cache arrays (n_kv, n_ctx, hd) of
    a kvcache.py type (float32, f16 bits, q8_0 codes) filled up to pos0 + T, kd, vd their scale
    arrays (f32 / f16: k and v again); out: float32 (T, H * hd); scores: float32 scratch
    (H, >= pos0 + T). Query head h reads KV head h // (H / n_kv). Three passes per position
    (scores, softmax, weighted sum of values), each a loop LLVM vectorizes (kept as separate
    functions: fused into one, the same loops measured 2-4x slower)."""
    tmp = scratch(k.shape[2])
    for t in range(q.shape[0]):
        n_s = pos0 + t + 1
        _scores(q, k, kd, t, n_s, scale, scores, tmp)
        _softmax(scores, n_s)
        _values(scores, v, vd, n_s, out[t], tmp)

