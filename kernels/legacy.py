"""Units for the 32-element block types Q4_1, Q5_0, Q5_1, IQ4_NL, and the activation encoding
("q8_0" form) they share with Q4_0/Q8_0 (which re-lay their rows out: see interleaved.py).

Block layouts are documented in `_legacy_blocks.py` beside their exact decoders.

Weights stay in the raw GGUF rows (`prepare` returns a read-only view, nothing is copied): the
AVX2 kernels read the f16 scale of each block in place with one vcvtph2ps, so a split float32
scale array would only add memory (+22% for Q4_0) for no measured gain, and keeping the nibbles
packed halves the bytes a decode step streams compared with an int8 re-layout.

Variants (picked per type by `_calibrate`, forced with NUMALLM_KERNEL):
  avx2-q8act  x quantized once per input to int8 blocks of 32 (one float scale each, as llama.cpp's
              Q8_0); 32-element integer block dots with vpmaddubsw, 4 weight rows per pass so
              four independent accumulators hide the FMA latency. Needs AVX2+FMA+F16C.
  numba-f32   portable: one row dequantized to float32, dotted with 32 partial sums.
  blas-tile   dequantize 256-row tiles and let numpy's BLAS multiply (best for long prefills).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType as T
from numba import njit

from . import _legacy_blocks as lb
from . import _simd
from ._simd import hsum, load_f16, vzero
from .base import CalibratedUnit, KernelUnit, register, specialize

BLOCK = 32
Q8ACT_FEATURES = _simd.AVX2_FEATURES


@dataclass(frozen=True)
class BlockFormat:
    qtype: T
    block_bytes: int
    decode: object      # njit (w, o, dst, c): block at w[o:] -> dst[c:c+32]
    dot: object         # _simd block-dot intrinsic
    dot_offset: int     # byte of the block the intrinsic starts reading at (after d [, m])
    min_of: object      # njit (w, o, d) -> m when value = d*q + m with q unsigned, else None
    stored_min: bool    # m is an f16 at byte 2 (Q4_1/Q5_1), not implied by d


@njit(nogil=True, cache=True, inline="always")
def _stored_min(w, o, d):
    return load_f16(w, o + 2)


@njit(nogil=True, cache=True, inline="always")
def _no_min(w, o, d):  # never called: HAS_MIN is False for these types
    return np.float32(0.0)


@njit(nogil=True, cache=True)
def quantize_rows(x, xq, dx, xsum):
    """x float32 (T, K) -> xq int8 (T, K), dx float32 (T, K/32) block scales, xsum int32
    (T, K/32) sums of each block's codes (for the min / offset terms).

    Symmetric round-to-nearest, |xq| <= 127 (the vpsignb trick needs no -128). A block holding
    NaN/inf gets dx = NaN, so a non-finite input shows in the output instead of vanishing."""
    n_t, k = x.shape
    for t in range(n_t):
        for b in range(k // BLOCK):
            o = b * BLOCK
            amax = np.float32(0.0)
            finite = True
            for j in range(BLOCK):
                v = abs(x[t, o + j])
                if not np.isfinite(v):
                    finite = False
                elif v > amax:
                    amax = v
            d = amax / np.float32(127.0)
            inv = np.float32(127.0) / amax if amax > 0 else np.float32(0.0)
            isum = 0
            for j in range(BLOCK):
                q = np.int32(np.rint(x[t, o + j] * inv)) if finite else 0
                xq[t, o + j] = np.int8(q)
                isum += q
            dx[t, b] = d if finite else np.float32(np.nan)
            xsum[t, b] = isum


def q8_0_form(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The "q8_0" encoding of x float32 (T, K) (see quantize_rows): (xq, dx, xsum)."""
    n_t, k = x.shape
    xq = np.empty((n_t, k), np.int8)                 # (T, K)
    dx = np.empty((n_t, k // BLOCK), np.float32)     # (T, K/32)
    xsum = np.empty((n_t, k // BLOCK), np.int32)     # (T, K/32)
    quantize_rows(x, xq, dx, xsum)
    return xq, dx, xsum


# The three kernel templates below are specialized per type by `specialize`: DECODE, DOT,
# BLOCK_BYTES, DOT_OFFSET, HAS_MIN and MIN_OF are compile-time constants of each copy.

def _dequant_t(w, out, r0, r1):
    # w: uint8 (N, row_bytes) raw rows; out: float32 (r1 - r0, K)
    nb = w.shape[1] // BLOCK_BYTES  # noqa: F821 (template constant)
    for r in range(r0, r1):
        row = w[r]
        dst = out[r - r0]
        for b in range(nb):
            DECODE(row, b * BLOCK_BYTES, dst, b * BLOCK)  # noqa: F821


def _matmul_f32_t(w, x, out, r0, r1):
    # x: float32 (T, K); out: float32 (T, N). A float reduction does not vectorize without
    # fast-math, so the dot keeps 32 independent partial sums (an elementwise, vectorizable loop).
    n_t, k = x.shape
    nb = k // BLOCK
    row = np.empty(k, np.float32)        # (K,) one dequantized weight row
    acc = np.empty(BLOCK, np.float32)    # (32,) partial sums
    for r in range(r0, r1):
        wr = w[r]
        for b in range(nb):
            DECODE(wr, b * BLOCK_BYTES, row, b * BLOCK)  # noqa: F821
        for t in range(n_t):
            acc[:] = 0.0
            for b in range(nb):
                o = b * BLOCK
                for j in range(BLOCK):
                    acc[j] += row[o + j] * x[t, o + j]
            s = np.float32(0.0)
            for j in range(BLOCK):
                s += acc[j]
            out[t, r] = s


def _matmul_q8act_t(w, xq, dx, xsum, out, r0, r1):
    # w: uint8 (N, row_bytes) raw rows; xq: int8 (T, K); dx float32, xsum int32 (T, K/32) from
    # quantize_rows; out: float32 (T, N). Rows go 4 at a time (one accumulator each, independent
    # FMA chains); the 4 rows (a few KB) stay in L1 while every token t passes over them.
    n_t = xq.shape[0]
    nb = dx.shape[1]
    rb = w.shape[1]
    wf = w.reshape(-1)
    xf = xq.reshape(-1)
    r = r0
    while r < r1:
        if r + 4 <= r1:
            for t in range(n_t):
                a0 = vzero()
                a1 = vzero()
                a2 = vzero()
                a3 = vzero()
                c0 = c1 = c2 = c3 = np.float32(0.0)
                o = r * rb
                xo = t * nb * BLOCK
                for b in range(nb):
                    s = dx[t, b]
                    d0 = load_f16(wf, o)
                    d1 = load_f16(wf, o + rb)
                    d2 = load_f16(wf, o + 2 * rb)
                    d3 = load_f16(wf, o + 3 * rb)
                    a0 = DOT(a0, wf, o + DOT_OFFSET, xf, xo, d0 * s)  # noqa: F821
                    a1 = DOT(a1, wf, o + rb + DOT_OFFSET, xf, xo, d1 * s)  # noqa: F821
                    a2 = DOT(a2, wf, o + 2 * rb + DOT_OFFSET, xf, xo, d2 * s)  # noqa: F821
                    a3 = DOT(a3, wf, o + 3 * rb + DOT_OFFSET, xf, xo, d3 * s)  # noqa: F821
                    if HAS_MIN:  # noqa: F821
                        m = s * np.float32(xsum[t, b])
                        c0 += MIN_OF(wf, o, d0) * m  # noqa: F821
                        c1 += MIN_OF(wf, o + rb, d1) * m  # noqa: F821
                        c2 += MIN_OF(wf, o + 2 * rb, d2) * m  # noqa: F821
                        c3 += MIN_OF(wf, o + 3 * rb, d3) * m  # noqa: F821
                    o += BLOCK_BYTES  # noqa: F821
                    xo += BLOCK
                out[t, r] = hsum(a0) + c0
                out[t, r + 1] = hsum(a1) + c1
                out[t, r + 2] = hsum(a2) + c2
                out[t, r + 3] = hsum(a3) + c3
            r += 4
        else:
            for t in range(n_t):
                a0 = vzero()
                c0 = np.float32(0.0)
                o = r * rb
                xo = t * nb * BLOCK
                for b in range(nb):
                    d0 = load_f16(wf, o)
                    a0 = DOT(a0, wf, o + DOT_OFFSET, xf, xo, d0 * dx[t, b])  # noqa: F821
                    if HAS_MIN:  # noqa: F821
                        c0 += MIN_OF(wf, o, d0) * (dx[t, b] * np.float32(xsum[t, b]))  # noqa: F821
                    o += BLOCK_BYTES  # noqa: F821
                    xo += BLOCK
                out[t, r] = hsum(a0) + c0
            r += 1


class LegacyUnit(CalibratedUnit):
    """One 32-element block type; `fmt` is set by each subclass."""

    fmt: BlockFormat
    features = {"avx2-q8act": Q8ACT_FEATURES, "numba-f32": (), "blas-tile": ()}

    def __init__(self):
        super().__init__()
        f = self.fmt
        name = f.qtype.name.lower()
        consts = dict(DECODE=f.decode, DOT=f.dot, BLOCK_BYTES=f.block_bytes,
                      DOT_OFFSET=f.dot_offset, HAS_MIN=f.min_of is not None,
                      MIN_OF=f.min_of if f.min_of is not None else _no_min)
        self._dequant = specialize(_dequant_t, f"dequant_{name}", **consts)
        self._mm_f32 = specialize(_matmul_f32_t, f"matmul_f32_{name}", **consts)
        self._mm_q8act = specialize(_matmul_q8act_t, f"matmul_q8act_{name}", **consts)

    def variants(self) -> list[str]:
        """The variants this CPU can run, fastest-expected first."""
        out = ["numba-f32", "blas-tile"]
        return (["avx2-q8act"] + out) if _simd.has_avx2() else out

    def prepare(self, raw: np.ndarray) -> np.ndarray:
        """raw uint8 (N, row_bytes) -> the same bytes as a read-only view (one compiled signature
        whether the caller's array is a read-only mmap or a writable buffer)."""
        w = raw.view()
        w.flags.writeable = False
        return w

    def dequantize(self, w, out, r0, r1):
        self._dequant(w, out, r0, r1)

    def prepare_variant_x(self, variant: str, acts) -> None:
        if variant == "avx2-q8act":
            acts.form("q8_0", q8_0_form)

    def run_x(self, variant: str, w, acts, out, r0, r1) -> None:
        if variant == "avx2-q8act":
            xq, dx, xsum = acts.form("q8_0", q8_0_form)
            self._mm_q8act(w, xq, dx, xsum, out, r0, r1)
        elif variant == "numba-f32":
            self._mm_f32(w, acts.x, out, r0, r1)
        elif variant == "blas-tile":
            KernelUnit.matmul(self, w, acts.x, out, r0, r1)
        else:
            raise ValueError(f"unknown variant {variant!r} for {self.qtype.name}")

    def synthetic(self, n: int, k: int, rng: np.random.Generator) -> np.ndarray:
        """Random raw rows (N, row_bytes) with sane f16 scales, for calibration and benchmarks."""
        nb = k // BLOCK
        raw = rng.integers(0, 256, (n, nb, self.fmt.block_bytes), dtype=np.uint8)
        raw[:, :, 0:2] = rng.uniform(0.001, 0.01, (n, nb, 1)).astype(np.float16).view(np.uint8)
        if self.fmt.stored_min:
            raw[:, :, 2:4] = rng.uniform(-0.1, 0.0, (n, nb, 1)).astype(np.float16).view(np.uint8)
        return raw.reshape(n, nb * self.fmt.block_bytes)

    def hot_kernels(self) -> list:
        """(dispatcher, argument types) of the decode kernel, for machine-code inspection."""
        from numba import typeof

        w = self.prepare(np.zeros((4, self.fmt.block_bytes), np.uint8))
        args = (w, np.zeros((1, BLOCK), np.int8), np.zeros((1, 1), np.float32),
                np.zeros((1, 1), np.int32), np.zeros((1, 4), np.float32), 0, 4)
        return [(self._mm_q8act, tuple(typeof(a) for a in args))] if _simd.has_avx2() else []


def _unit(qtype, block_bytes, decode, dot, dot_offset, min_of=None):
    fmt = BlockFormat(qtype, block_bytes, decode, dot, dot_offset, min_of, min_of is _stored_min)
    return register(type(f"{qtype.name}Unit", (LegacyUnit,), {"qtype": qtype, "fmt": fmt}))


# Q5_0 dots signed q - 16 (vpsignb trick). Treating it as Q5_1 with an implied min m = -16d
# (unsigned q, a scalar min term per block) measured slower for Q4_0 in this one-row-at-a-time
# kernel (A/B in one process: 15.9 vs 18.5 Gweights/s in cache, Zen 3): the scalar term costs
# more than the two vector ops it saves. (The 8-row Q4_0 kernel shares that term over 8 rows.)
Q4_1 = _unit(T.Q4_1, 20, lb.decode_q4_1, _simd.dot_q4_1, 4, _stored_min)
Q5_0 = _unit(T.Q5_0, 22, lb.decode_q5_0, _simd.dot_q5_0, 2)
Q5_1 = _unit(T.Q5_1, 24, lb.decode_q5_1, _simd.dot_q5_1, 4, _stored_min)
IQ4_NL = _unit(T.IQ4_NL, 18, lb.decode_iq4_nl, _simd.dot_iq4_nl, 2)
