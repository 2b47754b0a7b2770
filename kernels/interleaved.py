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


# The templates below are specialized per type (`base.specialize`): TYPE_SIZE, REC (record bytes
# of a group), BLOCK (weights per block), PACK / UNPACK (one row's block into / out of a record,
# exactly) and STEP (the SIMD record step) are compile-time constants of each copy.

def _repack_t(raw, q):
    # raw: uint8 (N, nb * TYPE_SIZE) GGUF rows -> q: uint8 (G, nb * REC) group records
    nb = raw.shape[1] // TYPE_SIZE  # noqa: F821 (template constant)
    for r in range(raw.shape[0]):
        src = raw[r]
        dst = q[r // GROUP]
        for b in range(nb):
            PACK(src, b * TYPE_SIZE, dst, b * REC, r % GROUP)  # noqa: F821


def _dequant_t(q, out, r0, r1):
    # q: group records; out: float32 (r1 - r0, K)
    nb = q.shape[1] // REC  # noqa: F821
    for r in range(r0, r1):
        qg = q[r // GROUP]
        dst = out[r - r0]
        for b in range(nb):
            UNPACK(qg, b * REC, r % GROUP, dst, b * BLOCK)  # noqa: F821


@njit(nogil=True, cache=True, inline="always")
def _pack_32(src, s, dst, d, i, qbytes):
    # f16 scale -> bytes 2i, 2i + 1; quant byte j -> 16 + 32 * (j // 4) + 4i + j % 4
    dst[d + 2 * i] = src[s]
    dst[d + 2 * i + 1] = src[s + 1]
    for j in range(qbytes):
        dst[d + 16 + 32 * (j // 4) + 4 * i + j % 4] = src[s + 2 + j]


@njit(nogil=True, cache=True, inline="always")
def _pack_q4_0(src, s, dst, d, i):
    _pack_32(src, s, dst, d, i, 16)


@njit(nogil=True, cache=True, inline="always")
def _pack_q8_0(src, s, dst, d, i):
    _pack_32(src, s, dst, d, i, 32)


@njit(nogil=True, cache=True, inline="always")
def _unpack_q4_0(q, o, i, dst, c):
    # row i's quant byte j of the record at q[o:] -> elements j, j + 16
    d = f16_at(q, o + 2 * i)
    for j in range(16):
        v = np.int32(q[o + 16 + 32 * (j // 4) + 4 * i + j % 4])
        dst[c + j] = d * np.float32((v & 15) - 8)
        dst[c + j + 16] = d * np.float32((v >> 4) - 8)


@njit(nogil=True, cache=True, inline="always")
def _unpack_q8_0(q, o, i, dst, c):
    d = f16_at(q, o + 2 * i)
    for j in range(32):
        v = np.int32(q[o + 16 + 32 * (j // 4) + 4 * i + j % 4])
        dst[c + j] = d * np.float32(v - 256 if v > 127 else v)


def _matmul_x8_t(q, xq, dx, xaux, out, r0, r1):
    # q: uint8 (G, nb * REC) records; xq: int8 (T, K) codes; dx float32 (T, nb) block scales;
    # xaux: the code sums STEP reads (q8_0: int32 (T, nb); q8_k: int16 (T, K/16)); out: float32
    # (T, N) C-contiguous. One group at a time: its records (a few KB per 8 rows) stay in L1
    # while every token passes over them.
    n_t, nb = dx.shape
    k = nb * BLOCK
    n = out.shape[1]
    qf = q.reshape(-1)
    xf = xq.reshape(-1)
    of = out.reshape(-1)
    dxf = dx.reshape(-1)
    xaf = xaux.reshape(-1)
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
                acc = STEP(acc, qf, o, xf, xo, dxf, xaf, b)  # noqa: F821
                o += REC  # noqa: F821
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
    acc = np.empty(32, np.float32)       # (32,) partial sums
    for r in range(r0, r1):
        DEQUANT(q, row, r, r + 1)  # noqa: F821
        for t in range(n_t):
            acc[:] = 0.0
            for o in range(0, k, 32):
                for j in range(32):
                    acc[j] += row[0, o + j] * x[t, o + j]
            s = np.float32(0.0)
            for j in range(32):
                s += acc[j]
            out[t, r] = s


class RecordUnit(CalibratedUnit):
    """A type stored as 8-row group records. Subclasses set `record_bytes`, `pack` / `unpack`
    (njit, one row's block into / out of a record), `step` (the SIMD record step), `x_form`
    (name and maker of the activation encoding the step reads) and `kernel_x(form)` (the
    (codes, block scales, sums) arrays the kernel takes from it)."""

    record_bytes: int
    pack: object
    unpack: object
    step: object
    x_form: tuple[str, object]
    repacks = True
    row_multiple = GROUP
    features = {"avx2-x8": _simd.AVX2_FEATURES, "numba-f32": (), "blas-tile": ()}

    def __init__(self):
        super().__init__()
        name = self.qtype.name.lower()
        consts = dict(TYPE_SIZE=self.type_size, REC=self.record_bytes, BLOCK=self.block_size,
                      PACK=self.pack, UNPACK=self.unpack, STEP=self.step, GROUP=GROUP)
        self._repack = specialize(_repack_t, f"x8_repack_{name}", **consts)
        self._dequant = specialize(_dequant_t, f"x8_dequant_{name}", **consts)
        self._mm_x8 = specialize(_matmul_x8_t, f"x8_matmul_{name}", **consts)
        self._mm_f32 = specialize(_matmul_f32_t, f"x8_matmul_f32_{name}", DEQUANT=self._dequant)

    def kernel_x(self, form) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        raise NotImplementedError

    def variants(self) -> list[str]:
        """The variants this CPU can run, fastest-expected first."""
        out = ["numba-f32", "blas-tile"]
        return (["avx2-x8"] + out) if _simd.has_avx2() else out

    def prepare(self, raw: np.ndarray) -> X8Weights:
        """raw uint8 (N, row_bytes) GGUF rows -> group records (a new array; raw is not kept)."""
        n, rb = raw.shape
        nb = rb // self.type_size
        q = np.zeros((-(-n // GROUP), nb * self.record_bytes), np.uint8)   # (G, nb * REC)
        self._repack(raw, q)
        return X8Weights(q, n, nb * self.block_size)

    def n_cols(self, w: X8Weights) -> int:
        return w.n_cols

    def dequantize(self, w: X8Weights, out, r0, r1):
        self._dequant(w.q, out, r0, r1)

    def prepare_variant_x(self, variant: str, acts) -> None:
        if variant == "avx2-x8":
            acts.form(*self.x_form)

    def run_x(self, variant: str, w: X8Weights, acts, out, r0, r1) -> None:
        if variant == "avx2-x8":
            xq, dx, xaux = self.kernel_x(acts.form(*self.x_form))
            if out.flags.c_contiguous:
                self._mm_x8(w.q, xq, dx, xaux, out, r0, r1)
            else:   # the kernel stores 8 lanes at a time into a flat view
                tmp = np.empty(out.shape, np.float32)          # (T, N)
                self._mm_x8(w.q, xq, dx, xaux, tmp, r0, r1)
                out[:, r0:r1] = tmp[:, r0:r1]
        elif variant == "numba-f32":
            self._mm_f32(w.q, acts.x, out, r0, r1)
        elif variant == "blas-tile":
            KernelUnit.matmul(self, w, acts.x, out, r0, r1)
        else:
            raise ValueError(f"unknown variant {variant!r} for {self.qtype.name}")

    def hot_kernels(self) -> list:
        """(dispatcher, argument types) of the decode kernel, for machine-code inspection."""
        from numba import typeof

        w = self.prepare(np.zeros((GROUP, self.type_size), np.uint8))
        x = self.kernel_x(self.x_form[1](np.zeros((1, self.block_size), np.float32)))
        args = (w.q, *x, np.zeros((1, GROUP), np.float32), 0, GROUP)
        return [(self._mm_x8, tuple(typeof(a) for a in args))] if _simd.has_avx2() else []


class _Block32Unit(RecordUnit):
    """Q4_0 / Q8_0: records of 8 blocks of 32, activations in the "q8_0" form."""

    x_form = ("q8_0", q8_0_form)

    @property
    def record_bytes(self) -> int:
        return GROUP * self.type_size

    def kernel_x(self, form):
        return form   # (xq, dx, xsum)

    def synthetic(self, n: int, k: int, rng: np.random.Generator) -> np.ndarray:
        """Random raw rows (N, row_bytes) with sane f16 scales, for calibration and benchmarks."""
        nb = k // BLOCK
        raw = rng.integers(0, 256, (n, nb, self.type_size), dtype=np.uint8)
        raw[:, :, 0:2] = rng.uniform(0.001, 0.01, (n, nb, 1)).astype(np.float16).view(np.uint8)
        return raw.reshape(n, nb * self.type_size)


@register
class Q4_0(_Block32Unit):
    qtype = T.Q4_0
    pack = _pack_q4_0
    unpack = _unpack_q4_0
    step = x8_q4_0


@register
class Q8_0(_Block32Unit):
    qtype = T.Q8_0
    pack = _pack_q8_0
    unpack = _unpack_q8_0
    step = x8_q8_0
