"""IQ3_XXS, IQ3_S: 3-bit codebook types (blocks of 256 weights; kernels in `_iq_common`).

GGUF blocks (offsets in bytes; sub-block j = weights 32j..32j + 31; a grid entry is 4 weights):
  IQ3_XXS (98): 0 d f16 | 2 qs[64]: one grid index (256) per 4 weights | 66 u32[8]: sub-block
        j's bits 7l..7l + 6 index weights 8l..8l + 7's sign pattern (KSIGNS), bits 28..31 the
        scale s.    w = d * (0.5 + s) * 0.5 * grid[idx][k] * sign;  grid values 4..62
  IQ3_S (110): 0 d | 2 qs[64] low 8 bits of the index (512) | 66 qh[8]: bit l of byte j is bit
        8 of entry 8j + l's index | 74 signs[32]: one explicit sign byte per 8 weights |
        106 scales[4]: nibble j % 2 of byte j // 2 is sub-block j's s.
        w = d * (1 + 2s) * grid[idx][k] * sign;  grid values 1..15
In the kernels w / f = (2s + 1) * g * sign, with f = d / 4 (IQ3_XXS) or d (IQ3_S).
"""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as T
from numba import njit

from ._iq512_lut import iq3_step, iq3s_block, iq3xxs_block
from ._iq_common import IQUnit, u32_at
from ._iq_grids import (IQ3S_CODES, IQ3S_GRID, IQ3S_U32, IQ3S_VALS, IQ3XXS_CODES, IQ3XXS_GRID,
                        IQ3XXS_U32, IQ3XXS_VALS, KSIGNS, KSIGNS64, SIGNS64)
from ._iq_simd import grid4_signed, iq3s_indices, ld8, ld32, ld64, ld_idx, no_indices
from ._simd import load_f16
from .base import register
from .interleaved import f16_at

_HALF, _QUARTER = np.float32(0.5), np.float32(0.25)


@njit(nogil=True, cache=True, inline="always")
def _put4(dst, c, db, grid, idx, sb, sh):
    # dst[c:c + 4] = (db * grid[idx]) * sign, signs in bits sh..sh + 3 of sb
    for k in range(4):
        v = db * grid[idx, k]
        dst[c + k] = -v if (sb >> (sh + k)) & 1 else v


@njit(nogil=True, cache=True, inline="always")
def _deq_iq3_xxs(q, o, dst, c):
    d = f16_at(q, o)
    for j in range(8):
        aux = u32_at(q, o + 66 + 4 * j)
        db = d * (_HALF + np.float32(aux >> 28)) * _HALF
        for l in range(4):
            sb = KSIGNS[(aux >> (7 * l)) & 127]
            for m in range(2):
                _put4(dst, c + 32 * j + 8 * l + 4 * m, db, IQ3XXS_GRID, q[o + 2 + 8 * j + 2 * l + m],
                      sb, 4 * m)


@njit(nogil=True, cache=True, inline="always")
def _sub_iq3_xxs(q, o, j, ib):
    v = ld64(q, o + 2 + 8 * j)
    aux = ld32(q, o + 66 + 4 * j)
    w = grid4_signed(IQ3XXS_U32, v & 255, (v >> 8) & 255, (v >> 16) & 255, (v >> 24) & 255,
                     (v >> 32) & 255, (v >> 40) & 255, (v >> 48) & 255, (v >> 56) & 255, KSIGNS64,
                     aux & 127, (aux >> 7) & 127, (aux >> 14) & 127, (aux >> 21) & 127)
    s = 2 * (aux >> 28) + 1
    return w, s, s


@njit(nogil=True, cache=True, inline="always")
def _block_iq3_xxs(q, o):
    return iq3xxs_block(q, o, IQ3XXS_CODES, KSIGNS)


@njit(nogil=True, cache=True, inline="always")
def _lut64_iq3_xxs(q, o, p, ib, st):
    return iq3_step(st, p, IQ3XXS_VALS)


@njit(nogil=True, cache=True, inline="always")
def _block_iq3_s(q, o):
    return iq3s_block(q, o, IQ3S_CODES)


@njit(nogil=True, cache=True, inline="always")
def _lut64_iq3_s(q, o, p, ib, st):
    return iq3_step(st, p, IQ3S_VALS)


@njit(nogil=True, cache=True, inline="always")
def _scale_iq3_xxs(q, o):
    return load_f16(q, o) * _QUARTER


@njit(nogil=True, cache=True, inline="always")
def _s_iq3_s(q, o, j):
    return (np.int64(q[o + 106 + j // 2]) >> (4 * (j % 2))) & 15


@njit(nogil=True, cache=True, inline="always")
def _deq_iq3_s(q, o, dst, c):
    d = f16_at(q, o)
    for j in range(8):
        db = d * np.float32(1 + 2 * _s_iq3_s(q, o, j))
        qh = np.int64(q[o + 66 + j])
        for l in range(8):
            idx = np.int64(q[o + 2 + 8 * j + l]) | (((qh >> l) & 1) << 8)
            _put4(dst, c + 32 * j + 4 * l, db, IQ3S_GRID, idx, q[o + 74 + 4 * j + l // 2],
                  4 * (l % 2))


@njit(nogil=True, cache=True, inline="always")
def _sub_iq3_s(q, o, j, ib):
    sg = ld32(q, o + 74 + 4 * j)
    i = 8 * j
    w = grid4_signed(IQ3S_U32, ld_idx(ib, i), ld_idx(ib, i + 1), ld_idx(ib, i + 2),
                     ld_idx(ib, i + 3), ld_idx(ib, i + 4), ld_idx(ib, i + 5), ld_idx(ib, i + 6),
                     ld_idx(ib, i + 7), SIGNS64, sg & 255, (sg >> 8) & 255, (sg >> 16) & 255,
                     sg >> 24)
    sc = 1 + 2 * ((ld8(q, o + 106 + j // 2) >> (4 * (j % 2))) & 15)
    return w, sc, sc


@njit(nogil=True, cache=True, inline="always")
def _scale_iq3_s(q, o):
    return load_f16(q, o)


@register
class IQ3_XXS(IQUnit):
    qtype = T.IQ3_XXS
    deq, scale, sub = _deq_iq3_xxs, _scale_iq3_xxs, _sub_iq3_xxs
    sub64, block64 = _lut64_iq3_xxs, _block_iq3_xxs


@register
class IQ3_S(IQUnit):
    qtype = T.IQ3_S
    deq, scale, sub, prep = _deq_iq3_s, _scale_iq3_s, _sub_iq3_s, iq3s_indices
    sub64, block64, prep64 = _lut64_iq3_s, _block_iq3_s, no_indices
