"""Block layouts of the 32-element GGML types and their exact scalar decoders (plain Numba).

Every block covers 32 consecutive weights of a row. Multi-byte fields are little-endian; `d` and
`m` are IEEE half floats. "lo/hi nibble of qs[j]" means qs[j] & 15 / qs[j] >> 4. A decoder writes
the block's 32 float32 values to dst[c:c+32] with the same float32 operations, in the same order,
as gguf-py's reference dequantizer, so the results match it bit for bit. (Q4_0 and Q8_0 are
stored re-laid out in 8-row records; their decoders are in interleaved.py.)

Q4_0  (18 bytes) | d:f16 | qs:16 bytes |
      v[j] = d * (lo(qs[j]) - 8),  v[j+16] = d * (hi(qs[j]) - 8),  j < 16
Q4_1  (20 bytes) | d:f16 | m:f16 | qs:16 bytes |
      v[j] = d * lo(qs[j]) + m,   v[j+16] = d * hi(qs[j]) + m
Q5_0  (22 bytes) | d:f16 | qh:u32 | qs:16 bytes |     bit i of qh is bit 4 of element i
      v[j] = d * ((lo(qs[j]) | bit j << 4) - 16),  v[j+16] = d * ((hi(qs[j]) | bit j+16 << 4) - 16)
Q5_1  (24 bytes) | d:f16 | m:f16 | qh:u32 | qs:16 bytes |
      as Q5_0 without the -16, plus m
Q8_0  (34 bytes) | d:f16 | qs:32 x int8 |
      v[j] = d * qs[j]
IQ4_NL (18 bytes) | d:f16 | qs:16 bytes |           nibbles index the fixed table IQ4NL_VALUES
      v[j] = d * T[lo(qs[j])],  v[j+16] = d * T[hi(qs[j])]
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit

IQ4NL_VALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113],
                        dtype=np.float32)


@njit(nogil=True, cache=True, inline="always")
def f16_at(w, o):
    """The half float at bytes w[o], w[o+1], widened exactly (portable: no F16C needed)."""
    h = np.int32(w[o]) | (np.int32(w[o + 1]) << 8)
    e = (h >> 10) & 0x1F
    m = h & 0x3FF
    if e == 0:
        v = math.ldexp(float(m), -24)
    elif e == 31:
        v = math.inf if m == 0 else math.nan
    else:
        v = math.ldexp(float(m | 0x400), e - 25)
    return np.float32(-v if h & 0x8000 else v)


@njit(nogil=True, cache=True, inline="always")
def _u32_at(w, o):
    return (np.uint32(w[o]) | (np.uint32(w[o + 1]) << np.uint32(8))
            | (np.uint32(w[o + 2]) << np.uint32(16)) | (np.uint32(w[o + 3]) << np.uint32(24)))


@njit(nogil=True, cache=True, inline="always")
def decode_q4_1(w, o, dst, c):
    d = f16_at(w, o)
    m = f16_at(w, o + 2)
    for j in range(16):
        q = np.int32(w[o + 4 + j])
        dst[c + j] = d * np.float32(q & 15) + m
        dst[c + j + 16] = d * np.float32(q >> 4) + m


@njit(nogil=True, cache=True, inline="always")
def decode_q5_0(w, o, dst, c):
    d = f16_at(w, o)
    qh = np.int64(_u32_at(w, o + 2))
    for j in range(16):
        q = np.int32(w[o + 6 + j])
        lo = (q & 15) | np.int32(((qh >> j) & 1) << 4)
        hi = (q >> 4) | np.int32(((qh >> (j + 16)) & 1) << 4)
        dst[c + j] = d * np.float32(lo - 16)
        dst[c + j + 16] = d * np.float32(hi - 16)


@njit(nogil=True, cache=True, inline="always")
def decode_q5_1(w, o, dst, c):
    d = f16_at(w, o)
    m = f16_at(w, o + 2)
    qh = np.int64(_u32_at(w, o + 4))
    for j in range(16):
        q = np.int32(w[o + 8 + j])
        lo = (q & 15) | np.int32(((qh >> j) & 1) << 4)
        hi = (q >> 4) | np.int32(((qh >> (j + 16)) & 1) << 4)
        dst[c + j] = d * np.float32(lo) + m
        dst[c + j + 16] = d * np.float32(hi) + m


@njit(nogil=True, cache=True, inline="always")
def decode_iq4_nl(w, o, dst, c):
    d = f16_at(w, o)
    for j in range(16):
        q = np.int32(w[o + 2 + j])
        dst[c + j] = d * IQ4NL_VALUES[q & 15]
        dst[c + j + 16] = d * IQ4NL_VALUES[q >> 4]
