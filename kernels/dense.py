"""Unquantized types: F32, F16, BF16.

Layout: rows of K little-endian values (4, 2, 2 bytes). BF16 is the top half of an F32.
"""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as T

from .base import KernelUnit, register


@register
class F32(KernelUnit):
    qtype = T.F32
    variant = "blas"

    def prepare(self, raw):
        return raw.view(np.float32)  # (N, K)

    def n_cols(self, w) -> int:
        return w.shape[1]

    def dequantize(self, w, out, r0, r1):
        out[...] = w[r0:r1]

    def matmul(self, w, x, out, r0, r1):
        out[:, r0:r1] = x @ w[r0:r1].T


@register
class F16(KernelUnit):
    qtype = T.F16

    def prepare(self, raw):
        return raw.view(np.float16)  # (N, K)

    def n_cols(self, w) -> int:
        return w.shape[1]

    def dequantize(self, w, out, r0, r1):
        out[...] = w[r0:r1]


@register
class BF16(KernelUnit):
    qtype = T.BF16

    def prepare(self, raw):
        return raw.view(np.uint16)  # (N, K)

    def n_cols(self, w) -> int:
        return w.shape[1]

    def dequantize(self, w, out, r0, r1):
        out.view(np.uint32)[...] = w[r0:r1].astype(np.uint32) << 16
