"""TQ1_0, TQ2_0: ternary types (weights d * {-1, 0, 1}, blocks of 256; kernels in `_iq_common`).

GGUF blocks (offsets in bytes):
  TQ2_0 (66): 0 qs[64]: weight 128h + 32l + m is bits 2l..2l + 1 of qs[32h + m], minus 1 |
        64 d f16.
  TQ1_0 (54): 0 qs[48]: five base-3 digits per byte | 48 qh[4]: four digits per byte | 52 d f16.
        Digit n of byte b is ((uint8(b * 3^n) * 3) >> 8) (the byte holds a fixed-point fraction),
        minus 1 the weight. Weights 0..159: digit n of qs[m] (m < 32) is weight 32n + m;
        160..239: digit n of qs[32 + m] (m < 16) is 160 + 16n + m; 240..255: digit n of qh[m]
        is 240 + 4n + m.
w = d * q (gguf-py's order); the kernels dot the integer q with x (scale 1 per 32) and scale by
d once per block, as the IQ units do (`IQUnit`: the same q8_k activation form and variants).
"""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as T
from numba import njit

from ._iq512_simd import crumbs64, join32
from ._iq_common import IQUnit
from ._iq_simd import crumbs32, trits32, trits32q
from ._simd import load_f16
from .base import register
from .interleaved import f16_at

_REP = 0x0101010101010101                       # a byte in all 8 bytes of an int64
_POW3 = np.array([1, 3, 9, 27, 81], np.int64)   # (5,) the digit multipliers
_ONES16 = 0x0001000100010001                    # sc4: scale 1 for every 16 weights


@njit(nogil=True, cache=True, inline="always")
def _deq_tq2_0(q, o, dst, c):
    d = f16_at(q, o + 64)
    for h in range(2):
        for l in range(4):
            for m in range(32):
                v = np.int64((q[o + 32 * h + m] >> (2 * l)) & 3) - 1
                dst[c + 128 * h + 32 * l + m] = d * np.float32(v)


@njit(nogil=True, cache=True, inline="always")
def _sub_tq2_0(q, o, j, ib):
    return crumbs32(q, o + 32 * (j // 4), 2 * (j % 4)), 1, 1


@njit(nogil=True, cache=True, inline="always")
def _sub64_tq2_0(q, o, p, ib, st):
    return crumbs64(q, o + 32 * (p // 2), 4 * (p % 2)), _ONES16


@njit(nogil=True, cache=True, inline="always")
def _scale_tq2_0(q, o):
    return load_f16(q, o + 64)


@njit(nogil=True, cache=True, inline="always")
def _digit(b, p):
    return np.int64((((b * p) & 255) * 3) >> 8) - 1


@njit(nogil=True, cache=True, inline="always")
def _deq_tq1_0(q, o, dst, c):
    d = f16_at(q, o + 52)
    for n in range(5):
        for m in range(32):
            dst[c + 32 * n + m] = d * np.float32(_digit(np.int64(q[o + m]), _POW3[n]))
        for m in range(16):
            dst[c + 160 + 16 * n + m] = d * np.float32(_digit(np.int64(q[o + 32 + m]), _POW3[n]))
    for n in range(4):
        for m in range(4):
            dst[c + 240 + 4 * n + m] = d * np.float32(_digit(np.int64(q[o + 48 + m]), _POW3[n]))


@njit(nogil=True, cache=True, inline="always")
def _sub_tq1_0(q, o, j, ib):
    if j < 5:
        p = _POW3[j] * _REP
        w = trits32(q, o, o + 16, p, p)
    elif j == 5:
        w = trits32(q, o + 32, o + 32, _REP, 3 * _REP)
    elif j == 6:
        w = trits32(q, o + 32, o + 32, 9 * _REP, 27 * _REP)
    else:
        w = trits32q(q, o + 32, o + 48, 81 * _REP, 0)
    return w, 1, 1


@njit(nogil=True, cache=True, inline="always")
def _sub64_tq1_0(q, o, p, ib, st):
    a, _, _ = _sub_tq1_0(q, o, 2 * p, ib)
    b, _, _ = _sub_tq1_0(q, o, 2 * p + 1, ib)
    return join32(a, b), _ONES16


@njit(nogil=True, cache=True, inline="always")
def _scale_tq1_0(q, o):
    return load_f16(q, o + 52)


@register
class TQ2_0(IQUnit):
    qtype = T.TQ2_0
    deq, scale, sub, sub64 = _deq_tq2_0, _scale_tq2_0, _sub_tq2_0, _sub64_tq2_0
    f16_fields = (64,)


@register
class TQ1_0(IQUnit):
    qtype = T.TQ1_0
    deq, scale, sub, sub64 = _deq_tq1_0, _scale_tq1_0, _sub_tq1_0, _sub64_tq1_0
    f16_fields = (52,)
