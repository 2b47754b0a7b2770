"""Unquantized types: F32, F16, BF16.

Layout: rows of K little-endian values (4, 2, 2 bytes). BF16 is the top half of an F32.

F32 goes straight to BLAS. F16/BF16 keep their raw rows (`prepare` copies nothing; never inflated
to float32) and, on AVX2, convert 8 weights per step in registers (vcvtph2ps, or a shift for
BF16) into one FMA with x, 4 rows at a time; numpy's half->float cast is ~100x slower, which
made the generic dequantize+BLAS path 0.3 GB/s for F16 decode. Prefill may still prefer
dequantized tiles + BLAS: `_calibrate` decides per token count.
"""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as T

from . import _simd
from ._simd import hsum, vzero
from .base import CalibratedUnit, KernelUnit, register, specialize


# F32 products of up to this many tokens run token by token (see F32.matmul)
ROWWISE_MAX_T = 16


def _f32_rows(w, x, out, r0, r1):
    # w: float32 (N, K); x: float32 (T, K), both C-contiguous; out: float32 (T, N). Each token's
    # dot products on their own (8 FMA lanes, then a pairwise sum), four rows per pass, so a
    # token's result does not depend on the other tokens of the call.
    n_t, k = x.shape
    k8 = k - k % 8
    wf = w.reshape(-1)
    xf = x.reshape(-1)
    r = r0
    while r < r1:
        n = min(4, r1 - r)
        for t in range(n_t):
            xo = t * k
            for j in range(0, n - n % 4, 4):
                o = (r + j) * k
                a0 = vzero()
                a1 = vzero()
                a2 = vzero()
                a3 = vzero()
                for c in range(0, k8, 8):
                    a0 = dot_f32x8(a0, wf, o + c, xf, xo + c)
                    a1 = dot_f32x8(a1, wf, o + k + c, xf, xo + c)
                    a2 = dot_f32x8(a2, wf, o + 2 * k + c, xf, xo + c)
                    a3 = dot_f32x8(a3, wf, o + 3 * k + c, xf, xo + c)
                s0 = hsum(a0)
                s1 = hsum(a1)
                s2 = hsum(a2)
                s3 = hsum(a3)
                for c in range(k8, k):
                    xc = xf[xo + c]
                    s0 += wf[o + c] * xc
                    s1 += wf[o + k + c] * xc
                    s2 += wf[o + 2 * k + c] * xc
                    s3 += wf[o + 3 * k + c] * xc
                out[t, r + j] = s0
                out[t, r + j + 1] = s1
                out[t, r + j + 2] = s2
                out[t, r + j + 3] = s3
            for j in range(n - n % 4, n):
                o = (r + j) * k
                a0 = vzero()
                for c in range(0, k8, 8):
                    a0 = dot_f32x8(a0, wf, o + c, xf, xo + c)
                s0 = hsum(a0)
                for c in range(k8, k):
                    s0 += wf[o + c] * xf[xo + c]
                out[t, r + j] = s0
        r += n


def _f32_task(q, xq, dx, xa, out, r0, r1, pf):
    # the native task form (_native's slot signature): q is the weights' bytes (N, 4K), xq the
    # input's bytes (T, 4K); dx, xa and pf (a prefetch distance) are unused
    ROWS(q.view(np.float32), xq.view(np.float32), out, r0, r1)  # noqa: F821 (template constant)


@register
class F32(KernelUnit):
    """F32: on AVX2, up to ROWWISE_MAX_T tokens run in `_f32_rows` (a native task the pool runs
    without the GIL: a MoE router is an F32 product on every token of every layer); larger
    batches go to BLAS."""

    qtype = T.F32
    variant = "blas"

    def __init__(self):
        self._rows = self.native_slot = None
        if _simd.has_avx2():
            from . import _native

            self._rows = specialize(_f32_rows, "dense_f32_rows", vzero=vzero, hsum=hsum,
                                    dot_f32x8=_simd.dot_f32x8)
            self.native_slot = _native.register_kernel(
                specialize(_f32_task, "dense_f32_task", ROWS=self._rows), False)
            self.variant = "avx2-f32"

    def prepare(self, raw):
        return raw.view(np.float32)  # (N, K)

    def n_cols(self, w) -> int:
        return w.shape[1]

    def dequantize(self, w, out, r0, r1):
        out[...] = w[r0:r1]

    def matmul(self, w, x, out, r0, r1):
        if x.shape[0] <= ROWWISE_MAX_T:
            # a batch of decode tokens: one product per token, as each gets alone (BLAS sums a
            # matrix product in another order than a vector one, and a MoE router's top k can
            # flip on that last bit)
            if self._rows is not None and x.flags.c_contiguous and w.flags.c_contiguous:
                self._rows(w, x, out, r0, r1)
                return
            for t in range(x.shape[0]):
                out[t, r0:r1] = x[t] @ w[r0:r1].T
            return
        out[:, r0:r1] = x @ w[r0:r1].T

    def native_task(self, w, acts, out, r0, r1):
        x = acts.x
        if (self.native_slot is None or x.shape[0] > ROWWISE_MAX_T or not out.flags.c_contiguous
                or not x.flags.c_contiguous or not w.flags.c_contiguous):
            return None
        xb = x.view(np.int8)                 # (T, 4K) the input's bytes
        return (self.native_slot, w.view(np.uint8), xb, x, x.view(np.int32), out, r0, r1)

    def hot_kernels(self) -> list:
        from numba import typeof

        if self._rows is None:
            return []
        args = (np.zeros((4, 16), np.float32), np.zeros((1, 16), np.float32),
                np.zeros((1, 4), np.float32), 0, 4)
        return [(self._rows, tuple(typeof(a) for a in args))]


# Templates specialized per type: CVT8 / DOT8 / LOAD1 are the _simd half-type intrinsics.

def _dequant_t(w, out, r0, r1):
    # w: uint8 (N, 2K) raw rows; out: float32 (r1 - r0, K)
    k = w.shape[1] // 2
    k8 = k - k % 8
    for r in range(r0, r1):
        row = w[r]
        dst = out[r - r0]
        for c in range(0, k8, 8):
            CVT8(row, 2 * c, dst, c)  # noqa: F821 (template constant)
        for c in range(k8, k):
            dst[c] = LOAD1(row, 2 * c)  # noqa: F821


def _matmul_t(w, x, out, r0, r1):
    # w: uint8 (N, 2K); x: float32 (T, K) C-contiguous; out: float32 (T, N). Four rows per pass:
    # four independent FMA chains, and the rows stay in L1 while each token passes over them.
    n_t, k = x.shape
    k8 = k - k % 8
    rb = w.shape[1]
    wf = w.reshape(-1)
    xf = x.reshape(-1)
    r = r0
    while r < r1:
        if r + 4 <= r1:
            for t in range(n_t):
                a0 = vzero()
                a1 = vzero()
                a2 = vzero()
                a3 = vzero()
                o = r * rb
                xo = t * k
                for c in range(0, k8, 8):
                    a0 = DOT8(a0, wf, o + 2 * c, xf, xo + c)  # noqa: F821
                    a1 = DOT8(a1, wf, o + rb + 2 * c, xf, xo + c)  # noqa: F821
                    a2 = DOT8(a2, wf, o + 2 * rb + 2 * c, xf, xo + c)  # noqa: F821
                    a3 = DOT8(a3, wf, o + 3 * rb + 2 * c, xf, xo + c)  # noqa: F821
                s0 = hsum(a0)
                s1 = hsum(a1)
                s2 = hsum(a2)
                s3 = hsum(a3)
                for c in range(k8, k):
                    xc = xf[xo + c]
                    s0 += LOAD1(wf, o + 2 * c) * xc  # noqa: F821
                    s1 += LOAD1(wf, o + rb + 2 * c) * xc  # noqa: F821
                    s2 += LOAD1(wf, o + 2 * rb + 2 * c) * xc  # noqa: F821
                    s3 += LOAD1(wf, o + 3 * rb + 2 * c) * xc  # noqa: F821
                out[t, r] = s0
                out[t, r + 1] = s1
                out[t, r + 2] = s2
                out[t, r + 3] = s3
            r += 4
        else:
            for t in range(n_t):
                a0 = vzero()
                o = r * rb
                xo = t * k
                for c in range(0, k8, 8):
                    a0 = DOT8(a0, wf, o + 2 * c, xf, xo + c)  # noqa: F821
                s0 = hsum(a0)
                for c in range(k8, k):
                    s0 += LOAD1(wf, o + 2 * c) * xf[xo + c]  # noqa: F821
                out[t, r] = s0
            r += 1


class _HalfUnit(CalibratedUnit):
    """F16/BF16: `avx2-f32acc` (above) or `blas-tile` (dequantized tiles + numpy BLAS)."""

    features = {"avx2-f32acc": _simd.AVX2_FEATURES, "blas-tile": ()}
    _bf16: bool

    def __init__(self):
        super().__init__()
        name = self.qtype.name.lower()
        consts = dict(
            CVT8=_simd.cvt_bf16x8 if self._bf16 else _simd.cvt_f16x8,
            DOT8=_simd.dot_bf16x8 if self._bf16 else _simd.dot_f16x8,
            LOAD1=_simd.load_bf16 if self._bf16 else _simd.load_f16)
        self._dequant = specialize(_dequant_t, f"dense_dequant_{name}", **consts)
        self._matmul = specialize(_matmul_t, f"dense_matmul_{name}", **consts)

    def variants(self) -> list[str]:
        return ["avx2-f32acc", "blas-tile"] if _simd.has_avx2() else ["blas-tile"]

    def prepare(self, raw):
        """raw uint8 (N, 2K) -> the same bytes as a read-only view (one compiled signature)."""
        w = raw.view()
        w.flags.writeable = False
        return w

    def n_cols(self, w) -> int:
        return w.shape[1] // 2

    def dequantize(self, w, out, r0, r1):
        if _simd.has_avx2():
            self._dequant(w, out, r0, r1)
        elif self._bf16:
            out.view(np.uint32)[...] = w[r0:r1].view(np.uint16).astype(np.uint32) << 16
        else:
            out[...] = w[r0:r1].view(np.float16)

    def run_x(self, variant, w, acts, out, r0, r1):
        if variant == "avx2-f32acc":
            self._matmul(w, acts.x, out, r0, r1)
        elif variant == "blas-tile":
            KernelUnit.matmul(self, w, acts.x, out, r0, r1)
        else:
            raise ValueError(f"unknown variant {variant!r} for {self.qtype.name}")

    def synthetic(self, n, k, rng):
        vals = rng.standard_normal((n, k)).astype(np.float32)
        if self._bf16:
            return (vals.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
        return vals.astype(np.float16).view(np.uint8)

    def hot_kernels(self) -> list:
        from numba import typeof

        args = (self.prepare(np.zeros((4, 16), np.uint8)), np.zeros((1, 8), np.float32),
                np.zeros((1, 4), np.float32), 0, 4)
        return [(self._matmul, tuple(typeof(a) for a in args))] if _simd.has_avx2() else []


@register
class F16(_HalfUnit):
    qtype = T.F16
    _bf16 = False


@register
class BF16(_HalfUnit):
    qtype = T.BF16
    _bf16 = True
