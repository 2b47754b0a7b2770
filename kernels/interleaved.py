"""Q4_0 and Q8_0 with the weights re-laid out at load into groups of 8 interleaved rows.

Decode streams every weight byte once per token, so it runs at memory speed only if the inner
loop does little per byte. Reading GGUF rows one at a time (the `avx2-q8act` kernel of the other
32-block types) costs a scalar f16 conversion and a horizontal sum per row and block; here 8 rows
share those, the activation load and the offset correction (see `_x8_simd`), and the whole group
is one sequential stream for the prefetcher.

Layout: rows 8g..8g+7 form group g (the last group is padded with zero rows); block column b of
the group is one record of 8 * type_size bytes, the same bytes as the 8 GGUF blocks, reordered:

    record = | d of rows 0..7 (8 x f16) | chunk 0 | chunk 1 | ... |   (4 chunks Q4_0, 8 Q8_0)
    chunk c = 4 quant bytes 4c..4c+3 of row 0, then of row 1, ..., row 7 (32 bytes)

so quant byte j of row i sits at 16 + 32 * (j // 4) + 4 * i + j % 4. The bytes themselves are
the GGUF ones (Q4_0 byte j holds elements j and j + 16 in its low and high nibble; Q8_0 byte j is
element j), so dequantization is exact. The copy is the size of the GGUF tensor (plus < 8 padding
rows) and the unit sets `repacks`, so the engine drops the file pages after preparing: memory
stays ~1x the weights.

Variants (picked by `_calibrate`, forced with NUMALLM_KERNEL):
  avx2-x8     x quantized once per input to int8 blocks of 32 (shared "q8_0" form); one record
              per step for 8 rows. Needs AVX2+FMA+F16C. Used for prefill too (each group's
              records stay in L1 while every token passes over them).
  numba-f32   portable: one row dequantized to float32, dotted with 32 partial sums.
  blas-tile   dequantize 256-row tiles and let numpy's BLAS multiply.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType as T
from numba import njit

from . import _simd
from ._legacy_blocks import f16_at
from ._simd import vzero
from ._x8_simd import store8, x8_q4_0, x8_q8_0
from .base import CalibratedUnit, KernelUnit, register, specialize
from .legacy import q8_0_form

BLOCK = 32
GROUP = 8


@dataclass(frozen=True)
class X8Weights:
    """A matrix of N rows of K weights in 8-row group records (see the module docstring)."""

    q: np.ndarray     # uint8 (ceil(N / 8), K/32 * 8 * type_size)
    n_rows: int
    n_cols: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.n_rows, self.n_cols


# The templates below are specialized per type: QBYTES (quant bytes per row and block: 16 for
# Q4_0, 32 for Q8_0), DECODE (exact decoder of one row's block from a record) and STEP (the
# _x8_simd record step) are compile-time constants.

def _repack_t(raw, q):
    # raw: uint8 (N, nb * (2 + 16C)) GGUF rows -> q: uint8 (G, nb * 8 * (2 + 16C)) group records
    n = raw.shape[0]
    rb = 2 + QBYTES  # noqa: F821 (template constant)
    rec = GROUP * rb
    nb = raw.shape[1] // rb
    for r in range(n):
        g = r // GROUP
        i = r % GROUP
        for b in range(nb):
            s = b * rb
            d = b * rec
            q[g, d + 2 * i] = raw[r, s]
            q[g, d + 2 * i + 1] = raw[r, s + 1]
            for j in range(QBYTES):  # noqa: F821
                q[g, d + 16 + 32 * (j // 4) + 4 * i + j % 4] = raw[r, s + 2 + j]


def _dequant_t(q, out, r0, r1):
    # q: group records; out: float32 (r1 - r0, K)
    rec = GROUP * (2 + QBYTES)  # noqa: F821
    nb = q.shape[1] // rec
    for r in range(r0, r1):
        g = r // GROUP
        i = r % GROUP
        qg = q[g]
        dst = out[r - r0]
        for b in range(nb):
            DECODE(qg, b * rec, i, f16_at(qg, b * rec + 2 * i), dst, b * BLOCK)  # noqa: F821


@njit(nogil=True, cache=True, inline="always")
def _decode_q4_0(q, o, i, d, dst, c):
    # row i's quant byte j of the record at q[o:] -> elements j, j + 16
    for j in range(16):
        v = np.int32(q[o + 16 + 32 * (j // 4) + 4 * i + j % 4])
        dst[c + j] = d * np.float32((v & 15) - 8)
        dst[c + j + 16] = d * np.float32((v >> 4) - 8)


@njit(nogil=True, cache=True, inline="always")
def _decode_q8_0(q, o, i, d, dst, c):
    for j in range(32):
        v = np.int32(q[o + 16 + 32 * (j // 4) + 4 * i + j % 4])
        dst[c + j] = d * np.float32(v - 256 if v > 127 else v)


def _matmul_x8_t(q, xq, dx, xsum, out, r0, r1):
    # q: uint8 (G, nb * rec) records; xq: int8 (T, K); dx float32, xsum int32 (T, K/32) (the
    # "q8_0" form); out: float32 (T, N) C-contiguous. One group at a time: its records (K/32 * rec
    # bytes, a few KB) stay in L1 while every token passes over them.
    rec = GROUP * (2 + QBYTES)  # noqa: F821
    n_t, nb = dx.shape
    k = nb * BLOCK
    n = out.shape[1]
    qf = q.reshape(-1)
    xf = xq.reshape(-1)
    of = out.reshape(-1)
    dxf = dx.reshape(-1)
    xsf = xsum.reshape(-1)
    rs = q.shape[1]
    part = np.empty(GROUP, np.float32)   # (8,) a group whose rows are not all in [r0, r1)
    for g in range(r0 // GROUP, (r1 + GROUP - 1) // GROUP):
        a = max(r0, g * GROUP)
        e = min(r1, g * GROUP + GROUP)
        for t in range(n_t):
            acc = vzero()
            o = g * rs
            xo = t * k
            for b in range(t * nb, t * nb + nb):
                acc = STEP(acc, qf, o, xf, xo, dxf, xsf, b)  # noqa: F821
                o += rec
                xo += BLOCK
            if e - a == GROUP:
                store8(acc, of, t * n + a)
            else:
                store8(acc, part, 0)
                for r in range(a, e):
                    out[t, r] = part[r - g * GROUP]


def _matmul_f32_t(q, x, out, r0, r1):
    # x: float32 (T, K); out: float32 (T, N). A float reduction does not vectorize without
    # fast-math, so the dot keeps 32 independent partial sums (an elementwise, vectorizable loop).
    n_t, k = x.shape
    row = np.empty((1, k), np.float32)   # (1, K) one dequantized weight row
    acc = np.empty(BLOCK, np.float32)    # (32,) partial sums
    for r in range(r0, r1):
        DEQUANT(q, row, r, r + 1)  # noqa: F821
        for t in range(n_t):
            acc[:] = 0.0
            for o in range(0, k, BLOCK):
                for j in range(BLOCK):
                    acc[j] += row[0, o + j] * x[t, o + j]
            s = np.float32(0.0)
            for j in range(BLOCK):
                s += acc[j]
            out[t, r] = s


class X8Unit(CalibratedUnit):
    """Q4_0 / Q8_0 over 8-row group records; `qbytes` and the decoder/step set per subclass."""

    qbytes: int
    decode: object
    step: object
    repacks = True
    row_multiple = GROUP
    features = {"avx2-x8": _simd.AVX2_FEATURES, "numba-f32": (), "blas-tile": ()}

    def __init__(self):
        super().__init__()
        name = self.qtype.name.lower()
        consts = dict(QBYTES=self.qbytes, DECODE=self.decode, STEP=self.step,
                      GROUP=GROUP, BLOCK=BLOCK)
        self._repack = specialize(_repack_t, f"x8_repack_{name}", **consts)
        self._dequant = specialize(_dequant_t, f"x8_dequant_{name}", **consts)
        self._mm_x8 = specialize(_matmul_x8_t, f"x8_matmul_{name}", **consts)
        self._mm_f32 = specialize(_matmul_f32_t, f"x8_matmul_f32_{name}", DEQUANT=self._dequant,
                                  BLOCK=BLOCK)

    def variants(self) -> list[str]:
        """The variants this CPU can run, fastest-expected first."""
        out = ["numba-f32", "blas-tile"]
        return (["avx2-x8"] + out) if _simd.has_avx2() else out

    def prepare(self, raw: np.ndarray) -> X8Weights:
        """raw uint8 (N, row_bytes) GGUF rows -> group records (a new array; raw is not kept)."""
        n, rb = raw.shape
        q = np.zeros((-(-n // GROUP), rb * GROUP), np.uint8)   # (G, K/32 * 8 * type_size)
        self._repack(raw, q)
        return X8Weights(q, n, rb // self.type_size * BLOCK)

    def n_cols(self, w: X8Weights) -> int:
        return w.n_cols

    def dequantize(self, w: X8Weights, out, r0, r1):
        self._dequant(w.q, out, r0, r1)

    def prepare_variant_x(self, variant: str, acts) -> None:
        if variant == "avx2-x8":
            acts.form("q8_0", q8_0_form)

    def run_x(self, variant: str, w: X8Weights, acts, out, r0, r1) -> None:
        if variant == "avx2-x8":
            xq, dx, xsum = acts.form("q8_0", q8_0_form)
            if out.flags.c_contiguous:
                self._mm_x8(w.q, xq, dx, xsum, out, r0, r1)
            else:   # the kernel stores 8 lanes at a time into a flat view
                tmp = np.empty(out.shape, np.float32)          # (T, N)
                self._mm_x8(w.q, xq, dx, xsum, tmp, r0, r1)
                out[:, r0:r1] = tmp[:, r0:r1]
        elif variant == "numba-f32":
            self._mm_f32(w.q, acts.x, out, r0, r1)
        elif variant == "blas-tile":
            KernelUnit.matmul(self, w, acts.x, out, r0, r1)
        else:
            raise ValueError(f"unknown variant {variant!r} for {self.qtype.name}")

    def synthetic(self, n: int, k: int, rng: np.random.Generator) -> np.ndarray:
        """Random raw rows (N, row_bytes) with sane f16 scales, for calibration and benchmarks."""
        nb = k // BLOCK
        raw = rng.integers(0, 256, (n, nb, self.type_size), dtype=np.uint8)
        raw[:, :, 0:2] = rng.uniform(0.001, 0.01, (n, nb, 1)).astype(np.float16).view(np.uint8)
        return raw.reshape(n, nb * self.type_size)

    def hot_kernels(self) -> list:
        """(dispatcher, argument types) of the decode kernel, for machine-code inspection."""
        from numba import typeof

        w = self.prepare(np.zeros((GROUP, self.type_size), np.uint8))
        args = (w.q, np.zeros((1, BLOCK), np.int8), np.zeros((1, 1), np.float32),
                np.zeros((1, 1), np.int32), np.zeros((1, GROUP), np.float32), 0, GROUP)
        return [(self._mm_x8, tuple(typeof(a) for a in args))] if _simd.has_avx2() else []


@register
class Q4_0(X8Unit):
    qtype = T.Q4_0
    qbytes = 16
    decode = _decode_q4_0
    step = x8_q4_0


@register
class Q8_0(X8Unit):
    qtype = T.Q8_0
    qbytes = 32
    decode = _decode_q8_0
    step = x8_q8_0
