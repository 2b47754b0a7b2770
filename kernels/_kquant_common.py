"""The Q8_K-style activation encoding ("q8_k" form) every K-quant kernel reads (kquant_x8.py).

As in llama.cpp's K-quant dot products, x is quantized per 256-block to int8 with one float32
scale per block, so every sub-block dot product is an exact integer sum and only the per-block
combination is in floating point: a row's result does not depend on which call or thread
computed it. The int16 code sums per 16 (`xb`) serve the mins and offsets of the types that have
them. The error this adds is bounded in tests/test_kernels_kquants.py.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from .base import XForm

QK_K = 256


@njit(nogil=True, cache=True)
def quantize_x_q8k(x, xq, xd, xb, bits):
    """x float32 (K,) -> xq int8 (K,), xd float32 (K/256,) scales, xb int16 (K/16,) sums of xq
    (|sum| <= 16 * 127); bits: int32 (1,) scratch.

    Symmetric round-to-nearest per 256-block: x ~= xd[b] * xq. A block holding a NaN or inf gets
    xd = NaN so the non-finite input shows in the output instead of vanishing. The block's
    largest |x| is found on the float bits as integers (the sign bit cleared: non-negative
    floats order as their bits do, and an inf or NaN has all exponent bits set), a max
    reduction that vectorizes where a float compare with a finiteness test per value did not.
    """
    nb = x.shape[0] // 256
    xi = x.view(np.int32)
    for b in range(nb):
        o = b * 256
        m = np.int32(0)
        for i in range(256):
            m = max(m, xi[o + i] & np.int32(0x7FFFFFFF))
        if m >= np.int32(0x7F800000):           # an inf or NaN in the block
            xd[b] = np.nan
            xq[o:o + 256] = 0
        elif m == 0:
            xd[b] = 0.0
            xq[o:o + 256] = 0
        else:
            bits[0] = m
            amax = bits.view(np.float32)[0]
            iscale = np.float32(127.0) / amax
            xd[b] = amax / np.float32(127.0)
            for i in range(256):
                xq[o + i] = np.int8(np.rint(x[o + i] * iscale))
    for j in range(x.shape[0] // 16):
        t = 0
        for i in range(16):
            t += np.int32(xq[j * 16 + i])
        xb[j] = t


@njit(nogil=True, cache=True)
def _quantize_rows_q8k(x, xq, xd, xb):
    bits = np.empty(1, np.int32)
    for t in range(x.shape[0]):
        quantize_x_q8k(x[t], xq[t], xd[t], xb[t], bits)


# The "q8_k" encoding of x float32 (T, K) (see quantize_x_q8k, row by row):
# (xq int8 (T, K), xd float32 (T, K/256), xb int16 (T, K/16)).
q8_k_form = XForm(_quantize_rows_q8k, lambda n_t, k: [((n_t, k), np.int8),
                                                      ((n_t, k // QK_K), np.float32),
                                                      ((n_t, k // 16), np.int16)])
