"""Ternary kernels (TQ1_0, TQ2_0) against gguf-py, which quantizes and dequantizes both.

Weights are gguf-py's quantization of Gaussian rows (realistic blocks) and random raw bytes with
a sane f16 scale (`unit.synthetic`: every byte is a valid TQ1_0 block; TQ2_0's unused code 3
decodes to +2 in gguf-py and in the kernels alike, so random bytes cover all of it).
"""
from __future__ import annotations

import numpy as np
import pytest

import numallm_kernels as nk
from numallm_kernels._kquant_common import q8_k_form
from numallm_kernels._iq512_simd import FEATURES as IQ512_FEATURES
from numallm_kernels._simd import has_avx2, host_features
from numallm.gguf_file import GGMLQuantizationType as T
from numallm.gguf_file import reference_dequantize, reference_quantize
import record_checks

TYPES = [T.TQ1_0, T.TQ2_0]
ids = [t.name for t in TYPES]
AVX2 = "avx2-iq"
AVX512 = "avx512-iq"
HAS_512 = has_avx2() and set(IQ512_FEATURES) <= host_features()


def nmse(got, want):
    want = want.astype(np.float64)
    return float(np.sum((got.astype(np.float64) - want) ** 2) / np.sum(want ** 2))


def weights(qtype, n, k, seed, quantized):
    rng = np.random.default_rng(seed)
    if quantized:
        return reference_quantize(rng.standard_normal((n, k)).astype(np.float32), qtype)
    return nk.get(qtype).synthetic(n, k, rng)


def ref(raw, qtype):
    return reference_dequantize(raw, qtype).reshape(raw.shape[0], -1)


@pytest.mark.parametrize("qtype", TYPES, ids=ids)
def test_dequantize_exact(qtype):
    unit = nk.get(qtype)
    for quantized in (True, False):
        raw = weights(qtype, 64, 1024, 1, quantized)
        raw.flags.writeable = False             # GGUF tensors are read-only memmap views
        w = unit.prepare(raw)
        assert unit.n_cols(w) == 1024
        out = np.full((raw.shape[0], 1024), np.nan, np.float32)
        unit.dequantize(w, out, 0, raw.shape[0])
        np.testing.assert_array_equal(out, ref(raw, qtype))


@pytest.mark.parametrize("qtype", TYPES, ids=ids)
def test_matvec_and_matmul(qtype):
    """Every variant against the float64 product of the exact weights: the only error is x's
    int8 encoding per 256 (a wrong digit or scale gives NMSE ~ 1)."""
    unit = nk.get(qtype)
    n, k = 37, 1024
    raw = weights(qtype, n, k, 3, True)
    w = unit.prepare(raw)
    x = np.random.default_rng(4).standard_normal((3, k)).astype(np.float32)
    want = x.astype(np.float64) @ ref(raw, qtype).astype(np.float64).T     # (3, N)
    out = np.zeros(n, np.float32)
    unit.matvec(w, x[0], out, 0, n)
    assert nmse(out, want[0]) < 3e-4
    for variant in unit.variants():
        out = np.full((3, n), -7.0, np.float32)
        unit.run(variant, w, x, out, 4, 30)
        assert nmse(out[:, 4:30], want[:, 4:30]) < 3e-4, variant
        assert np.all(out[:, :4] == -7.0) and np.all(out[:, 30:] == -7.0)


@pytest.mark.parametrize("variant", [AVX2, AVX512])
@pytest.mark.parametrize("qtype", TYPES, ids=ids)
def test_native_kernel_is_exact_on_the_quantized_activations(qtype, variant):
    """Against the float64 product with the decoded int8 codes of x the native kernels agree to
    float32 rounding, decode (T = 1) and prefill (T = 2, 3, 5, 8), on every digit position
    (random bytes); prefill equals token-by-token decode bit for bit (T = 2..8), and avx512-iq
    gives avx2-iq's bits."""
    unit = nk.get(qtype)
    if variant == AVX2 and not has_avx2():
        pytest.skip("this CPU has no AVX2")
    if variant == AVX512 and not HAS_512:
        assert AVX512 not in unit.variants()
        pytest.skip("this CPU has no AVX-512 F/BW/VL/VBMI")
    n, k = 19, 1024
    raw = weights(qtype, n, k, 10, False)
    w = unit.prepare(raw)
    for t in (1, 2, 3, 5, 8):
        x = np.random.default_rng(11).standard_normal((t, k)).astype(np.float32)
        xq, xd, _ = q8_k_form(x)
        xdec = (xq.reshape(t, -1, 256).astype(np.float64) * xd[:, :, None]).reshape(t, k)
        want = xdec @ ref(raw, qtype).astype(np.float64).T
        out = np.zeros((t, n), np.float32)
        unit.run(variant, w, x, out, 2, n)
        assert nmse(out[:, 2:], want[:, 2:]) < 1e-10, t
        assert np.all(out[:, :2] == 0)
    big = unit.prepare(weights(qtype, 77, 512, 13, False))
    x = np.random.default_rng(14).standard_normal((8, 512)).astype(np.float32)
    both = [AVX2, AVX512] if variant == AVX512 else [AVX2]
    record_checks.decode_equals_prefill_rows(unit, big, x, 77, both)
