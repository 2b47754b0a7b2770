"""IQ2_XXS, IQ2_XS, IQ2_S: 2-bit codebook types (blocks of 256 weights; kernels in `_iq_common`).

GGUF blocks (offsets in bytes; sub-block j = weights 32j..32j + 31, group l of it = 8 weights):
  IQ2_XXS (66): 0 d f16 | 2 eight 8-byte sub-blocks: 4 grid indices (bytes), then a u32 whose
        bits 7l..7l + 6 index group l's sign pattern (KSIGNS) and bits 28..31 are the scale s.
        w = d * (0.5 + s) * 0.25 * grid[idx][k] * sign
  IQ2_XS (74): 0 d | 2 qs u16[32]: group 4j + l: bits 0..8 grid index (512), 9..15 sign index |
        66 scales[8]: sub-block j's low nibble scales its weights 0..15, the high nibble 16..31.
  IQ2_S (82): 0 d | 2 qs[32] low 8 bits of group g's index | 34 signs[32] one explicit sign
        byte per group | 66 qh[8]: bits 2l, 2l + 1 of byte j are bits 8, 9 of group 4j + l's
        index (1024) | 74 scales[8] as IQ2_XS.
Grid values are 8, 25 or 43 (`_iq_grids`); in the kernels w / (d / 8) = (2s + 1) * g * sign.
"""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as T
from numba import njit

from ._iq512_lut import iq2_step, iq2s_block, iq2xs_block, iq2xxs_block
from ._iq_common import IQUnit, u16_at, u32_at
from ._iq_grids import (IQ2_VALS, IQ2S_CODES, IQ2S_GRID, IQ2S_U64, IQ2XS_CODES, IQ2XS_GRID,
                        IQ2XS_U64, IQ2XXS_CODES, IQ2XXS_GRID, IQ2XXS_U64, KSIGNS, KSIGNS64,
                        SIGNS64)
from ._iq_simd import grid8_signed, iq2s_indices, ld8, ld32, ld64, ld_idx, no_indices
from ._simd import load_f16
from .base import register
from .interleaved import f16_at

_HALF, _QUARTER, _EIGHTH = np.float32(0.5), np.float32(0.25), np.float32(0.125)


@njit(nogil=True, cache=True, inline="always")
def _put8(dst, c, db, grid, idx, sb):
    # dst[c:c + 8] = (db * grid[idx]) * sign, gguf-py's float order
    for k in range(8):
        v = db * grid[idx, k]
        dst[c + k] = -v if (sb >> k) & 1 else v


@njit(nogil=True, cache=True, inline="always")
def _scale8(q, o):
    return load_f16(q, o) * _EIGHTH


# --- IQ2_XXS ------------------------------------------------------------------------------------

@njit(nogil=True, cache=True, inline="always")
def _deq_iq2_xxs(q, o, dst, c):
    d = f16_at(q, o)
    for j in range(8):
        p = o + 2 + 8 * j
        aux = u32_at(q, p + 4)
        db = d * (_HALF + np.float32(aux >> 28)) * _QUARTER
        for l in range(4):
            _put8(dst, c + 32 * j + 8 * l, db, IQ2XXS_GRID, q[p + l], KSIGNS[(aux >> (7 * l)) & 127])


@njit(nogil=True, cache=True, inline="always")
def _sub_iq2_xxs(q, o, j, ib):
    v = ld64(q, o + 2 + 8 * j)
    aux = (v >> 32) & 0xFFFFFFFF
    w = grid8_signed(IQ2XXS_U64, v & 255, (v >> 8) & 255, (v >> 16) & 255, (v >> 24) & 255,
                     KSIGNS64, aux & 127, (aux >> 7) & 127, (aux >> 14) & 127, (aux >> 21) & 127)
    s = 2 * (aux >> 28) + 1
    return w, s, s


@njit(nogil=True, cache=True, inline="always")
def _block_iq2_xxs(q, o):
    return iq2xxs_block(q, o, IQ2XXS_CODES, KSIGNS)


@njit(nogil=True, cache=True, inline="always")
def _lut64_iq2(q, o, p, ib, st):
    return iq2_step(st, p, IQ2_VALS)


@njit(nogil=True, cache=True, inline="always")
def _block_iq2_xs(q, o):
    return iq2xs_block(q, o, IQ2XS_CODES, KSIGNS)


@njit(nogil=True, cache=True, inline="always")
def _block_iq2_s(q, o):
    return iq2s_block(q, o, IQ2S_CODES)


# --- IQ2_XS -------------------------------------------------------------------------------------

@njit(nogil=True, cache=True, inline="always")
def _deq_iq2_xs(q, o, dst, c):
    d = f16_at(q, o)
    for j in range(8):
        sc = np.int64(q[o + 66 + j])
        for h in range(2):
            db = d * (_HALF + np.float32((sc >> (4 * h)) & 15)) * _QUARTER
            for l in range(2):
                v = u16_at(q, o + 2 + 2 * (4 * j + 2 * h + l))
                _put8(dst, c + 32 * j + 16 * h + 8 * l, db, IQ2XS_GRID, v & 511, KSIGNS[v >> 9])


@njit(nogil=True, cache=True, inline="always")
def _sub_iq2_xs(q, o, j, ib):
    v = ld64(q, o + 2 + 8 * j)
    v0 = v & 0xFFFF
    v1 = (v >> 16) & 0xFFFF
    v2 = (v >> 32) & 0xFFFF
    v3 = (v >> 48) & 0xFFFF
    w = grid8_signed(IQ2XS_U64, v0 & 511, v1 & 511, v2 & 511, v3 & 511, KSIGNS64, v0 >> 9,
                     v1 >> 9, v2 >> 9, v3 >> 9)
    sc = ld8(q, o + 66 + j)
    return w, 2 * (sc & 15) + 1, 2 * (sc >> 4) + 1


# --- IQ2_S --------------------------------------------------------------------------------------

@njit(nogil=True, cache=True, inline="always")
def _deq_iq2_s(q, o, dst, c):
    d = f16_at(q, o)
    for j in range(8):
        sc = np.int64(q[o + 74 + j])
        qh = np.int64(q[o + 66 + j])
        for h in range(2):
            db = d * (_HALF + np.float32((sc >> (4 * h)) & 15)) * _QUARTER
            for l in range(2):
                g = 2 * h + l
                idx = np.int64(q[o + 2 + 4 * j + g]) | (((qh >> (2 * g)) & 3) << 8)
                _put8(dst, c + 32 * j + 8 * g, db, IQ2S_GRID, idx, q[o + 34 + 4 * j + g])


@njit(nogil=True, cache=True, inline="always")
def _sub_iq2_s(q, o, j, ib):
    sg = ld32(q, o + 34 + 4 * j)
    w = grid8_signed(IQ2S_U64, ld_idx(ib, 4 * j), ld_idx(ib, 4 * j + 1), ld_idx(ib, 4 * j + 2),
                     ld_idx(ib, 4 * j + 3), SIGNS64, sg & 255, (sg >> 8) & 255, (sg >> 16) & 255,
                     sg >> 24)
    sc = ld8(q, o + 74 + j)
    return w, 2 * (sc & 15) + 1, 2 * (sc >> 4) + 1


@register
class IQ2_XXS(IQUnit):
    qtype = T.IQ2_XXS
    deq, scale, sub = _deq_iq2_xxs, _scale8, _sub_iq2_xxs
    sub64, block64 = _lut64_iq2, _block_iq2_xxs


@register
class IQ2_XS(IQUnit):
    qtype = T.IQ2_XS
    deq, scale, sub = _deq_iq2_xs, _scale8, _sub_iq2_xs
    sub64, block64 = _lut64_iq2, _block_iq2_xs


@register
class IQ2_S(IQUnit):
    qtype = T.IQ2_S
    deq, scale, sub, prep = _deq_iq2_s, _scale8, _sub_iq2_s, iq2s_indices
    sub64, block64, prep64 = _lut64_iq2, _block_iq2_s, no_indices
