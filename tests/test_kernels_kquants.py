"""K-quant kernels (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_XS) against gguf-py's reference dequantizer.

gguf-py cannot quantize any of these types (checked below), so the weights are random raw bytes
with the f16 super-scales overwritten by sane positive values: every bit pattern of the quants and
sub-block scales is a valid block, and random bytes exercise all of them.
"""
from __future__ import annotations

import threading

import numpy as np
import pytest

import numallm_kernels as nk
from numallm_kernels._kquant_common import q8_k_form
from numallm_kernels._simd import has_avx2
from numallm_kernels.base import fresh_asm
from numallm.gguf_file import GGMLQuantizationType as T
from numallm.gguf_file import quant_sizes, reference_dequantize, reference_quantize
import record_checks

TYPES = [T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.IQ4_XS]

# Byte offsets of the f16 super-scales inside one block (d first, then dmin where present).
F16_FIELDS = {T.Q2_K: (80, 82), T.Q3_K: (108,), T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,),
              T.IQ4_XS: (0,)}

# NMSE bound of matvec against the float64 product of the exactly dequantized weights. The only
# error source is quantizing x to int8 per 256-block (llama.cpp's Q8_K): its step is amax/127, so
# for Gaussian x the relative error energy is ~5e-5; mins (Q2_K) cancel signal and double it.
# A wrong index or scale gives NMSE ~ 1, far above these.
MATVEC_NMSE = {T.Q2_K: 4e-4, T.Q3_K: 2e-4, T.Q4_K: 2e-4, T.Q5_K: 2e-4, T.Q6_K: 2e-4,
               T.IQ4_XS: 2e-4}
# matmul's float variants (blas-tile, numba-f32) dequantize exactly: only float32 rounding.
MATMUL_NMSE = 1e-10
RECORD_VARIANTS = ("avx512vnni-x16", "avx512vnni-x8", "avx2-x8")   # the int8 record kernels (x rounded as above)
INT8_VARIANTS = RECORD_VARIANTS + ("avx512vnni-t16",)   # with Q6_K's token tiles (test_kernels_t16.py)


def random_weights(qtype, n, k, seed=0):
    """uint8 (n, row_bytes): random quants and sub-block scales, f16 super-scales in 1e-4..1e-2."""
    rng = np.random.default_rng(seed)
    bs, ts = quant_sizes(qtype)
    nb = k // bs
    raw = rng.integers(0, 256, (n, nb, ts), dtype=np.uint8)
    for off in F16_FIELDS[qtype]:
        f = rng.uniform(1e-4, 1e-2, (n, nb, 1)).astype(np.float16)
        raw[:, :, off:off + 2] = f.view(np.uint8)
    return raw.reshape(n, nb * ts)


def ref_matrix(raw, qtype):
    return reference_dequantize(raw, qtype).reshape(raw.shape[0], -1)


def nmse(got, want):
    want = want.astype(np.float64)
    return float(np.sum((got.astype(np.float64) - want) ** 2) / np.sum(want ** 2))


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_gguf_py_cannot_quantize(qtype):
    # If gguf-py ever gains a quantizer for these types, tests should switch to realistic data.
    with pytest.raises(NotImplementedError):
        reference_quantize(np.zeros((1, 256), np.float32), qtype)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_dequantize_exact(qtype):
    n, k = 13, 768
    raw = random_weights(qtype, n, k, seed=1)
    unit = nk.get(qtype)
    w = unit.prepare(raw)
    assert unit.n_cols(w) == k
    ref = ref_matrix(raw, qtype)
    out = np.full((n, k), np.nan, np.float32)
    unit.dequantize(w, out, 0, n)
    np.testing.assert_array_equal(out, ref)
    # a range starting mid-matrix writes exactly its rows
    part = np.full((6, k), np.nan, np.float32)
    unit.dequantize(w, part, 5, 11)
    np.testing.assert_array_equal(part, ref[5:11])


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_dequantize_readonly_input(qtype):
    # GGUF tensors are read-only memmap views.
    raw = random_weights(qtype, 3, 256, seed=2)
    raw.flags.writeable = False
    unit = nk.get(qtype)
    out = np.empty((3, 256), np.float32)
    unit.dequantize(unit.prepare(raw), out, 0, 3)
    np.testing.assert_array_equal(out, ref_matrix(raw, qtype))


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_matvec(qtype):
    n, k = 37, 1024
    raw = random_weights(qtype, n, k, seed=3)
    unit = nk.get(qtype)
    w = unit.prepare(raw)
    x = np.random.default_rng(4).standard_normal(k).astype(np.float32)
    want = ref_matrix(raw, qtype).astype(np.float64) @ x.astype(np.float64)
    out = np.zeros(n, np.float32)
    unit.matvec(w, x, out, 0, n)
    assert nmse(out, want) < MATVEC_NMSE[qtype]
    # odd range from mid-matrix; rows outside stay untouched
    r0, r1 = 7, 30
    part = np.full(n, -7.0, np.float32)
    unit.matvec(w, x, part, r0, r1)
    np.testing.assert_array_equal(part[r0:r1], out[r0:r1])  # rows are independent: bit-equal
    assert np.all(part[:r0] == -7.0) and np.all(part[r1:] == -7.0)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_matmul(qtype):
    n, k, t = 21, 512, 3
    raw = random_weights(qtype, n, k, seed=5)
    unit = nk.get(qtype)
    w = unit.prepare(raw)
    x = np.random.default_rng(6).standard_normal((t, k)).astype(np.float32)
    want = x.astype(np.float64) @ ref_matrix(raw, qtype).astype(np.float64).T  # (T, N)
    r0, r1 = 4, 19
    out = np.full((t, n), -7.0, np.float32)
    unit.matmul(w, x, out, r0, r1)
    # the calibrated units may pick their int8 kernel for prefill too (x rounded as in matvec)
    int8 = unit.calibrated and unit.choice().for_tokens(t) in INT8_VARIANTS
    assert nmse(out[:, r0:r1], want[:, r0:r1]) < (MATVEC_NMSE[qtype] if int8 else MATMUL_NMSE)
    assert np.all(out[:, :r0] == -7.0) and np.all(out[:, r1:] == -7.0)
    for variant in unit.variants() if unit.calibrated else []:
        out = np.full((t, n), -7.0, np.float32)
        unit.run(variant, w, x, out, r0, r1)
        bound = MATVEC_NMSE[qtype] if variant in INT8_VARIANTS else MATMUL_NMSE
        assert nmse(out[:, r0:r1], want[:, r0:r1]) < bound, variant
        assert np.all(out[:, :r0] == -7.0) and np.all(out[:, r1:] == -7.0)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_threads_on_disjoint_ranges_match_one_call(qtype):
    n, k = 203, 512
    unit = nk.get(qtype)
    w = unit.prepare(random_weights(qtype, n, k, seed=7))
    x = np.random.default_rng(8).standard_normal(k).astype(np.float32)
    one = np.zeros(n, np.float32)
    unit.matvec(w, x, one, 0, n)
    two = np.zeros(n, np.float32)
    split = 101  # odd, so each thread also runs the row-remainder path of blocked kernels
    ths = [threading.Thread(target=unit.matvec, args=(w, x, two, a, b))
           for a, b in ((0, split), (split, n))]
    for th in ths:
        th.start()
    for th in ths:
        th.join()
    np.testing.assert_array_equal(two, one)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_matvec_special_inputs(qtype):
    n, k = 5, 512
    unit = nk.get(qtype)
    w = unit.prepare(random_weights(qtype, n, k, seed=9))
    out = np.full(n, 3.0, np.float32)
    unit.matvec(w, np.zeros(k, np.float32), out, 0, n)
    np.testing.assert_array_equal(out, 0.0)
    x = np.ones(k, np.float32)
    x[300] = np.nan  # a non-finite input must show, not be quantized away
    unit.matvec(w, x, out, 0, n)
    assert np.all(np.isnan(out))


@pytest.mark.parametrize("variant", RECORD_VARIANTS)
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_record_kernel_is_exact_on_the_quantized_activations(qtype, variant):
    """The record kernel's only approximation is x's int8 encoding: against the float64 product
    of the exactly dequantized weights with the *decoded* codes it agrees to float32 rounding
    (a wrong scale, min, offset or chunk order gives NMSE ~ 1e-2 or more)."""
    n, k, t = 19, 1024, 3
    unit = nk.get(qtype)
    if variant not in unit.variants():
        pytest.skip(f"{qtype.name} has no {variant} on this CPU")
    raw = random_weights(qtype, n, k, seed=10)
    w = unit.prepare(raw)
    x = np.random.default_rng(11).standard_normal((t, k)).astype(np.float32)
    xq, xd, _ = q8_k_form(x)
    xdec = (xq.reshape(t, -1, 256).astype(np.float64) * xd[:, :, None]).reshape(t, k)
    want = xdec @ ref_matrix(raw, qtype).astype(np.float64).T
    out = np.zeros((t, n), np.float32)
    unit.run(variant, w, x, out, 2, n)
    assert nmse(out[:, 2:], want[:, 2:]) < 1e-10
    assert np.all(out[:, :2] == 0)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_record_variants_agree_bit_for_bit_and_decode_streams_match_prefill(qtype):
    """The VNNI and AVX2 steps form the same exact int32 sums and float operations (bit-equal
    results); decode's two-stream loop (T = 1) gives each token the bytes of prefill's
    one-group-at-a-time loop (T = 3). Odd row counts, ranges cut mid-group."""
    unit = nk.get(qtype)
    have = [v for v in RECORD_VARIANTS if v in unit.variants()]
    if not have:
        pytest.skip("CPU lacks AVX2")
    n, k = 77, 512
    w = unit.prepare(random_weights(qtype, n, k, seed=13))
    x = np.random.default_rng(14).standard_normal((15, k)).astype(np.float32)   # 8 + 4 + 2 + 1
    record_checks.decode_equals_prefill_rows(unit, w, x, n, have)


def test_record_layout_size():
    """Q6_K and Q2_K records hold exactly the GGUF bytes; unpacked scales add 4 bytes per block to
    Q3_K, Q4_K and Q5_K and 2 to IQ4_XS."""
    for qtype, per_block in ((T.Q6_K, 210), (T.Q2_K, 84), (T.Q4_K, 148), (T.Q5_K, 180),
                             (T.IQ4_XS, 138), (T.Q3_K, 114)):
        raw = random_weights(qtype, 13, 512, seed=12)
        w = nk.get(qtype).prepare(raw)
        assert w.q.nbytes == 16 * 2 * per_block      # 2 groups of 8 rows (3 padding), 2 blocks


@pytest.mark.skipif(not has_avx2(), reason="this CPU has no AVX2: only the plain kernels run")
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_decode_kernel_is_vector_code(qtype):
    hot = nk.get(qtype).hot_kernels()
    assert hot, f"{qtype.name} should use its AVX2 decode kernel on this CPU"
    for dispatcher, argtypes in hot:
        asm = fresh_asm(dispatcher, argtypes)
        assert ("vpmaddubsw" in asm or "vpdpbusd" in asm) and "ymm" in asm


@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q6_K, T.Q4_0, T.Q8_0])
def test_decode_prefetch_leaves_results_bit_identical(qtype):
    # decode's software prefetch distance (chosen per CPU by calibration) only asks for lines
    # ahead: every record variant gives the same bits with and without it
    from numallm_kernels import _native

    if not _native.available():
        pytest.skip("no native record kernels on this CPU")
    unit = nk.get(qtype)
    rng = np.random.default_rng(3)
    n, k = 64, 512
    w = unit.prepare(unit.synthetic(n, k, rng))
    acts = nk.Activations(rng.standard_normal((1, k)).astype(np.float32))
    run_tasks, _ = _native.executors()
    for variant in unit.variants():
        unit.prepare_variant_x(variant, acts)
        outs = []
        for pf in (0, 2048, 64):
            out = np.zeros((1, n), np.float32)
            task = unit.variant_task(variant, w, acts, out, 0, n, pf)
            if task is None:
                break
            table = np.zeros((1, _native.TASK_FIELDS), np.int64)
            _native.encode(table[0], *task)
            run_tasks(table, 0, 1)
            outs.append(out)
        for out in outs[1:]:
            np.testing.assert_array_equal(out, outs[0])
