"""IQ1_S, IQ1_M: ~1.6-1.75-bit codebook types (blocks of 256 weights; kernels in `_iq_common`).

GGUF blocks (offsets in bytes; group g = weights 8g..8g + 7, sub-block j = groups 4j..4j + 3):
  IQ1_S (50): 0 d f16 | 2 qs[32]: low 8 bits of group g's grid index (2048) | 34 qh u16[8]:
        sub-block j's bits 3l..3l + 2 are bits 8..10 of group 4j + l's index, bits 12..14 the
        scale s, bit 15 the delta's sign.    w = d * (2s + 1) * (grid[idx][k] +- 1/8)
  IQ1_M (56): 0 qs[32] as IQ1_S | 32 qh[16]: nibble g % 2 of byte g // 2 holds bits 8..10 of
        group g's index (bits 0..2) and its delta's sign (bit 3) | 48 scales u16[4]: 3-bit scale
        of weights 16i..16i + 15 at bits 3(i % 4) of u16 i // 4; the f16 d is the top nibbles of
        the four u16 (u16 0's in bits 0..3, ..., u16 3's in bits 12..15).
        w = d * (2s + 1) * (grid[idx][k] +- 1/8)
Grid values are -1, 0, 1. The kernels use w / (d / 8) = (2s + 1) * (8g +- 1): 8g comes from the
table (`_iq_grids.IQ1S_U64`), +-1 is added bytewise, so every weight is an int8 in -9..9.
"""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as T
from numba import njit

from ._iq512_iq1 import iq1m_block, iq1m_step, iq1s_block, iq1s_step

from ._iq_common import IQUnit, half_to_f32, u16_at
from ._iq_grids import IQ1_DELTA, IQ1S_GRID, IQ1S_U64, MINUS1_64, PLUS1_64
from ._iq_simd import (grid8_plus, half_bits, iq1m_indices, iq1s_indices, ld16, ld64, ld_idx,
                       no_indices)
from ._simd import load_f16
from .base import register
from .interleaved import f16_at

_EIGHTH = np.float32(0.125)


@njit(nogil=True, cache=True, inline="always")
def _put8(dst, c, dl, idx, neg):
    # dst[c:c + 8] = dl * (grid[idx] + delta), gguf-py's float order
    delta = -IQ1_DELTA if neg else IQ1_DELTA
    for k in range(8):
        dst[c + k] = dl * (IQ1S_GRID[idx, k] + delta)


@njit(nogil=True, cache=True, inline="always")
def _deq_iq1_s(q, o, dst, c):
    d = f16_at(q, o)
    for j in range(8):
        qh = u16_at(q, o + 34 + 2 * j)
        dl = d * np.float32(2 * ((qh >> 12) & 7) + 1)
        for l in range(4):
            idx = np.int64(q[o + 2 + 4 * j + l]) | (((qh >> (3 * l)) & 7) << 8)
            _put8(dst, c + 32 * j + 8 * l, dl, idx, qh & 0x8000)


@njit(nogil=True, cache=True, inline="always")
def _sub_iq1_s(q, o, j, ib):
    qh = ld16(q, o + 34 + 2 * j)
    a = MINUS1_64 if qh & 0x8000 else PLUS1_64
    w = grid8_plus(IQ1S_U64, ld_idx(ib, 4 * j), ld_idx(ib, 4 * j + 1), ld_idx(ib, 4 * j + 2),
                   ld_idx(ib, 4 * j + 3), a, a, a, a)
    s = 2 * ((qh >> 12) & 7) + 1
    return w, s, s


@njit(nogil=True, cache=True, inline="always")
def _block_iq1_s(q, o):
    return iq1s_block(q, o)


@njit(nogil=True, cache=True, inline="always")
def _block_iq1_m(q, o):
    return iq1m_block(q, o)


@njit(nogil=True, cache=True, inline="always")
def _blk64_iq1_s(q, o, p, ib, st):
    return iq1s_step(st, p, IQ1S_U64)


@njit(nogil=True, cache=True, inline="always")
def _blk64_iq1_m(q, o, p, ib, st):
    return iq1m_step(st, p, IQ1S_U64)


@njit(nogil=True, cache=True, inline="always")
def _scale_iq1_s(q, o):
    return load_f16(q, o) * _EIGHTH


@njit(nogil=True, cache=True, inline="always")
def _d_bits_iq1_m(q, o):
    s = ld64(q, o + 48)
    return ((s >> 12) & 0xF) | ((s >> 24) & 0xF0) | ((s >> 36) & 0xF00) | ((s >> 48) & 0xF000)


@njit(nogil=True, cache=True, inline="always")
def _s_iq1_m(q, o, i):
    """2 * s + 1 of weights 16i..16i + 15."""
    return 2 * ((u16_at(q, o + 48 + 2 * (i // 4)) >> (3 * (i % 4))) & 7) + 1


@njit(nogil=True, cache=True, inline="always")
def _nib_iq1_m(q, o, g):
    return (np.int64(q[o + 32 + g // 2]) >> (4 * (g % 2))) & 15


@njit(nogil=True, cache=True, inline="always")
def _deq_iq1_m(q, o, dst, c):
    d = half_to_f32(_d_bits_iq1_m(q, o))
    for i in range(16):
        dl = d * np.float32(_s_iq1_m(q, o, i))
        for l in range(2):
            g = 2 * i + l
            nib = _nib_iq1_m(q, o, g)
            _put8(dst, c + 8 * g, dl, np.int64(q[o + g]) | ((nib & 7) << 8), nib & 8)


@njit(nogil=True, cache=True, inline="always")
def _plus(nib):
    return MINUS1_64 if nib & 8 else PLUS1_64


@njit(nogil=True, cache=True, inline="always")
def _sub_iq1_m(q, o, j, ib):
    h = ld16(q, o + 32 + 2 * j)              # the 4 nibbles of groups 4j..4j + 3
    w = grid8_plus(IQ1S_U64, ld_idx(ib, 4 * j), ld_idx(ib, 4 * j + 1), ld_idx(ib, 4 * j + 2),
                   ld_idx(ib, 4 * j + 3), _plus(h), _plus(h >> 4), _plus(h >> 8), _plus(h >> 12))
    sc = ld16(q, o + 48 + 2 * (j // 2)) >> (6 * (j % 2))
    return w, 2 * (sc & 7) + 1, 2 * ((sc >> 3) & 7) + 1


@njit(nogil=True, cache=True, inline="always")
def _scale_iq1_m(q, o):
    return half_bits(_d_bits_iq1_m(q, o)) * _EIGHTH


@register
class IQ1_S(IQUnit):
    qtype = T.IQ1_S
    deq, scale, sub, prep = _deq_iq1_s, _scale_iq1_s, _sub_iq1_s, iq1s_indices
    sub64, block64, prep64 = _blk64_iq1_s, _block_iq1_s, no_indices


@register
class IQ1_M(IQUnit):
    qtype = T.IQ1_M
    deq, scale, sub, prep = _deq_iq1_m, _scale_iq1_m, _sub_iq1_m, iq1m_indices
    sub64, block64, prep64 = _blk64_iq1_m, _block_iq1_m, no_indices

    def synthetic(self, n: int, k: int, rng: np.random.Generator,
                  d_range: tuple[float, float] = (1e-4, 1e-2)) -> np.ndarray:
        """As IQUnit's, with the f16 d spread over the scales' top nibbles."""
        nb = k // 256
        raw = rng.integers(0, 256, (n, nb, self.type_size), dtype=np.uint8)
        d = rng.uniform(*d_range, (n, nb)).astype(np.float16).view(np.uint16).astype(np.int64)
        for i in range(4):
            nib = (d >> (4 * i)) & 15
            raw[:, :, 49 + 2 * i] = (raw[:, :, 49 + 2 * i] & 0x0F) | (nib << 4).astype(np.uint8)
        return raw.reshape(n, nb * self.type_size)
