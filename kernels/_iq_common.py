"""The kernel unit shared by the IQ types (iq1.py, iq2.py, iq3.py): GGUF rows kept as they are,
read block by block by every kernel (no re-layout, nothing inflated at load).

Each type module gives, per 256-weight block (TS bytes at byte o of a row):
  DEQ(q, o, dst, c)     dst[c:c + 256] = the block's weights as float32, in gguf-py's operation
                        order (bit-exact against `gguf.quants.dequantize`);
  SCALE(q, o)           the block's float factor f (e.g. d / 8), and
  PREP(q, o, ib)        once per block, before its SUBs: the block's grid indices into the int32
                        scratch ib (vector arithmetic, `_iq_simd._indices`), or nothing;
  SUB(q, o, j, ib)      sub-block j (weights 32j..32j + 31) as (w i8x32, s_lo, s_hi): integers
                        with weight = f * s * w, s_lo for weights 0..15 and s_hi for 16..31.

Variants (picked per CPU by `_calibrate`, forced with NUMALLM_KERNEL):
  avx2-iq    x encoded once per input to int8 per 256 with one float scale (the shared "q8_k"
             form), each sub-block decoded in registers (`_iq_simd`) and dotted in int32; the
             block's sum times f * dx added to an <8 x float> accumulator per row. Decode (T = 1)
             decodes and dots at once; prefill decodes each block of a row once into 256 bytes
             of L1 scratch and dots it with every token. Needs AVX2+FMA+F16C.
  avx512-iq  the same activations and loops, 64 weights (two sub-blocks) per zmm step: once per
             block BLOCK(q, o) (register state, e.g. all 32 grid codes looked up at once) and
             PREP (prep64, else prep), then per step SUB64(q, o, p, ib, st) gives weights
             64p..64p + 63 as (w64, scales): magnitudes, a 64-bit sign mask, the scale of each
             16 weights (int64 sc4 or i16x32 words). `_iq512_simd` has the steps,
             `_iq512_lut` the in-register grids (IQ2_XXS, IQ3_XXS), `_iq512_iq1` IQ1_S/IQ1_M.
             Its int32 sums fold to avx2-iq's per block, so the results are bit-identical to
             avx2-iq's. Needs AVX-512 F/BW/VL/VBMI.
  avx512vnni-t16  prefill and batched decode (`_iq_tile`): 16 tokens in a zmm's lanes, each
             row's blocks decoded once per call (SUB) to int8, every 4 weights one broadcast
             operand of a vpdpbusd; its float order is its own (one exact sum per block), so it
             is chosen only where calibration times it fastest (from 16 or 32 tokens on AMD
             Zen 5). Needs AVX-512 F/BW/VL/VNNI.
  blas-tile  dequantize 256-row tiles (DEQ) and let numpy's BLAS multiply (any CPU; also
             what calibration picks for prefill where it measures faster).
Every path gives a token the same bits whatever the number of tokens (same operations in the same
order), so decode equals prefill row by row.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit

from . import _native, _simd
from . import _iq_tile
from ._iq512_simd import FEATURES as _F512
from ._iq512_simd import (dot64, fold_fma, izero16, load_sc, load_w64, no_block, store_sc,
                          store_w64)
from ._iq_simd import dot32, fma_sum, izero, load8, load_w, no_indices, store_w
from ._kquant_common import q8_k_form
from ._simd import hsum, vzero
from ._x8_simd import store8
from .base import CalibratedUnit, KernelUnit, specialize

QK = 256
AVX2 = "avx2-iq"
AVX512 = "avx512-iq"
TILE16 = "avx512vnni-t16"


@njit(nogil=True, cache=True, inline="always")
def u16_at(q, o):
    return np.int64(q[o]) | (np.int64(q[o + 1]) << 8)


@njit(nogil=True, cache=True, inline="always")
def u32_at(q, o):
    return (np.int64(q[o]) | (np.int64(q[o + 1]) << 8) | (np.int64(q[o + 2]) << 16)
            | (np.int64(q[o + 3]) << 24))


@njit(nogil=True, cache=True, inline="always")
def half_to_f32(h):
    """IEEE half bits h (0..65535) -> float32, exactly (any CPU)."""
    e = (h >> 10) & 0x1F
    m = h & 0x3FF
    if e == 0:
        v = math.ldexp(float(m), -24)
    elif e == 31:
        v = math.inf if m == 0 else math.nan
    else:
        v = math.ldexp(float(m | 0x400), e - 25)
    return np.float32(-v if h & 0x8000 else v)


# Templates, specialized per type (`base.specialize`): TS (block bytes), DEQ, SCALE, SUB.

def _dequant_t(q, out, r0, r1):
    # q: uint8 (N, nb * TS) GGUF rows; out: float32 (r1 - r0, nb * 256)
    nb = q.shape[1] // TS  # noqa: F821 (template constant)
    for r in range(r0, r1):
        for b in range(nb):
            DEQ(q[r], b * TS, out[r - r0], b * QK)  # noqa: F821


def _matmul_t(q, xq, dx, xb, out, r0, r1, pf=0):
    # q: uint8 (N, nb * TS) GGUF rows; xq: int8 (T, K) codes; dx: float32 (T, nb) their scales;
    # xb: int16 (T, K/16) code sums (the "q8_k" form's; unused here); out: float32 (T, N)
    n_t, nb = dx.shape
    k = nb * QK
    qf = q.reshape(-1)
    xf = xq.reshape(-1)
    rb = q.shape[1]
    ib = np.empty(64, np.int32)                # (64,) one block's grid indices (PREP)
    if n_t == 1:
        for r in range(r0, r1):
            acc = vzero()
            for b in range(nb):
                o = r * rb + b * TS  # noqa: F821
                isum = izero()
                PREP(qf, o, ib)  # noqa: F821
                for j in range(8):
                    w, s0, s1 = SUB(qf, o, j, ib)  # noqa: F821
                    isum = dot32(isum, w, xf, b * QK + 32 * j, s0, s1)
                acc = fma_sum(acc, isum, SCALE(qf, o) * dx[0, b])  # noqa: F821
            out[0, r] = hsum(acc)
        return
    wbuf = np.empty(QK, np.int8)               # (256,) one block of a row, decoded
    sbuf = np.empty(16, np.int32)              # (16,) its scales per 16 weights
    accs = np.empty(8 * n_t, np.float32)       # (T * 8,) each token's <8 x float> accumulator
    for r in range(r0, r1):
        accs[:] = 0.0
        for b in range(nb):
            o = r * rb + b * TS  # noqa: F821
            PREP(qf, o, ib)  # noqa: F821
            for j in range(8):
                w, s0, s1 = SUB(qf, o, j, ib)  # noqa: F821
                store_w(w, wbuf, 32 * j)
                sbuf[2 * j] = s0
                sbuf[2 * j + 1] = s1
            f = SCALE(qf, o)  # noqa: F821
            for t in range(n_t):
                isum = izero()
                for j in range(8):
                    isum = dot32(isum, load_w(wbuf, 32 * j), xf, t * k + b * QK + 32 * j,
                                 sbuf[2 * j], sbuf[2 * j + 1])
                store8(fma_sum(load8(accs, 8 * t), isum, f * dx[t, b]), accs, 8 * t)
        for t in range(n_t):
            out[t, r] = hsum(load8(accs, 8 * t))


def _matmul512_t(q, xq, dx, xb, out, r0, r1, pf=0):
    # as _matmul_t, 64 weights per step (SUB64); arrays as there
    n_t, nb = dx.shape
    k = nb * QK
    qf = q.reshape(-1)
    xf = xq.reshape(-1)
    rb = q.shape[1]
    ib = np.empty(64, np.int32)                # (64,) one block's grid indices (PREP)
    if n_t == 1:
        for r in range(r0, r1):
            acc = vzero()
            for b in range(nb):
                o = r * rb + b * TS  # noqa: F821
                isum = izero16()
                PREP(qf, o, ib)  # noqa: F821
                st = BLOCK(qf, o)  # noqa: F821
                for p in range(4):
                    w, sc = SUB64(qf, o, p, ib, st)  # noqa: F821
                    isum = dot64(isum, w, xf, b * QK + 64 * p, sc)
                acc = fold_fma(acc, isum, SCALE(qf, o) * dx[0, b])  # noqa: F821
            out[0, r] = hsum(acc)
        return
    wbuf = np.empty(QK, np.uint8)              # (256,) one block of a row: |w|
    nbuf = np.empty(4, np.int64)               # (4,) its sign masks per 64 weights
    sbuf = np.empty(4 * 32, np.int16)          # (4 * 32,) its scale words per 64 weights
    accs = np.empty(8 * n_t, np.float32)       # (T * 8,) each token's <8 x float> accumulator
    for r in range(r0, r1):
        accs[:] = 0.0
        for b in range(nb):
            o = r * rb + b * TS  # noqa: F821
            PREP(qf, o, ib)  # noqa: F821
            st = BLOCK(qf, o)  # noqa: F821
            for p in range(4):
                w, sc = SUB64(qf, o, p, ib, st)  # noqa: F821
                store_w64(w, wbuf, 64 * p, nbuf, p)
                store_sc(sc, sbuf, p)
            f = SCALE(qf, o)  # noqa: F821
            for t in range(n_t):
                isum = izero16()
                for p in range(4):
                    isum = dot64(isum, load_w64(wbuf, 64 * p, nbuf, p), xf,
                                 t * k + b * QK + 64 * p, load_sc(sbuf, p))
                store8(fold_fma(load8(accs, 8 * t), isum, f * dx[t, b]), accs, 8 * t)
        for t in range(n_t):
            out[t, r] = hsum(load8(accs, 8 * t))


class IQUnit(CalibratedUnit):
    """An IQ type: subclasses set `qtype`, `deq`, `scale`, `sub`, optionally `prep` and `sub64`
    (njit, see the module docstring; without sub64 no avx512-iq) and `f16_fields` (byte offsets
    of the f16 scale, for `synthetic`)."""

    deq: object
    scale: object
    sub: object
    prep: object = no_indices
    sub64: object = None
    block64: object = no_block
    prep64: object = None                   # PREP of the avx512-iq kernel (None: prep)
    f16_fields: tuple[int, ...] = (0,)
    features = {AVX512: _simd.AVX2_FEATURES + _F512, AVX2: _simd.AVX2_FEATURES,
                TILE16: _simd.AVX2_FEATURES + _iq_tile.FEATURES, "blas-tile": ()}

    def __init__(self):
        super().__init__()
        name = self.qtype.name.lower()
        consts = dict(TS=self.type_size, QK=QK, DEQ=self.deq, SCALE=self.scale, SUB=self.sub,
                      PREP=self.prep)
        self._dequant = specialize(_dequant_t, f"iq_dequant_{name}", **consts)
        self._kernels = {}                     # native variant -> its njit kernel
        self._slots = {}                       # native variant -> its native slot
        if self._has(AVX512) and self.sub64 is not None:
            self._kernels[AVX512] = specialize(_matmul512_t, f"iq512_matmul_{name}",
                                               SUB64=self.sub64, BLOCK=self.block64,
                                               **dict(consts, PREP=self.prep64 or self.prep))
        if self._has(AVX2):
            self._kernels[AVX2] = specialize(_matmul_t, f"iq_matmul_{name}", **consts)
        if self._has(TILE16):
            decode = specialize(_iq_tile._decode_rows_t, f"iq_t16_decode_{name}", **consts)
            self._kernels[TILE16] = specialize(_iq_tile._matmul_t16_t, f"iq_t16_matmul_{name}",
                                               DECODE=decode, **consts)
        for v, kern in self._kernels.items():
            if v == TILE16:     # prefill only: the pools call run_x (slots are few)
                continue
            try:
                self._slots[v] = _native.register_kernel(kern, True)
            except RuntimeError:    # the native table is full: the pools call matmul_x instead
                pass
        self._mm = self._kernels.get(AVX2)
        self.native_slot = self._slots.get(AVX2)

    def _has(self, variant: str) -> bool:
        return all(f in _simd.host_features() for f in self.features[variant])

    def variants(self) -> list[str]:
        return list(self._kernels) + ["blas-tile"]

    def prepare(self, raw: np.ndarray) -> np.ndarray:
        """The GGUF rows themselves, uint8 (N, row_bytes) (a copy only if not C-contiguous)."""
        return np.ascontiguousarray(raw)

    def n_cols(self, w) -> int:
        return w.shape[1] // self.type_size * QK

    def dequantize(self, w, out, r0, r1) -> None:
        self._dequant(w, out, r0, r1)

    def prepare_variant_x(self, variant: str, acts) -> None:
        if variant in self._kernels:
            acts.form("q8_k", q8_k_form)

    def _x(self, acts):
        return acts.form("q8_k", q8_k_form)     # (xq, xd, xb)

    def run_x(self, variant: str, w, acts, out, r0, r1) -> None:
        if variant in (AVX2, AVX512, TILE16):
            mm = self._kernels.get(variant)
            if mm is None:
                raise ValueError(f"this CPU cannot run {variant!r}")
            if out.flags.c_contiguous:
                mm(w, *self._x(acts), out, r0, r1)
            else:
                tmp = np.empty(out.shape, np.float32)          # (T, N)
                mm(w, *self._x(acts), tmp, r0, r1)
                out[:, r0:r1] = tmp[:, r0:r1]
        elif variant == "blas-tile":
            KernelUnit.matmul(self, w, acts.x, out, r0, r1)
        else:
            raise ValueError(f"unknown variant {variant!r} for {self.qtype.name}")

    def variant_task(self, variant: str, w, acts, out, r0, r1, pf: int = 0):
        """The native variants' slot and arguments (None for blas-tile: the pool calls run_x),
        so decode and calibration's end-to-end timing dispatch them alike."""
        slot = self._slots.get(variant)
        if slot is None or not out.flags.c_contiguous:
            return None
        return (slot, w, *self._x(acts), out, r0, r1)

    def synthetic(self, n: int, k: int, rng: np.random.Generator,
                  d_range: tuple[float, float] = (1e-4, 1e-2)) -> np.ndarray:
        """Random raw rows (N, row_bytes): every bit pattern of indices, signs and sub-block
        scales is a valid block; the f16 scale d is drawn uniformly from d_range."""
        nb = k // QK
        raw = rng.integers(0, 256, (n, nb, self.type_size), dtype=np.uint8)
        d = rng.uniform(*d_range, (n, nb, 1)).astype(np.float16).view(np.uint8)
        for off in self.f16_fields:
            raw[:, :, off:off + 2] = d
        return raw.reshape(n, nb * self.type_size)

    def hot_kernels(self) -> list:
        from numba import typeof

        w = np.zeros((1, self.type_size), np.uint8)
        xq, xd, xb = self._x_form_of(np.zeros((1, QK), np.float32))
        args = tuple(typeof(a) for a in (w, xq, xd, xb, np.zeros((1, 1), np.float32), 0, 1, 0))
        return [(k, args) for k in self._kernels.values()]

    @staticmethod
    def _x_form_of(x):
        return q8_k_form(x)
