"""IQ codebook kernels (IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S) against gguf-py.

gguf-py cannot quantize these types (checked below), so the weights are random raw bytes with
the f16 scale set to a sane positive value (`unit.synthetic`): every bit pattern of the grid
indices, signs, deltas and sub-block scales is a valid block, and random bytes exercise them all.
The decode kernels' machine code is checked in test_kernels_asm.py.
"""
from __future__ import annotations

import threading

import numpy as np
import pytest

import numallm_kernels as nk
from numallm_kernels._kquant_common import q8_k_form
from numallm_kernels._iq512_simd import FEATURES as IQ512_FEATURES
from numallm_kernels._iq_tile import FEATURES as TILE16_FEATURES
from numallm_kernels._simd import has_avx2, host_features
from numallm.gguf_file import GGMLQuantizationType as T
from numallm.gguf_file import reference_dequantize, reference_quantize
import record_checks

TYPES = [T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ3_XXS, T.IQ3_S, T.IQ1_S, T.IQ1_M]
# matvec's only error is x's int8 encoding per 256 (Q8_K), as for the K-quants: relative error
# energy ~5e-5 for Gaussian x; a wrong index, sign or scale gives NMSE ~ 1
MATVEC_NMSE = 3e-4
MATMUL_NMSE = 1e-10     # blas-tile: exact weights, float32 rounding only
AVX2 = "avx2-iq"
AVX512 = "avx512-iq"
TILE16 = "avx512vnni-t16"     # tests/test_kernels_t16.py
NATIVE = (AVX2, AVX512, TILE16)
ids = [t.name for t in TYPES]
HAS_512 = has_avx2() and set(IQ512_FEATURES) <= host_features()
HAS_TILE16 = has_avx2() and set(TILE16_FEATURES) <= host_features()


def native_variants(unit, variant):
    """Skip (or, for avx512-iq, check it is not offered) where this CPU cannot run `variant`."""
    if variant == AVX2 and not has_avx2():
        pytest.skip("this CPU has no AVX2")
    if variant == AVX512 and not HAS_512:
        assert AVX512 not in unit.variants()
        pytest.skip("this CPU has no AVX-512 F/BW/VL/VBMI")
    if variant == TILE16 and not HAS_TILE16:
        assert TILE16 not in unit.variants()
        pytest.skip("this CPU has no AVX-512 F/BW/VL/VNNI")
    assert variant in unit.variants()


def random_weights(qtype, n, k, seed=0):
    return nk.get(qtype).synthetic(n, k, np.random.default_rng(seed))


def ref_matrix(raw, qtype):
    return reference_dequantize(raw, qtype).reshape(raw.shape[0], -1)


def nmse(got, want):
    want = want.astype(np.float64)
    return float(np.sum((got.astype(np.float64) - want) ** 2) / np.sum(want ** 2))


@pytest.mark.parametrize("qtype", TYPES, ids=ids)
def test_gguf_py_cannot_quantize(qtype):
    # if gguf-py gains a quantizer for these types, tests should switch to realistic data
    with pytest.raises(NotImplementedError):
        reference_quantize(np.zeros((1, 256), np.float32), qtype)


@pytest.mark.parametrize("qtype", TYPES, ids=ids)
def test_dequantize_exact(qtype):
    n, k = 13, 768
    raw = random_weights(qtype, n, k, seed=1)
    raw.flags.writeable = False                 # GGUF tensors are read-only memmap views
    unit = nk.get(qtype)
    w = unit.prepare(raw)
    assert unit.n_cols(w) == k
    ref = ref_matrix(raw, qtype)
    out = np.full((n, k), np.nan, np.float32)
    unit.dequantize(w, out, 0, n)
    np.testing.assert_array_equal(out, ref)
    part = np.full((6, k), np.nan, np.float32)
    unit.dequantize(w, part, 5, 11)
    np.testing.assert_array_equal(part, ref[5:11])


def test_every_codebook_entry_dequantizes_exactly():
    """4096 random blocks per type: 32 (IQ3: 64) index draws per block give each grid entry
    (at most 2048), sign pattern and delta >= 64 draws on average, so with this fixed seed every
    table entry is checked (P(some entry missed) < 2048 * e^-64)."""
    rng = np.random.default_rng(2)
    for qtype in TYPES:
        unit = nk.get(qtype)
        raw = unit.synthetic(512, 256 * 8, rng)             # 4096 blocks
        out = np.empty((512, 256 * 8), np.float32)
        unit.dequantize(unit.prepare(raw), out, 0, 512)
        np.testing.assert_array_equal(out, ref_matrix(raw, qtype), err_msg=qtype.name)


@pytest.mark.parametrize("qtype", TYPES, ids=ids)
def test_matvec(qtype):
    n, k = 37, 1024
    raw = random_weights(qtype, n, k, seed=3)
    unit = nk.get(qtype)
    w = unit.prepare(raw)
    x = np.random.default_rng(4).standard_normal(k).astype(np.float32)
    want = ref_matrix(raw, qtype).astype(np.float64) @ x.astype(np.float64)
    out = np.zeros(n, np.float32)
    unit.matvec(w, x, out, 0, n)
    assert nmse(out, want) < MATVEC_NMSE
    r0, r1 = 7, 30                              # a range mid-matrix; rows outside untouched
    part = np.full(n, -7.0, np.float32)
    unit.matvec(w, x, part, r0, r1)
    np.testing.assert_array_equal(part[r0:r1], out[r0:r1])
    assert np.all(part[:r0] == -7.0) and np.all(part[r1:] == -7.0)


@pytest.mark.parametrize("qtype", TYPES, ids=ids)
def test_matmul_every_variant(qtype):
    n, k, t = 21, 512, 5
    raw = random_weights(qtype, n, k, seed=5)
    unit = nk.get(qtype)
    w = unit.prepare(raw)
    x = np.random.default_rng(6).standard_normal((t, k)).astype(np.float32)
    want = x.astype(np.float64) @ ref_matrix(raw, qtype).astype(np.float64).T   # (T, N)
    r0, r1 = 4, 19
    for variant in unit.variants():
        out = np.full((t, n), -7.0, np.float32)
        unit.run(variant, w, x, out, r0, r1)
        bound = MATVEC_NMSE if variant in NATIVE else MATMUL_NMSE
        assert nmse(out[:, r0:r1], want[:, r0:r1]) < bound, variant
        assert np.all(out[:, :r0] == -7.0) and np.all(out[:, r1:] == -7.0)
    out = np.zeros((t, n), np.float32)
    unit.matmul(w, x, out, 0, n)                 # the calibrated choice
    assert nmse(out, want) < MATVEC_NMSE


@pytest.mark.parametrize("variant", NATIVE)
@pytest.mark.parametrize("qtype", TYPES, ids=ids)
def test_native_kernel_is_exact_on_the_quantized_activations(qtype, variant):
    """The kernel's only approximation is x's int8 encoding: against the float64 product of the
    exactly dequantized weights with the decoded codes it agrees to float32 rounding (a wrong
    grid entry, sign, delta or scale gives NMSE ~ 1e-3 or more). Decode (T = 1) and prefill /
    batched decode (T = 2, 3, 5, 8)."""
    n, k = 19, 1024
    unit = nk.get(qtype)
    native_variants(unit, variant)
    raw = random_weights(qtype, n, k, seed=10)
    w = unit.prepare(raw)
    for t in (1, 2, 3, 5, 8):
        x = np.random.default_rng(11).standard_normal((t, k)).astype(np.float32)
        xq, xd, _ = q8_k_form(x)
        xdec = (xq.reshape(t, -1, 256).astype(np.float64) * xd[:, :, None]).reshape(t, k)
        want = xdec @ ref_matrix(raw, qtype).astype(np.float64).T
        out = np.zeros((t, n), np.float32)
        unit.run(variant, w, x, out, 2, n)
        assert nmse(out[:, 2:], want[:, 2:]) < 1e-10, t
        assert np.all(out[:, :2] == 0)


@pytest.mark.parametrize("variant", NATIVE)
@pytest.mark.parametrize("qtype", TYPES, ids=ids)
def test_decode_equals_prefill_bit_for_bit(qtype, variant):
    """Each row of a T-token call (T = 2..8) equals decode (T = 1) of that token, bit for bit."""
    unit = nk.get(qtype)
    native_variants(unit, variant)
    n, k = 77, 512
    w = unit.prepare(random_weights(qtype, n, k, seed=13))
    x = np.random.default_rng(14).standard_normal((8, k)).astype(np.float32)
    record_checks.decode_equals_prefill_rows(unit, w, x, n, [variant])


@pytest.mark.parametrize("qtype", TYPES, ids=ids)
def test_avx512_equals_avx2_bit_for_bit(qtype):
    """avx512-iq forms avx2-iq's int32 sums per block and the same float operations after them,
    so both give the same bits, decode and every T; 1024 blocks cover every code path."""
    unit = nk.get(qtype)
    native_variants(unit, AVX2)
    native_variants(unit, AVX512)
    n, k = 128, 2048
    w = unit.prepare(random_weights(qtype, n, k, seed=15))
    for t in (1, 2, 3, 5, 8):
        x = np.random.default_rng(16 + t).standard_normal((t, k)).astype(np.float32)
        a, b = (np.zeros((t, n), np.float32) for _ in range(2))
        unit.run(AVX2, w, x, a, 0, n)
        unit.run(AVX512, w, x, b, 0, n)
        np.testing.assert_array_equal(a.view(np.uint32), b.view(np.uint32), err_msg=f"T={t}")


@pytest.mark.parametrize("qtype", TYPES, ids=ids)
def test_threads_on_disjoint_ranges_match_one_call(qtype):
    n, k = 203, 512
    unit = nk.get(qtype)
    w = unit.prepare(random_weights(qtype, n, k, seed=7))
    x = np.random.default_rng(8).standard_normal(k).astype(np.float32)
    one = np.zeros(n, np.float32)
    unit.matvec(w, x, one, 0, n)
    two = np.zeros(n, np.float32)
    ths = [threading.Thread(target=unit.matvec, args=(w, x, two, a, b)) for a, b in ((0, 101), (101, n))]
    for th in ths:
        th.start()
    for th in ths:
        th.join()
    np.testing.assert_array_equal(two, one)


@pytest.mark.parametrize("qtype", TYPES, ids=ids)
def test_matvec_special_inputs(qtype):
    n, k = 5, 512
    unit = nk.get(qtype)
    w = unit.prepare(random_weights(qtype, n, k, seed=9))
    out = np.full(n, 3.0, np.float32)
    unit.matvec(w, np.zeros(k, np.float32), out, 0, n)
    np.testing.assert_array_equal(out, 0.0)
    x = np.ones(k, np.float32)
    x[300] = np.nan                             # a non-finite input must show
    unit.matvec(w, x, out, 0, n)
    assert np.all(np.isnan(out))
