"""Q4_K: exact Numba dequantize and the decode (matvec) kernel of Q4_K_M models.

Layout, 144 bytes per super-block of 256 weights (4.5 bits/weight); offsets in bytes:
    0  d (f16)       multiplies the eight 6-bit sub-block scales
    2  dmin (f16)    multiplies the eight 6-bit sub-block mins
    4  scales[12]    6-bit scale and min per 32-weight sub-block (see unpack_6bit_scales)
    16 qs[128]       weight 64p + 32t + l (p 0..3, t 0..1, l 0..31) is nibble t (0 = low) of
                     byte 32p + l, so sub-block j = 2p + t shares its bytes with its neighbour
    w = d*sc[j] * q - dmin*m[j],  j = e // 32, q in 0..15
"""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as T
from numba import njit

from ._kquant_common import KQuantUnit, f16_field, unpack_6bit_scales
from ._kquant_simd import has_avx2, q4k_isum, q4k_msum
from .base import register


@njit(nogil=True, cache=True)
def _q4k_dequant(raw, d, dmin, sc, mn, out, r0, r1):
    nb = d.shape[1]
    for r in range(r0, r1):
        for b in range(nb):
            ob = b * 144
            for j in range(8):
                dd = d[r, b] * np.float32(sc[r, b * 8 + j])
                mm = dmin[r, b] * np.float32(mn[r, b * 8 + j])
                qo = ob + 16 + (j // 2) * 32
                sh = 4 * (j % 2)
                eo = b * 256 + j * 32
                for l in range(32):
                    q = (raw[r, qo + l] >> sh) & 15
                    out[r - r0, eo + l] = dd * np.float32(q) - mm


@njit(nogil=True, cache=True)
def _q4k_matvec(raw, d, dmin, sc, mn, xq, xd, xs, xb, out, r0, r1):
    """Plain-Numba decode: any CPU. Per block, exact integer sums of scale * (q . xq) and of
    min * sum(xq), then one float combination (the same arithmetic as the AVX2 kernel)."""
    nb = d.shape[1]
    for r in range(r0, r1):
        acc = 0.0
        for b in range(nb):
            ob = b * 144
            isum = np.int32(0)
            for p in range(4):
                qo = ob + 16 + p * 32
                eo = b * 256 + p * 64
                s0 = np.int32(0)
                s1 = np.int32(0)
                for l in range(32):
                    v = raw[r, qo + l]
                    s0 = np.int32(s0 + np.int32(v & 15) * np.int32(xq[eo + l]))
                    s1 = np.int32(s1 + np.int32(v >> 4) * np.int32(xq[eo + 32 + l]))
                isum = np.int32(isum + np.int32(sc[r, b * 8 + 2 * p]) * s0
                                + np.int32(sc[r, b * 8 + 2 * p + 1]) * s1)
            acc += _combine(d[r, b], dmin[r, b], xd[b], isum, _min_sum(mn, r, xb, b))
        out[r] = acc


@njit(nogil=True, cache=True)
def _q4k_matvec_avx2(raw, d, dmin, sc, mn, xq, xd, xs, xb, out, r0, r1):
    """AVX2 decode: a super-block's integer dots are one q4k_isum (vpmaddubsw/vpmaddwd) and one
    q4k_msum; the float combination is the plain kernel's."""
    nb = d.shape[1]
    for r in range(r0, r1):
        row = raw[r]
        srow = sc[r]
        mrow = mn[r]
        acc = 0.0
        for b in range(nb):
            isum = q4k_isum(row, b * 144 + 16, xq, b * 256, srow, b * 8)
            msum = q4k_msum(mrow, b * 8, xb, b * 16)
            acc += _combine(d[r, b], dmin[r, b], xd[b], isum, msum)
        out[r] = acc


@njit(nogil=True, cache=True, inline="always")
def _min_sum(mn, r, xb, b):
    """sum_j m_j * sum(xq over sub-block j), exact."""
    t = np.int32(0)
    for j in range(8):
        bs = np.int32(xb[b * 16 + 2 * j]) + np.int32(xb[b * 16 + 2 * j + 1])
        t = np.int32(t + np.int32(mn[r, b * 8 + j]) * bs)
    return t


@njit(nogil=True, cache=True, inline="always")
def _combine(d, dmin, xd, isum, msum):
    return np.float64(xd) * (np.float64(d) * isum - np.float64(dmin) * msum)


@register
class Q4_K(KQuantUnit):
    qtype = T.Q4_K
    _dequant = staticmethod(_q4k_dequant)
    _matvec = staticmethod(_q4k_matvec_avx2 if has_avx2() else _q4k_matvec)
    variant = "avx2-q8k" if has_avx2() else "numba-q8k"
    simd = has_avx2()
    features = {"avx2-q8k": ("avx2", "fma")}

    def _unpack(self, blocks):
        sc, mn = unpack_6bit_scales(blocks[:, :, 4:16])
        return f16_field(blocks, 0), f16_field(blocks, 2), sc, mn
