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
def quantize_x_q8k(x, xq, xd, xs, xb):
    """x float32 (K,) -> xq int8 (K,), xd float32 (K/256,) scales, xs float32 (K/16,) sums of x,
    xb int16 (K/16,) sums of xq (|sum| <= 16 * 127).

    Symmetric round-to-nearest per 256-block: x ~= xd[b] * xq. A block holding a NaN or inf gets
    xd = NaN so the non-finite input shows in the output instead of vanishing.
    """
    nb = x.shape[0] // 256
    for b in range(nb):
        o = b * 256
        amax = np.float32(0.0)
        finite = True
        for i in range(256):
            v = abs(x[o + i])
            if not np.isfinite(v):
                finite = False
            elif v > amax:
                amax = v
        if not finite:
            xd[b] = np.nan
            for i in range(256):
                xq[o + i] = 0
        elif amax == 0.0:
            xd[b] = 0.0
            for i in range(256):
                xq[o + i] = 0
        else:
            iscale = np.float32(127.0) / amax
            xd[b] = amax / np.float32(127.0)
            for i in range(256):
                xq[o + i] = np.int8(np.rint(x[o + i] * iscale))
    for j in range(x.shape[0] // 16):
        s = np.float32(0.0)
        for i in range(16):
            s += x[j * 16 + i]
        xs[j] = s
    for j in range(x.shape[0] // 16):
        t = 0
        for i in range(16):
            t += np.int32(xq[j * 16 + i])
        xb[j] = t


@njit(nogil=True, cache=True)
def _quantize_rows_q8k(x, xq, xd, xs, xb):
    for t in range(x.shape[0]):
        quantize_x_q8k(x[t], xq[t], xd[t], xs[t], xb[t])


# The "q8_k" encoding of x float32 (T, K) (see quantize_x_q8k, row by row):
# (xq int8 (T, K), xd float32 (T, K/256), xs float32 (T, K/16), xb int16 (T, K/16)).
q8_k_form = XForm(_quantize_rows_q8k, lambda n_t, k: [((n_t, k), np.int8), ((n_t, k // QK_K), np.float32),
                                                      ((n_t, k // 16), np.float32),
                                                      ((n_t, k // 16), np.int16)])
