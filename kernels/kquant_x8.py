"""Q4_K, Q5_K, Q6_K (the types of Q4_K_M / Q5_K_M models) and IQ4_XS in 8-row interleaved records,
like Q4_0/Q8_0 in interleaved.py: one record per super-block column of 8 rows, so a decode step is one sequential
stream and the activations, the scale conversions and the row sums are shared by 8 rows (the
SIMD steps and their integer bounds are in `_kx8_simd`). Activations are Q8_K-style: int8 codes
with one float scale per 256 ("q8_k" form, shared with the other K-quant units).

GGUF blocks (256 weights; offsets in bytes):
  Q4_K (144): 0 d f16 | 2 dmin f16 | 4 scales[12]: 6-bit scale and min of each 32-weight
        sub-block j: for j < 4 the low 6 bits of bytes j (scale) and 4 + j (min); for j >= 4
        the nibbles of byte 8 + j - 4 (scale low, min high) with the top 2 bits of bytes j - 4
        and j as bits 4-5 | 16 qs[128]: weight 64p + 32t + l is nibble t (0 = low) of byte
        32p + l.    w = d * sc[j] * q - dmin * m[j], j = e // 32, q in 0..15
  Q5_K (176): as Q4_K up to byte 16, then 16 qh[32]: the fifth bit of weight 32j + l is bit j of
        byte l | 48 qs[128] as Q4_K's.    q in 0..31
  IQ4_XS (136): 0 d f16 | 2 scales_h u16: top 2 bits of sub-block j's 6-bit scale at bits 2j |
        4 scales_l[4]: low 4 bits in nibble j % 2 of byte j // 2 | 8 qs[128]: sub-block j is
        bytes 16j..16j+15, weight l < 16 in the low nibble of byte 16j + l, l >= 16 in the high
        nibble of byte 16j + l - 16.    w = d * (scale - 32) * IQ4NL_VALUES[code]
  Q6_K (210): 0 ql[128]: low 4 bits of weight 128h + 32g + l in nibble g // 2 of byte
        64h + 32(g % 2) + l | 128 qh[64]: its high 2 bits at bits 2g, 2g + 1 of byte 32h + l |
        192 scales[16] int8, one per 16 weights | 208 d f16.    w = d * sc[e // 16] * (q - 32)

Records (group of rows 8g..8g+7, one super-block; "chunk" = 4 consecutive bytes of each of the
8 rows, 32 bytes):
  Q4_K (1184 = 8 x 148): d[8] f16 | dmin[8] f16 | sc[j][row] u8 (64) | m[j][row] u8 (64) |
        32 chunks of qs. The 6-bit fields are unpacked to a byte each (+4 bytes per row and block,
        +2.8%), so the kernel never decodes them.
  Q5_K (1440 = 8 x 180): Q4_K's first 160 bytes | 8 chunks of qh | 32 chunks of qs.
  IQ4_XS (1104 = 8 x 138): d[8] f16 | (scale - 32)[8 sub][8 rows] int8 | 32 chunks of qs.
  Q6_K (1680 = 8 x 210): d[8] f16 | for k = 0..7: (sc[2k], sc[2k + 1]) of each row (16 bytes) |
        16 steps of 96 bytes, step t = sub-block t (weights 16t..16t+15, one scale; read front to
        back: reading ql and qh as two separate streams measured 9 GB/s instead of 16 on a 256
        MB matrix): chunks X, Y, Z, whose byte 4i + b holds row i's 6-bit codes u_j = q + 32 of
        weights 16t + 4j + b as X = u0 | (u3 & 3) << 6, Y = u1 | (u3 >> 2 & 3) << 6, Z = u2 |
        (u3 >> 4) << 6: the same 6 bits per weight as the GGUF's ql/qh, regrouped so the
        kernel unpacks a step in 11 vector ops instead of 17, and all 4 chunks of a step share
        one scale (one sum per sub-block and token: few accumulators live in a token tile).
Dequantization follows gguf-py's float32 rounding order: D = d * sc rounded first, then D * q
(minus M = dmin * m), bit for bit.
"""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as T
from numba import njit

from ._kquant_common import q8_k_form
from ._q6_tile import matmul_t16 as q6_matmul_t16
from ._kx16_simd import kx16_q4_k, kx16_q5_k, kx16_q6_k
from ._kx8_simd import (kx8_iq4_xs, kx8_q2_k, kx8_q3_k, kx8_q4_k, kx8_q5_k, kx8_q6_k, kx8v_q4_k,
                        kx8v_q5_k, kx8v_q6_k)
from .base import register
from .interleaved import GROUP, IQ4NL_VALUES, RecordUnit, f16_at


@njit(nogil=True, cache=True, inline="always")
def _pack_q4_k(src, s, dst, d, i):
    dst[d + 2 * i] = src[s]                 # d
    dst[d + 2 * i + 1] = src[s + 1]
    dst[d + 16 + 2 * i] = src[s + 2]        # dmin
    dst[d + 16 + 2 * i + 1] = src[s + 3]
    for j in range(4):
        a = src[s + 4 + j]
        b = src[s + 8 + j]
        c = src[s + 12 + j]
        dst[d + 32 + 8 * j + i] = a & 63                              # scale j
        dst[d + 32 + 8 * (j + 4) + i] = (c & 15) | ((a >> 6) << 4)    # scale j + 4
        dst[d + 96 + 8 * j + i] = b & 63                              # min j
        dst[d + 96 + 8 * (j + 4) + i] = (c >> 4) | ((b >> 6) << 4)    # min j + 4
    for m in range(128):
        dst[d + 160 + 32 * (m // 4) + 4 * i + m % 4] = src[s + 16 + m]


@njit(nogil=True, cache=True, inline="always")
def _unpack_q4_k(q, o, i, dst, c):
    d = f16_at(q, o + 2 * i)
    dmin = f16_at(q, o + 16 + 2 * i)
    for j in range(8):
        dd = d * np.float32(q[o + 32 + 8 * j + i])
        mm = dmin * np.float32(q[o + 96 + 8 * j + i])
        sh = 4 * (j % 2)
        for l in range(32):
            m = 32 * (j // 2) + l                     # quant byte of the row
            v = (q[o + 160 + 32 * (m // 4) + 4 * i + m % 4] >> sh) & 15
            dst[c + 32 * j + l] = dd * np.float32(v) - mm


@njit(nogil=True, cache=True, inline="always")
def _pack_q5_k(src, s, dst, d, i):
    # the Q4_K header fields (the same 16 bytes at the same offsets), then qh and qs chunks
    dst[d + 2 * i] = src[s]
    dst[d + 2 * i + 1] = src[s + 1]
    dst[d + 16 + 2 * i] = src[s + 2]
    dst[d + 16 + 2 * i + 1] = src[s + 3]
    for j in range(4):
        a = src[s + 4 + j]
        b = src[s + 8 + j]
        c = src[s + 12 + j]
        dst[d + 32 + 8 * j + i] = a & 63
        dst[d + 32 + 8 * (j + 4) + i] = (c & 15) | ((a >> 6) << 4)
        dst[d + 96 + 8 * j + i] = b & 63
        dst[d + 96 + 8 * (j + 4) + i] = (c >> 4) | ((b >> 6) << 4)
    for m in range(32):
        dst[d + 160 + 32 * (m // 4) + 4 * i + m % 4] = src[s + 16 + m]
    for m in range(128):
        dst[d + 416 + 32 * (m // 4) + 4 * i + m % 4] = src[s + 48 + m]


@njit(nogil=True, cache=True, inline="always")
def _unpack_q5_k(q, o, i, dst, c):
    d = f16_at(q, o + 2 * i)
    dmin = f16_at(q, o + 16 + 2 * i)
    for j in range(8):
        dd = d * np.float32(q[o + 32 + 8 * j + i])
        mm = dmin * np.float32(q[o + 96 + 8 * j + i])
        sh = 4 * (j % 2)
        for l in range(32):
            m = 32 * (j // 2) + l
            v = (q[o + 416 + 32 * (m // 4) + 4 * i + m % 4] >> sh) & 15
            v |= ((q[o + 160 + 32 * (l // 4) + 4 * i + l % 4] >> j) & 1) << 4
            dst[c + 32 * j + l] = dd * np.float32(v) - mm


@njit(nogil=True, cache=True, inline="always")
def _q6_u(src, s, e):
    """The 6-bit code u = q + 32 of weight e of the GGUF Q6_K block at src[s]: e = 128h + 32g + l
    has its low 4 bits in nibble g // 2 of ql byte 64h + 32(g % 2) + l, its high 2 in bits 2g of
    qh byte 32h + l."""
    h, g, l = e // 128, (e // 32) % 4, e % 32
    ql = (np.int32(src[s + 64 * h + 32 * (g % 2) + l]) >> (4 * (g // 2))) & 15
    qh = (np.int32(src[s + 128 + 32 * h + l]) >> (2 * g)) & 3
    return ql | (qh << 4)


@njit(nogil=True, cache=True, inline="always")
def _pack_q6_k(src, s, dst, d, i):
    dst[d + 2 * i] = src[s + 208]
    dst[d + 2 * i + 1] = src[s + 209]
    for k in range(8):
        dst[d + 16 + 16 * k + 2 * i] = src[s + 192 + 2 * k]
        dst[d + 16 + 16 * k + 2 * i + 1] = src[s + 192 + 2 * k + 1]
    for t in range(16):       # step t: sub-block t's 4 chunks (weights 16t + 4j + b) in 3
        for b in range(4):
            u3 = _q6_u(src, s, 16 * t + 12 + b)
            at = d + 144 + 96 * t + 4 * i + b
            dst[at] = np.uint8(_q6_u(src, s, 16 * t + b) | ((u3 & 3) << 6))
            dst[at + 32] = np.uint8(_q6_u(src, s, 16 * t + 4 + b) | (((u3 >> 2) & 3) << 6))
            dst[at + 64] = np.uint8(_q6_u(src, s, 16 * t + 8 + b) | ((u3 >> 4) << 6))


@njit(nogil=True, cache=True, inline="always")
def _q6_code(q, at, j):
    """Code j (0..3) of the record step bytes X = q[at], Y = q[at + 32], Z = q[at + 64]."""
    if j < 3:
        return np.int32(q[at + 32 * j]) & 63
    return ((np.int32(q[at]) >> 6) | ((np.int32(q[at + 32]) >> 6) << 2)
            | ((np.int32(q[at + 64]) >> 6) << 4))


@njit(nogil=True, cache=True, inline="always")
def _unpack_q6_k(q, o, i, dst, c):
    d = f16_at(q, o + 2 * i)
    for e in range(256):
        t = e // 16
        sc = np.int32(q[o + 16 + 16 * (t // 2) + 2 * i + t % 2])
        sc = sc - 256 if sc > 127 else sc
        u = _q6_code(q, o + 144 + 96 * t + 4 * i + e % 4, (e % 16) // 4)
        dd = d * np.float32(sc)
        dst[c + e] = dd * np.float32(u - 32)


@njit(nogil=True, cache=True, inline="always")
def _pack_iq4_xs(src, s, dst, d, i):
    dst[d + 2 * i] = src[s]
    dst[d + 2 * i + 1] = src[s + 1]
    sh = np.int32(src[s + 2]) | (np.int32(src[s + 3]) << 8)
    for j in range(8):
        lo = (np.int32(src[s + 4 + j // 2]) >> (4 * (j % 2))) & 15
        hi = (sh >> (2 * j)) & 3
        dst[d + 16 + 8 * j + i] = np.uint8(((lo | (hi << 4)) - 32) & 255)
    for m in range(128):
        dst[d + 80 + 32 * (m // 4) + 4 * i + m % 4] = src[s + 8 + m]


@njit(nogil=True, cache=True, inline="always")
def _unpack_iq4_xs(q, o, i, dst, c):
    d = f16_at(q, o + 2 * i)
    for j in range(8):
        sc = np.int32(q[o + 16 + 8 * j + i])
        dd = d * np.float32(sc - 256 if sc > 127 else sc)
        for l in range(16):
            m = 16 * j + l
            v = q[o + 80 + 32 * (m // 4) + 4 * i + m % 4]
            dst[c + 32 * j + l] = dd * IQ4NL_VALUES[v & 15]
            dst[c + 32 * j + 16 + l] = dd * IQ4NL_VALUES[v >> 4]


@njit(nogil=True, cache=True, inline="always")
def _pack_q3_k(src, s, dst, d, i):
    dst[d + 2 * i] = src[s + 108]
    dst[d + 2 * i + 1] = src[s + 109]
    for t in range(16):
        lo = (np.int32(src[s + 96 + t % 8]) >> (4 * (t // 8))) & 15
        hi = (np.int32(src[s + 104 + t % 4]) >> (2 * (t // 4))) & 3
        dst[d + 16 + 8 * t + i] = np.uint8(((lo | (hi << 4)) - 32) & 255)
    for m in range(32):
        dst[d + 144 + 32 * (m // 4) + 4 * i + m % 4] = src[s + m]
    for m in range(64):
        dst[d + 400 + 32 * (m // 4) + 4 * i + m % 4] = src[s + 32 + m]


@njit(nogil=True, cache=True, inline="always")
def _unpack_q3_k(q, o, i, dst, c):
    d = f16_at(q, o + 2 * i)
    for h in range(2):
        for j in range(4):
            for k in range(2):
                t = 8 * h + 2 * j + k
                sc = np.int32(q[o + 16 + 8 * t + i])
                dd = d * np.float32(sc - 256 if sc > 127 else sc)
                for l in range(16):
                    mq = 32 * h + 16 * k + l
                    mh = 16 * k + l
                    lo = (np.int32(q[o + 400 + 32 * (mq // 4) + 4 * i + mq % 4]) >> (2 * j)) & 3
                    hb = (np.int32(q[o + 144 + 32 * (mh // 4) + 4 * i + mh % 4]) >> (4 * h + j)) & 1
                    dst[c + 16 * t + l] = dd * np.float32(lo + 4 * hb - 4)


@njit(nogil=True, cache=True, inline="always")
def _pack_q2_k(src, s, dst, d, i):
    dst[d + 2 * i] = src[s + 80]
    dst[d + 2 * i + 1] = src[s + 81]
    dst[d + 16 + 2 * i] = src[s + 82]
    dst[d + 16 + 2 * i + 1] = src[s + 83]
    for t in range(16):
        dst[d + 32 + 8 * t + i] = src[s + t]
    for m in range(64):
        dst[d + 160 + 32 * (m // 4) + 4 * i + m % 4] = src[s + 16 + m]


@njit(nogil=True, cache=True, inline="always")
def _unpack_q2_k(q, o, i, dst, c):
    d = f16_at(q, o + 2 * i)
    dmin = f16_at(q, o + 16 + 2 * i)
    for h in range(2):
        for j in range(4):
            for k in range(2):
                t = 8 * h + 2 * j + k
                sm = np.int32(q[o + 32 + 8 * t + i])
                dd = d * np.float32(sm & 15)
                mm = dmin * np.float32(sm >> 4)
                for l in range(16):
                    mq = 32 * h + 16 * k + l
                    v = (np.int32(q[o + 160 + 32 * (mq // 4) + 4 * i + mq % 4]) >> (2 * j)) & 3
                    dst[c + 16 * t + l] = dd * np.float32(v) - mm


class _KRecordUnit(RecordUnit):
    x_form = ("q8_k", q8_k_form)

    def kernel_x(self, form):
        return form     # (xq, xd, xb)

    def synthetic(self, n: int, k: int, rng: np.random.Generator) -> np.ndarray:
        """Random raw rows (N, row_bytes) with sane f16 super-scales (every other bit pattern is
        a valid block), for calibration and benchmarks."""
        nb = k // 256
        raw = rng.integers(0, 256, (n, nb, self.type_size), dtype=np.uint8)
        for off in self.f16_fields:
            raw[:, :, off:off + 2] = rng.uniform(1e-4, 1e-2, (n, nb, 1)).astype(
                np.float16).view(np.uint8)
        return raw.reshape(n, nb * self.type_size)


@register
class Q4_K(_KRecordUnit):
    qtype = T.Q4_K
    record_bytes = GROUP * 148
    f16_fields = (0, 2)
    pack = _pack_q4_k
    unpack = _unpack_q4_k
    step = kx8_q4_k
    step_vnni = kx8v_q4_k
    step_wide = kx16_q4_k


@register
class Q5_K(_KRecordUnit):
    qtype = T.Q5_K
    record_bytes = GROUP * 180
    f16_fields = (0, 2)
    pack = _pack_q5_k
    unpack = _unpack_q5_k
    step = kx8_q5_k
    step_vnni = kx8v_q5_k
    step_wide = kx16_q5_k


@register
class Q6_K(_KRecordUnit):
    qtype = T.Q6_K
    record_bytes = GROUP * 210
    f16_fields = (208,)
    pack = _pack_q6_k
    unpack = _unpack_q6_k
    step = kx8_q6_k
    step_vnni = kx8v_q6_k
    step_wide = kx16_q6_k
    tile16 = staticmethod(q6_matmul_t16)


@register
class IQ4_XS(_KRecordUnit):
    qtype = T.IQ4_XS
    record_bytes = GROUP * 138
    f16_fields = (0,)
    pack = _pack_iq4_xs
    unpack = _unpack_iq4_xs
    step = kx8_iq4_xs


@register
class Q2_K(_KRecordUnit):
    qtype = T.Q2_K
    record_bytes = GROUP * 84
    f16_fields = (80, 82)
    pack = _pack_q2_k
    unpack = _unpack_q2_k
    step = kx8_q2_k


@register
class Q3_K(_KRecordUnit):
    qtype = T.Q3_K
    record_bytes = GROUP * 114
    f16_fields = (108,)
    pack = _pack_q3_k
    unpack = _unpack_q3_k
    step = kx8_q3_k
