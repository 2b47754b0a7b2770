"""Q6_K: exact Numba dequantize and the decode (matvec) kernel (output/embedding type of Q4_K_M).

Layout, 210 bytes per super-block of 256 weights (6.5625 bits/weight); offsets in bytes. A weight
e = 128h + 32g + l (h 0..1, g 0..3, l 0..31) is a 6-bit unsigned code minus 32:
    0   ql[128]     low 4 bits: nibble g // 2 (0 = low) of byte 64h + 32(g % 2) + l
    128 qh[64]      high 2 bits: bits 2g..2g+1 of byte 128 + 32h + l
    192 scales[16]  int8 scale per 16 weights, s = e // 16
    208 d (f16)
    w = d*scales[s] * (q - 32)
"""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as T
from numba import njit

from ._kquant_common import KQuantUnit, f16_field
from ._kquant_simd import has_avx2, q6k_isum
from .base import register


@njit(nogil=True, cache=True)
def _q6k_dequant(raw, d, dmin, sc, mn, out, r0, r1):
    nb = d.shape[1]
    for r in range(r0, r1):
        for b in range(nb):
            ob = b * 210
            for h in range(2):
                for g in range(4):
                    lo_o = ob + 64 * h + 32 * (g % 2)
                    hi_o = ob + 128 + 32 * h
                    sl = 4 * (g // 2)
                    for k in range(2):
                        s = 8 * h + 2 * g + k
                        dd = d[r, b] * np.float32(sc[r, b * 16 + s])
                        eo = b * 256 + 16 * s
                        for l in range(16):
                            i = 16 * k + l
                            q = (((raw[r, lo_o + i] >> sl) & 15)
                                 | (((raw[r, hi_o + i] >> (2 * g)) & 3) << 4))
                            out[r - r0, eo + l] = dd * np.float32(np.int32(q) - 32)


@njit(nogil=True, cache=True)
def _q6k_matvec(raw, d, dmin, sc, mn, xq, xd, xs, xb, out, r0, r1):
    """Plain-Numba decode: any CPU. Exact integer block sum, then one float multiply per block
    (the same arithmetic as the AVX2 kernel)."""
    nb = d.shape[1]
    for r in range(r0, r1):
        acc = 0.0
        for b in range(nb):
            ob = b * 210
            isum = np.int32(0)
            for h in range(2):
                for g in range(4):
                    lo_o = ob + 64 * h + 32 * (g % 2)
                    hi_o = ob + 128 + 32 * h
                    sl = 4 * (g // 2)
                    for k in range(2):
                        s = 8 * h + 2 * g + k
                        eo = b * 256 + 16 * s
                        si = np.int32(0)
                        for l in range(16):
                            i = 16 * k + l
                            q = np.int32(((raw[r, lo_o + i] >> sl) & 15)
                                         | (((raw[r, hi_o + i] >> (2 * g)) & 3) << 4)) - 32
                            si = np.int32(si + np.int32(q) * np.int32(xq[eo + l]))
                        isum = np.int32(isum + np.int32(sc[r, b * 16 + s]) * si)
            acc += np.float64(xd[b]) * (np.float64(d[r, b]) * isum)
        out[r] = acc


@njit(nogil=True, cache=True)
def _q6k_matvec_avx2(raw, d, dmin, sc, mn, xq, xd, xs, xb, out, r0, r1):
    """AVX2 decode: the super-block integer dot is one q6k_isum (vpmaddubsw/vpmaddwd)."""
    nb = d.shape[1]
    for r in range(r0, r1):
        row = raw[r]
        srow = sc[r]
        acc = 0.0
        for b in range(nb):
            isum = q6k_isum(row, b * 210, xq, b * 256, srow, b * 16, xb, b * 16)
            acc += np.float64(xd[b]) * (np.float64(d[r, b]) * isum)
        out[r] = acc


@register
class Q6_K(KQuantUnit):
    qtype = T.Q6_K
    _dequant = staticmethod(_q6k_dequant)
    _matvec = staticmethod(_q6k_matvec_avx2 if has_avx2() else _q6k_matvec)
    variant = "avx2-q8k" if has_avx2() else "numba-q8k"
    simd = has_avx2()
    features = {"avx2-q8k": ("avx2", "fma")}

    def _unpack(self, blocks):
        n, nb = blocks.shape[:2]
        sc = np.ascontiguousarray(blocks[:, :, 192:208]).view(np.int8).reshape(n, nb * 16)
        return (f16_field(blocks, 208), np.zeros((n, 0), np.float32), sc,
                np.zeros((n, 0), np.uint8))
