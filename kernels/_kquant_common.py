"""Shared pieces of the K-quant units: the Q8_K-style activation encoding ("q8_k" form, also
read by the Q4_K/Q6_K record kernels of kquant_x8.py), and the prepared-weight record and base
class of the raw-layout units (Q2_K, Q3_K, Q5_K, IQ4_XS).

All K-quant types group 256 weights into a super-block with one or two f16 super-scales and 8 or
16 small integer sub-block scales. The raw-layout units' `prepare` keeps the GGUF rows (the quant
bits are read in place, nothing is copied) and unpacks, once at load, the f16 super-scales into
float32 arrays and the bit-packed sub-block scales into one byte each, so the hot loops never
decode f16 or 6-bit fields.

Decode (matvec) follows llama.cpp's K-quant dot products: x is quantized per 256-block to int8
("Q8_K": one float32 scale per block), every sub-block dot product is then an exact integer sum
(LLVM vectorizes integer reductions without fast-math), and only the per-block combination is in
floating point. Integer sums are exact, so a row's result does not depend on which call or thread
computed it. The error this adds is bounded in tests/test_kernels_kquants.py.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit

from .base import KernelUnit

QK_K = 256


@dataclass(frozen=True)
class KQuantWeights:
    """A K-quant weight matrix (N rows of K values) as the kernels read it."""

    raw: np.ndarray   # uint8 (N, K/256 * type_size): the GGUF rows, quant bits read in place
    d: np.ndarray     # float32 (N, K/256): super-block scale
    dmin: np.ndarray  # float32 (N, K/256), or (N, 0) for types without mins
    sc: np.ndarray    # int8/uint8 (N, K/sub): sub-block scales, one per byte
    mn: np.ndarray    # uint8 (N, K/sub): sub-block mins, or (N, 0)

    @property
    def shape(self) -> tuple[int, int]:
        return self.raw.shape[0], self.d.shape[1] * QK_K


def f16_field(blocks: np.ndarray, off: int) -> np.ndarray:
    """blocks: uint8 (N, nb, type_size) -> float32 (N, nb): the f16 at byte `off` of each block."""
    b = np.ascontiguousarray(blocks[:, :, off:off + 2])  # (N, nb, 2)
    return b.view(np.float16)[:, :, 0].astype(np.float32)


def unpack_6bit_scales(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 12-byte scale field of Q4_K/Q5_K: s uint8 (N, nb, 12) -> (scales, mins) uint8 (N, nb*8).

    Sub-blocks 0-3 keep their 6-bit scale/min in the low 6 bits of bytes 0-3 / 4-7. Sub-blocks 4-7
    take their low 4 bits from the nibbles of bytes 8-11 (scale low, min high) and their top 2
    bits from the spare top bits of bytes 0-3 (scale) / 4-7 (min).
    """
    a, b, c = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = np.concatenate([a & 63, (c & 15) | ((a >> 6) << 4)], axis=-1)
    mn = np.concatenate([b & 63, (c >> 4) | ((b >> 6) << 4)], axis=-1)
    n = s.shape[0]
    return np.ascontiguousarray(sc.reshape(n, -1)), np.ascontiguousarray(mn.reshape(n, -1))


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


def q8_k_form(x: np.ndarray):
    """The "q8_k" encoding of x float32 (T, K) (see quantize_x_q8k, row by row):
    (xq int8 (T, K), xd float32 (T, K/256), xs float32 (T, K/16), xb int16 (T, K/16))."""
    n_t, k = x.shape
    xq = np.empty((n_t, k), np.int8)
    xd = np.empty((n_t, k // QK_K), np.float32)
    xs = np.empty((n_t, k // 16), np.float32)
    xb = np.empty((n_t, k // 16), np.int16)
    _quantize_rows_q8k(x, xq, xd, xs, xb)
    return xq, xd, xs, xb


class KQuantUnit(KernelUnit):
    """Base of Q2_K, Q3_K, Q5_K and IQ4_XS (raw GGUF rows). Subclasses set `qtype`, `_unpack` (numpy, at load) and, as
    staticmethods, the Numba kernels `_dequant(raw, d, dmin, sc, mn, out, r0, r1)` and
    `_matvec(raw, d, dmin, sc, mn, xq, xd, xs, xb, out, r0, r1)`; prefill uses the generic
    dequantize-tile + BLAS path of KernelUnit.matmul."""

    variant = "numba-q8k"

    def _unpack(self, blocks: np.ndarray):
        """blocks uint8 (N, nb, type_size) -> (d, dmin, sc, mn) as in KQuantWeights."""
        raise NotImplementedError

    def prepare(self, raw: np.ndarray) -> KQuantWeights:
        raw = np.ascontiguousarray(raw)  # no copy for GGUF views; the AVX2 kernels need it
        n, row_bytes = raw.shape
        nb = row_bytes // self.type_size
        d, dmin, sc, mn = self._unpack(raw.reshape(n, nb, self.type_size))
        return KQuantWeights(raw, d, dmin, sc, mn)

    def n_cols(self, w: KQuantWeights) -> int:
        return w.shape[1]

    def dequantize(self, w: KQuantWeights, out, r0, r1):
        self._dequant(w.raw, w.d, w.dmin, w.sc, w.mn, out, r0, r1)

    def matvec(self, w: KQuantWeights, x, out, r0, r1):
        xq, xd, xs, xb = q8_k_form(x.reshape(1, -1))
        self._matvec(w.raw, w.d, w.dmin, w.sc, w.mn, xq[0], xd[0], xs[0], xb[0], out, r0, r1)

    def prepare_x(self, acts) -> None:
        if acts.x.shape[0] == 1:
            acts.form("q8_k", q8_k_form)

    def matmul_x(self, w: KQuantWeights, acts, out, r0, r1) -> None:
        if acts.x.shape[0] != 1:
            self.matmul(w, acts.x, out, r0, r1)
            return
        xq, xd, xs, xb = acts.form("q8_k", q8_k_form)
        self._matvec(w.raw, w.d, w.dmin, w.sc, w.mn, xq[0], xd[0], xs[0], xb[0], out[0], r0, r1)
