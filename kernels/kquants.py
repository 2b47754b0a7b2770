"""Q2_K and Q3_K: exact Numba dequantize and fused int8-dot matvec.

Q4_K, Q5_K, Q6_K (the types of common Q4_K_M / Q5_K_M models) and IQ4_XS live in kquant_x8.py
(8-row interleaved records, AVX2 kernels). Conventions shared by these four (prepared weights, x quantized per
256-block) are in _kquant_common.py. In the layouts below, offsets are bytes within one super-block of 256 weights;
"e" is a weight's index inside the super-block and f16 values are little-endian.

Dequantize reproduces gguf-py's float32 rounding order exactly: the sub-block scale D = d * sc is
rounded to float32 first, then D * q (minus M = dmin * m where the type has mins).
"""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as T
from numba import njit

from ._kquant_common import KQuantUnit, f16_field
from .base import register

# ---------------------------------------------------------------------------------------------
# Q2_K: 84 bytes, 2.625 bits/weight.
#   0  scales[16]  sub-block s (16 weights each): scale in the low nibble, min in the high nibble
#   16 qs[64]      2-bit quants; half h = e // 128 uses bytes 16 + 32h .. +31; inside a half,
#                  weight h*128 + 32j + l sits in bits 2j..2j+1 of byte 16 + 32h + l
#   80 d (f16)     multiplies the scale nibbles
#   82 dmin (f16)  multiplies the min nibbles
#   w = d*sc[s] * q - dmin*m[s],  s = e // 16
# ---------------------------------------------------------------------------------------------


@njit(nogil=True, cache=True)
def _q2k_dequant(raw, d, dmin, sc, mn, out, r0, r1):
    nb = d.shape[1]
    for r in range(r0, r1):
        for b in range(nb):
            ob = b * 84
            for h in range(2):
                for j in range(4):
                    for k in range(2):
                        s = h * 8 + j * 2 + k
                        dd = d[r, b] * np.float32(sc[r, b * 16 + s])
                        mm = dmin[r, b] * np.float32(mn[r, b * 16 + s])
                        qo = ob + 16 + h * 32 + k * 16
                        eo = b * 256 + s * 16
                        for l in range(16):
                            q = (raw[r, qo + l] >> (2 * j)) & 3
                            out[r - r0, eo + l] = dd * np.float32(q) - mm


@njit(nogil=True, cache=True)
def _q2k_matvec(raw, d, dmin, sc, mn, xq, xd, xs, xb, out, r0, r1):
    nb = d.shape[1]
    for r in range(r0, r1):
        acc = 0.0
        for b in range(nb):
            ob = b * 84
            isum = 0    # exact: sum over sub-blocks of sc * (q . xq)
            msum = 0.0  # sum over sub-blocks of m * sum(x)
            for h in range(2):
                for j in range(4):
                    for k in range(2):
                        s = h * 8 + j * 2 + k
                        qo = ob + 16 + h * 32 + k * 16
                        eo = b * 256 + s * 16
                        si = np.int32(0)
                        for l in range(16):
                            q = np.int32((raw[r, qo + l] >> (2 * j)) & 3)
                            si = np.int32(si + q * np.int32(xq[eo + l]))
                        isum += np.int64(sc[r, b * 16 + s]) * si
                        msum += np.float64(mn[r, b * 16 + s]) * xs[b * 16 + s]
            acc += np.float64(d[r, b]) * xd[b] * isum - np.float64(dmin[r, b]) * msum
        out[r] = acc


@register
class Q2_K(KQuantUnit):
    qtype = T.Q2_K
    _dequant = staticmethod(_q2k_dequant)
    _matvec = staticmethod(_q2k_matvec)

    def _unpack(self, blocks):
        n = blocks.shape[0]
        s = blocks[:, :, 0:16]
        return (f16_field(blocks, 80), f16_field(blocks, 82),
                np.ascontiguousarray((s & 15).reshape(n, -1)),
                np.ascontiguousarray((s >> 4).reshape(n, -1)))


# ---------------------------------------------------------------------------------------------
# Q3_K: 110 bytes, 3.4375 bits/weight. No mins; the 3-bit quant is signed, -4..3.
#   0  hmask[32]  high bit of weight h*128 + 32j + l is bit 4h + j of byte l; a CLEAR bit means
#                 subtract 4 (set bit: q = low 2 bits as they are)
#   32 qs[64]     low 2 bits, packed as in Q2_K: bits 2j..2j+1 of byte 32 + 32h + l
#   96 scales[12] 16 six-bit scales, biased by 32: scale s has its low nibble in byte s % 8
#                 (low nibble for s < 8, high nibble for s >= 8) and its top 2 bits in byte
#                 8 + s % 4 at bit 2 * (s // 4)
#   108 d (f16)
#   w = d*(sc[s] - 32) * q,  s = e // 16
# ---------------------------------------------------------------------------------------------


@njit(nogil=True, cache=True)
def _q3k_dequant(raw, d, dmin, sc, mn, out, r0, r1):
    nb = d.shape[1]
    for r in range(r0, r1):
        for b in range(nb):
            ob = b * 110
            for h in range(2):
                for j in range(4):
                    for k in range(2):
                        s = h * 8 + j * 2 + k
                        dd = d[r, b] * np.float32(sc[r, b * 16 + s])
                        eo = b * 256 + s * 16
                        for l in range(16):
                            lo = (raw[r, ob + 32 + h * 32 + k * 16 + l] >> (2 * j)) & 3
                            hb = (raw[r, ob + k * 16 + l] >> (4 * h + j)) & 1
                            q = np.int32(lo) + 4 * np.int32(hb) - 4
                            out[r - r0, eo + l] = dd * np.float32(q)


@njit(nogil=True, cache=True)
def _q3k_matvec(raw, d, dmin, sc, mn, xq, xd, xs, xb, out, r0, r1):
    nb = d.shape[1]
    for r in range(r0, r1):
        acc = 0.0
        for b in range(nb):
            ob = b * 110
            isum = 0
            for h in range(2):
                for j in range(4):
                    for k in range(2):
                        s = h * 8 + j * 2 + k
                        eo = b * 256 + s * 16
                        si = np.int32(0)
                        for l in range(16):
                            lo = np.int32((raw[r, ob + 32 + h * 32 + k * 16 + l] >> (2 * j)) & 3)
                            hb = np.int32((raw[r, ob + k * 16 + l] >> (4 * h + j)) & 1)
                            q = np.int32(lo + 4 * hb - 4)
                            si = np.int32(si + q * np.int32(xq[eo + l]))
                        isum += np.int64(sc[r, b * 16 + s]) * si
            acc += np.float64(d[r, b]) * xd[b] * isum
        out[r] = acc


@register
class Q3_K(KQuantUnit):
    qtype = T.Q3_K
    _dequant = staticmethod(_q3k_dequant)
    _matvec = staticmethod(_q3k_matvec)

    def _unpack(self, blocks):
        n, nb = blocks.shape[:2]
        s = blocks[:, :, 96:108].astype(np.int16)          # (N, nb, 12)
        i = np.arange(16)
        lo = (s[:, :, i % 8] >> (4 * (i // 8))) & 15        # (N, nb, 16)
        hi = (s[:, :, 8 + i % 4] >> (2 * (i // 4))) & 3
        sc = ((lo | (hi << 4)) - 32).astype(np.int8)
        return (f16_field(blocks, 108), np.zeros((n, 0), np.float32),
                np.ascontiguousarray(sc.reshape(n, nb * 16)), np.zeros((n, 0), np.uint8))
