"""The 32-element block types (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL) with the weights re-laid out
at load into groups of 8 interleaved rows, and the base class of every such "record" unit.

Decode streams every weight byte once per token, so it runs at memory speed only if the inner
loop does little per byte. Reading GGUF rows one at a time costs a scalar f16 conversion and a
horizontal sum per row and block (the one-row kernel this replaced ran Q4_0 at ~7 GB/s); here 8
rows share those, the activation load and the offset correction (see `_x8_simd`), and the whole
group is one sequential stream for the prefetcher.

GGUF blocks (32 weights; d, m: f16; element j of the block):
  Q4_0 (18): d | qs[16]: byte j holds elements j (low nibble) and j + 16 (high).  w = d (q - 8)
  Q4_1 (20): d | m | qs[16] as Q4_0.                                             w = d q + m
  Q5_0 (22): d | qh u32: bit j is bit 4 of element j | qs[16] as Q4_0.          w = d (q - 16)
  Q5_1 (24): d | m | qh | qs[16].                                                w = d q + m
  Q8_0 (34): d | qs[32] int8.                                                    w = d q
  IQ4_NL (18): as Q4_0, the nibble indexes a fixed table.                        w = d T[q]

Layout: rows 8g..8g+7 form group g (the last group is padded with zero rows); block column b of
the group is one record of 8 * type_size bytes, the same bytes as the 8 GGUF blocks, reordered:

    record = | d of rows 0..7 (8 x f16) | [m, 8 x f16] | [qh, 8 x 4 bytes] | chunk 0 | chunk 1 |..
    chunk c = 4 quant bytes 4c..4c+3 of row 0, then of row 1, ..., row 7 (32 bytes)

so quant byte j of row i sits at base + 32 * (j // 4) + 4 * i + j % 4 (4 chunks, Q8_0 8). The
bytes themselves are the GGUF ones, so dequantization is exact. The copy is the size of the GGUF
tensor (plus < 8 padding rows) and the unit sets `repacks`, so the engine drops the file pages
after preparing: memory stays ~1x the weights.

Variants (picked by `_calibrate`, forced with NUMALLM_KERNEL):
  avx2-x8     x quantized once per input to int8 blocks of 32 (shared "q8_0" form); one record
              per step for 8 rows. Needs AVX2+FMA+F16C. Used for prefill too (each group's
              records stay in L1 while every token passes over them).
  avx512vnni-x8  the same records, activations and loop with vpdpbusd steps (`_x8_simd`,
              x8v_*): about half the instructions per record. Needs AVX512-VNNI + AVX512VL.
  numba-f32   portable: one row dequantized to float32, dotted with 32 partial sums.
  blas-tile   dequantize 256-row tiles and let numpy's BLAS multiply.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType as T
from numba import njit

from . import _native, _simd
from ._kx16_simd import kx16_q4_0, kx16_q8_0
from ._kx32_simd import kx32_q4_0, kx32_q8_0
from ._tiles import _groups_t, _groups_wide32_t, _groups_wide_t
from ._x8_loops import _matmul_x8_pair_t, _matmul_x8_t
from ._x8_simd import (PAIRS, many, x8_iq4_nl, x8_q4_0, x8_q4_1, x8_q5_0, x8_q5_1, x8_q8_0,
                       x8v_iq4_nl, x8v_q4_0, x8v_q4_1, x8v_q5_0, x8v_q5_1, x8v_q8_0)
from .base import CalibratedUnit, KernelUnit, XForm, register, specialize

BLOCK = 32
GROUP = 8
AVX2, VNNI = "avx2-x8", "avx512vnni-x8"   # the record variants
WIDE = "avx512vnni-x16"   # two groups of rows per zmm register (`_kx16_simd`)
TILE16 = "avx512vnni-t16"  # 16 tokens per zmm register, prefill only (`_q6_tile`)
# IQ4_NL / IQ4_XS code -> value
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


@njit(nogil=True, cache=True)
def quantize_rows(x, xq, dx, xsum):
    """x float32 (T, K) -> xq int8 (T, K), dx float32 (T, K/32) block scales, xsum int32
    (T, K/32) sums of each block's codes (for the min / offset terms).

    Symmetric round-to-nearest, |xq| <= 127 (the vpsignb trick needs no -128). A block holding
    NaN/inf gets dx = NaN, so a non-finite input shows in the output instead of vanishing. The
    block's largest |x| is found on the float bits as integers, as in
    `_kquant_common.quantize_x_q8k` (a vectorized max; an inf or NaN has all exponent bits set)."""
    n_t, k = x.shape
    bits = np.empty(1, np.int32)
    for t in range(n_t):
        xi = x[t].view(np.int32)
        for b in range(k // BLOCK):
            o = b * BLOCK
            m = np.int32(0)
            for j in range(BLOCK):
                m = max(m, xi[o + j] & np.int32(0x7FFFFFFF))
            if m >= np.int32(0x7F800000):       # an inf or NaN in the block
                xq[t, o:o + BLOCK] = 0
                dx[t, b] = np.nan
                xsum[t, b] = 0
                continue
            bits[0] = m
            amax = bits.view(np.float32)[0]
            d = amax / np.float32(127.0)
            inv = np.float32(127.0) / amax if amax > 0 else np.float32(0.0)
            isum = 0
            for j in range(BLOCK):
                q = np.int32(np.rint(x[t, o + j] * inv))
                xq[t, o + j] = np.int8(q)
                isum += q
            dx[t, b] = d
            xsum[t, b] = isum


# The "q8_0" encoding of x float32 (T, K) (see quantize_rows): (xq, dx, xsum).
q8_0_form = XForm(quantize_rows, lambda n_t, k: [((n_t, k), np.int8),             # (T, K)
                                                 ((n_t, k // BLOCK), np.float32),  # (T, K/32)
                                                 ((n_t, k // BLOCK), np.int32)])   # (T, K/32)


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
def _pack_32(src, s, dst, d, i, n_f16, has_qh, qbytes):
    # GGUF block at src[s:] (n_f16 halves, [4 bytes qh], qbytes quants) -> row i of the record at
    # dst[d:]: half f at 16f + 2i, qh at 16 * n_f16 + 4i, quant byte j in chunk j // 4 at 4i
    for f in range(n_f16):
        dst[d + 16 * f + 2 * i] = src[s + 2 * f]
        dst[d + 16 * f + 2 * i + 1] = src[s + 2 * f + 1]
    o = s + 2 * n_f16
    base = 16 * n_f16
    if has_qh:
        for j in range(4):
            dst[d + base + 4 * i + j] = src[o + j]
        o += 4
        base += 32
    for j in range(qbytes):
        dst[d + base + 32 * (j // 4) + 4 * i + j % 4] = src[o + j]


@njit(nogil=True, cache=True, inline="always")
def _pack_q4_0(src, s, dst, d, i):
    _pack_32(src, s, dst, d, i, 1, False, 16)


@njit(nogil=True, cache=True, inline="always")
def _pack_q4_1(src, s, dst, d, i):
    _pack_32(src, s, dst, d, i, 2, False, 16)


@njit(nogil=True, cache=True, inline="always")
def _pack_q5_0(src, s, dst, d, i):
    _pack_32(src, s, dst, d, i, 1, True, 16)


@njit(nogil=True, cache=True, inline="always")
def _pack_q5_1(src, s, dst, d, i):
    _pack_32(src, s, dst, d, i, 2, True, 16)


@njit(nogil=True, cache=True, inline="always")
def _pack_q8_0(src, s, dst, d, i):
    _pack_32(src, s, dst, d, i, 1, False, 32)


@njit(nogil=True, cache=True, inline="always")
def _nibbles(q, at, i, j):
    """Row i's quant byte j (its elements j and j + 16) of the chunks starting at q[at:]."""
    return np.int32(q[at + 32 * (j // 4) + 4 * i + j % 4])


@njit(nogil=True, cache=True, inline="always")
def _qh(q, at, i):
    """Row i's 32-bit high-bit word (bit e is bit 4 of element e) at q[at + 4i:]."""
    return (np.int64(q[at + 4 * i]) | (np.int64(q[at + 4 * i + 1]) << 8)
            | (np.int64(q[at + 4 * i + 2]) << 16) | (np.int64(q[at + 4 * i + 3]) << 24))


# Decoders: the float32 operations of gguf-py's reference, in its order (bit-exact).

@njit(nogil=True, cache=True, inline="always")
def _unpack_q4_0(q, o, i, dst, c):
    d = f16_at(q, o + 2 * i)
    for j in range(16):
        v = _nibbles(q, o + 16, i, j)
        dst[c + j] = d * np.float32((v & 15) - 8)
        dst[c + j + 16] = d * np.float32((v >> 4) - 8)


@njit(nogil=True, cache=True, inline="always")
def _unpack_q4_1(q, o, i, dst, c):
    d = f16_at(q, o + 2 * i)
    m = f16_at(q, o + 16 + 2 * i)
    for j in range(16):
        v = _nibbles(q, o + 32, i, j)
        dst[c + j] = d * np.float32(v & 15) + m
        dst[c + j + 16] = d * np.float32(v >> 4) + m


@njit(nogil=True, cache=True, inline="always")
def _unpack_q5_0(q, o, i, dst, c):
    d = f16_at(q, o + 2 * i)
    qh = _qh(q, o + 16, i)
    for j in range(16):
        v = _nibbles(q, o + 48, i, j)
        lo = (v & 15) | np.int32(((qh >> j) & 1) << 4)
        hi = (v >> 4) | np.int32(((qh >> (j + 16)) & 1) << 4)
        dst[c + j] = d * np.float32(lo - 16)
        dst[c + j + 16] = d * np.float32(hi - 16)


@njit(nogil=True, cache=True, inline="always")
def _unpack_q5_1(q, o, i, dst, c):
    d = f16_at(q, o + 2 * i)
    m = f16_at(q, o + 16 + 2 * i)
    qh = _qh(q, o + 32, i)
    for j in range(16):
        v = _nibbles(q, o + 64, i, j)
        lo = (v & 15) | np.int32(((qh >> j) & 1) << 4)
        hi = (v >> 4) | np.int32(((qh >> (j + 16)) & 1) << 4)
        dst[c + j] = d * np.float32(lo) + m
        dst[c + j + 16] = d * np.float32(hi) + m


@njit(nogil=True, cache=True, inline="always")
def _unpack_q8_0(q, o, i, dst, c):
    d = f16_at(q, o + 2 * i)
    for j in range(32):
        v = _nibbles(q, o + 16, i, j)
        dst[c + j] = d * np.float32(v - 256 if v > 127 else v)


@njit(nogil=True, cache=True, inline="always")
def _unpack_iq4_nl(q, o, i, dst, c):
    d = f16_at(q, o + 2 * i)
    for j in range(16):
        v = _nibbles(q, o + 16, i, j)
        dst[c + j] = d * IQ4NL_VALUES[v & 15]
        dst[c + j + 16] = d * IQ4NL_VALUES[v >> 4]


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
    (njit, one row's block into / out of a record), `step` (the SIMD record step), `step_vnni`
    (the same with vpdpbusd, or None where the type has none), `x_form`
    (name and maker of the activation encoding the step reads) and `kernel_x(form)` (the
    (codes, block scales, sums) arrays the kernel takes from it)."""

    record_bytes: int
    pack: object
    unpack: object
    step: object
    step_vnni: object = None
    step_wide: dict | None = None
    tile16: object = None      # the tokens-in-lanes kernel (`_q6_tile`), or None
    x_form: tuple[str, object]
    repacks = True
    prefetches = True
    row_multiple = GROUP
    features = {WIDE: _simd.VNNI_FEATURES + ("avx512bw",), VNNI: _simd.VNNI_FEATURES,
                AVX2: _simd.AVX2_FEATURES, TILE16: _simd.VNNI_FEATURES + ("avx512bw",),
                "numba-f32": (), "blas-tile": ()}

    def __init__(self):
        super().__init__()
        name = self.qtype.name.lower()
        consts = dict(TYPE_SIZE=self.type_size, REC=self.record_bytes, BLOCK=self.block_size,
                      PACK=self.pack, UNPACK=self.unpack, STEP=self.step, GROUP=GROUP,
                      PREFETCH=_simd.record_prefetch(self.record_bytes))
        self._repack = specialize(_repack_t, f"x8_repack_{name}", **consts)
        self._dequant = specialize(_dequant_t, f"x8_dequant_{name}", **consts)
        self._mm_f32 = specialize(_matmul_f32_t, f"x8_matmul_f32_{name}", DEQUANT=self._dequant)
        # the record kernels by variant (one loop, two steps), each with a slot in the native
        # task table (threads hand these calls over without the GIL); only those this CPU runs
        self._mm = {AVX2: self._kernel(f"x8_matmul_{name}", consts)}
        if self.step_vnni is not None:
            self._mm[VNNI] = self._kernel(f"x8v_matmul_{name}", dict(consts, STEP=self.step_vnni))
        if self.step_wide is not None:
            self._mm[WIDE] = self._kernel(f"x16v_matmul_{name}", dict(consts, STEP=self.step_vnni),
                                          self.step_wide)
        self._mm_x8 = self._mm[AVX2]
        self.native_slots = {v: _native.register_kernel(k, self.block_size == 256)
                             for v, k in self._mm.items() if self._runs(v)}
        if self.tile16 is not None:     # prefill only: the pools call run_x (slots are few)
            self._mm[TILE16] = self.tile16

    @staticmethod
    def _kernel(name: str, consts: dict, wide: dict | None = None):
        """The record kernel of one step: decode's two-stream loop, and the token-tile loop
        (`_tiles`) with the step's 2- and 4-token versions, or with `wide`'s 16-row steps."""
        step = consts["STEP"]
        groups = specialize(_groups_t, name.replace("matmul", "groups"), STEP=step,
                            STEP2=many(step, 2), STEP4=many(step, 4), REC=consts["REC"],
                            BLOCK=consts["BLOCK"])
        if wide is not None:
            groups = specialize(_groups_wide_t, name.replace("matmul", "groups16"), WIDE1=wide[1],
                                WIDE2=wide[2], WIDE4=wide[4], WIDE8=wide[8], REC=consts["REC"],
                                BLOCK=consts["BLOCK"], GROUPS8=groups)
            if 32 in wide:     # whole 4-token tiles over four groups (`_kx32_simd`)
                groups = specialize(_groups_wide32_t, name.replace("matmul", "groups32"),
                                    WIDE32=wide[32], REC=consts["REC"], BLOCK=consts["BLOCK"],
                                    GROUPS16=groups)
        if wide is not None:   # decode's two streams through one zmm
            return specialize(_matmul_x8_pair_t, name,
                              **dict(consts, GROUPS=groups, STEP_PAIR=wide["pair"]))
        if step in PAIRS:   # the 32-weight types (a ymm K-quant pair would spill registers)
            return specialize(_matmul_x8_pair_t, name,
                              **dict(consts, GROUPS=groups, STEP_PAIR=PAIRS[step]))
        return specialize(_matmul_x8_t, name, **dict(consts, GROUPS=groups))

    @property
    def native_slot(self):
        """The native slot of the AVX2 record kernel (None where the CPU lacks AVX2)."""
        return self.native_slots.get(AVX2)

    def _runs(self, variant: str) -> bool:
        return variant in self._mm and all(f in _simd.host_features()
                                           for f in self.features[variant])

    def kernel_x(self, form) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        raise NotImplementedError

    def variants(self) -> list[str]:
        """The variants this CPU can run, fastest-expected first."""
        return ([v for v in (VNNI, WIDE, AVX2, TILE16) if self._runs(v)]
                + ["numba-f32", "blas-tile"])

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
        if variant in self._mm:
            acts.form(*self.x_form)

    def run_x(self, variant: str, w: X8Weights, acts, out, r0, r1) -> None:
        if variant in self._mm:
            if not self._runs(variant):
                raise ValueError(f"this CPU cannot run {variant!r}")
            mm = self._mm[variant]
            xq, dx, xaux = self.kernel_x(acts.form(*self.x_form))
            if out.flags.c_contiguous:
                mm(w.q, xq, dx, xaux, out, r0, r1)
            else:   # the kernel stores 8 lanes at a time into a flat view
                tmp = np.empty(out.shape, np.float32)          # (T, N)
                mm(w.q, xq, dx, xaux, tmp, r0, r1)
                out[:, r0:r1] = tmp[:, r0:r1]
        elif variant == "numba-f32":
            self._mm_f32(w.q, acts.x, out, r0, r1)
        elif variant == "blas-tile":
            KernelUnit.matmul(self, w, acts.x, out, r0, r1)
        else:
            raise ValueError(f"unknown variant {variant!r} for {self.qtype.name}")

    def variant_task(self, variant: str, w: X8Weights, acts, out, r0, r1, pf: int = 0):
        """The record variant's native slot and arguments (None for the float variants); pf:
        decode's prefetch distance (bytes, 0: none)."""
        if not out.flags.c_contiguous:
            return None
        slot = self.native_slots.get(variant)
        if slot is None:
            return None
        return (slot, w.q, *self.kernel_x(acts.form(*self.x_form)), out, r0, r1, pf)

    def hot_kernels(self) -> list:
        """(dispatcher, argument types) of each record kernel this CPU runs (VNNI first), for
        machine-code inspection."""
        from numba import typeof

        w = self.prepare(np.zeros((GROUP, self.type_size), np.uint8))
        x = self.kernel_x(self.x_form[1](np.zeros((1, self.block_size), np.float32)))
        out = np.zeros((1, GROUP), np.float32)
        args = tuple(typeof(a) for a in (w.q, *x, out, 0, GROUP, 0))    # ..., r0, r1, pf
        flat = tuple(typeof(a.reshape(-1)) for a in (w.q, *x))
        # the token-tile loop (T > 1) of each: qf, rs, xf, dxf, xaf, n_t, nb, out, of, part, ...
        tiles = (flat[0], typeof(0), *flat[1:], typeof(0), typeof(0), typeof(out),
                 *(typeof(out.reshape(-1)),) * 2, *(typeof(0),) * 4)
        return [(k, a) for v in (VNNI, WIDE, AVX2) if self._runs(v)
                for k, a in ((self._mm[v], args), (self._mm[v].py_func.__globals__["GROUPS"], tiles))]


class _Block32Unit(RecordUnit):
    """The 32-element block types: records of 8 blocks, activations in the "q8_0" form."""

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
        if self.qtype in (T.Q4_1, T.Q5_1):   # the min
            raw[:, :, 2:4] = rng.uniform(-0.1, 0.0, (n, nb, 1)).astype(np.float16).view(np.uint8)
        return raw.reshape(n, nb * self.type_size)


def _unit(qtype, pack, unpack, step, step_vnni, step_wide=None):
    return register(type(qtype.name, (_Block32Unit,),
                         {"qtype": qtype, "pack": pack, "unpack": unpack, "step": step,
                          "step_vnni": step_vnni, "step_wide": step_wide}))


Q4_0 = _unit(T.Q4_0, _pack_q4_0, _unpack_q4_0, x8_q4_0, x8v_q4_0, {**kx16_q4_0, 32: kx32_q4_0})
Q4_1 = _unit(T.Q4_1, _pack_q4_1, _unpack_q4_1, x8_q4_1, x8v_q4_1)
Q5_0 = _unit(T.Q5_0, _pack_q5_0, _unpack_q5_0, x8_q5_0, x8v_q5_0)
Q5_1 = _unit(T.Q5_1, _pack_q5_1, _unpack_q5_1, x8_q5_1, x8v_q5_1)
Q8_0 = _unit(T.Q8_0, _pack_q8_0, _unpack_q8_0, x8_q8_0, x8v_q8_0, {**kx16_q8_0, 32: kx32_q8_0})
IQ4_NL = _unit(T.IQ4_NL, _pack_q4_0, _unpack_iq4_nl, x8_iq4_nl, x8v_iq4_nl)   # Q4_0's layout
