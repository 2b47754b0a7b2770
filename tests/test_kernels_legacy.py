"""Kernels of the 32-element block types and the dense types (F32, F16, BF16).

dequantize must equal gguf-py's reference bit for bit; matvec/matmul are compared with a float64
product of the reference-dequantized weight, as a normalized mean squared error
NMSE = sum((y - ref)^2) / sum(ref^2), bounded per variant (test-backend-ops style):

| variant     | bound | why                                                             |
|-------------|-------|-----------------------------------------------------------------|
| avx2-x8     | 5e-4  | x is rounded to int8 per 32-block (~1e-5 seen on Gaussian data) |
| avx512vnni-x8 | 5e-4 | the same integers through vpdpbusd (bit-equal to avx2-x8)      |
| numba-f32   | 1e-9  | float32 products and sums of exactly dequantized weights        |
| blas-tile   | 1e-9  | same, summed by BLAS                                            |
| blas / f16  | 1e-9  | dense types                                                     |
"""
from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

import numallm_kernels as nk
from numallm.gguf_file import GGMLQuantizationType as T
from numallm.gguf_file import GGUFFile, reference_dequantize, reference_quantize
from numallm_kernels import _calibrate
from numallm_kernels.interleaved import q8_0_form
import record_checks

MODELS = Path(__file__).resolve().parents[1].parent / "shared" / "models"

NMSE_BOUND = {"avx2-x8": 5e-4, "avx512vnni-x8": 5e-4, "avx512vnni-x16": 5e-4, "numba-f32": 1e-9,
              "blas-tile": 1e-9}
RECORD_VARIANTS = ("avx512vnni-x16", "avx512vnni-x8", "avx2-x8")   # the int8 record kernels
BLOCK_TYPES = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.IQ4_NL]
QUANTIZABLE = {T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0}  # gguf-py has no IQ4_NL quantizer
N, K, R0, R1 = 37, 320, 5, 34   # odd row count, range starting mid-matrix, K = 10 blocks


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """Calibration results go to a scratch dir, and each test starts without a cached choice."""
    monkeypatch.setenv("NUMALLM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("NUMALLM_KERNEL", raising=False)
    yield
    for qt in BLOCK_TYPES:
        nk.get(qt)._choice = None


def weights(qt, rng, n=N, k=K, how="quantize"):
    """raw uint8 (n, row_bytes): reference-quantized Gaussian rows, or random bytes with sane
    (and some negative) f16 scales."""
    unit = nk.get(qt)
    if how == "quantize" and qt in QUANTIZABLE:
        vals = rng.standard_normal((n, k)).astype(np.float32)
        vals[0] = 0.0  # all-zero blocks: d = 0
        return np.ascontiguousarray(reference_quantize(vals, qt))
    raw = unit.synthetic(n, k, rng).reshape(n, k // 32, -1)
    raw[1::3, :, 0:2] = rng.uniform(-2.0, -1e-4, (len(range(1, n, 3)), k // 32, 1)).astype(
        np.float16).view(np.uint8)
    return raw.reshape(n, -1)


def nmse(y, ref):
    return float(np.sum((y.astype(np.float64) - ref) ** 2) / np.sum(ref ** 2))


@pytest.mark.parametrize("how", ["quantize", "random"])
@pytest.mark.parametrize("qt", BLOCK_TYPES, ids=lambda q: q.name)
def test_dequantize_is_exact(qt, how):
    rng = np.random.default_rng(int(qt) * 7 + len(how))
    raw = weights(qt, rng, how=how)
    unit = nk.get(qt)
    w = unit.prepare(raw)
    assert unit.n_cols(w) == K
    ref = reference_dequantize(raw, qt).reshape(N, K)
    out = np.full((R1 - R0, K), np.nan, np.float32)
    unit.dequantize(w, out, R0, R1)
    np.testing.assert_array_equal(out.view(np.uint32), ref[R0:R1].view(np.uint32))


def _variant_cases():
    cases = []
    for qt in BLOCK_TYPES:
        for v in nk.get(qt).variants():
            cases.append(pytest.param(qt, v, id=f"{qt.name}-{v}"))
    return cases


@pytest.mark.parametrize("qt,variant", _variant_cases())
def test_matvec_matmul_accuracy_and_row_range(qt, variant):
    rng = np.random.default_rng(int(qt))
    raw = weights(qt, rng)
    unit = nk.get(qt)
    w = unit.prepare(raw)
    wref = reference_dequantize(raw, qt).reshape(N, K).astype(np.float64)
    for n_t in (1, 3, 9):
        x = rng.standard_normal((n_t, K)).astype(np.float32)
        ref = x.astype(np.float64) @ wref.T                   # (T, N)
        out = np.full((n_t, N), -7.0, np.float32)
        unit.run(variant, w, x, out, R0, R1)
        # rows R0+1 (all-zero block row 0 is outside) .. R1: compare; outside: untouched
        assert nmse(out[:, R0:R1], ref[:, R0:R1]) < NMSE_BOUND[variant]
        assert np.all(out[:, :R0] == -7.0) and np.all(out[:, R1:] == -7.0)


@pytest.mark.parametrize("qt", BLOCK_TYPES, ids=lambda q: q.name)
def test_public_matvec_matmul_with_forced_variant(qt, monkeypatch):
    unit = nk.get(qt)
    rng = np.random.default_rng(3)
    raw = weights(qt, rng)
    w = unit.prepare(raw)
    wref = reference_dequantize(raw, qt).reshape(N, K).astype(np.float64)
    x = rng.standard_normal((4, K)).astype(np.float32)
    for variant in unit.variants():
        monkeypatch.setenv("NUMALLM_KERNEL", f"iq2_xs:blas-tile,{qt.name.lower()}:{variant}")
        unit._choice = None
        assert unit.variant == variant
        y = np.zeros(N, np.float32)
        unit.matvec(w, x[0], y, 0, N)
        assert nmse(y[1:], wref[1:] @ x[0]) < NMSE_BOUND[variant]
        Y = np.zeros((4, N), np.float32)
        unit.matmul(w, x, Y, 0, N)
        assert nmse(Y[:, 1:], x.astype(np.float64) @ wref[1:].T) < NMSE_BOUND[variant]


@pytest.mark.parametrize("qt", [T.Q4_0, T.Q8_0, T.Q5_1], ids=lambda q: q.name)
def test_two_threads_match_one_call(qt):
    """Disjoint row ranges from two Python threads give the same bytes as one call (blas-tile:
    BLAS picks its summation order by matrix shape, so only to float32 rounding)."""
    unit = nk.get(qt)
    rng = np.random.default_rng(5)
    n = 203
    w = unit.prepare(weights(qt, rng, n=n, k=1024))
    for variant in unit.variants():
        for n_t in (1, 5):
            x = rng.standard_normal((n_t, 1024)).astype(np.float32)
            one = np.zeros((n_t, n), np.float32)
            unit.run(variant, w, x, one, 0, n)
            two = np.zeros((n_t, n), np.float32)
            cut = 101  # odd: one side gets a partial group of 4 rows
            ts = [threading.Thread(target=unit.run, args=(variant, w, x, two, a, b))
                  for a, b in ((0, cut), (cut, n))]
            for t in ts:
                t.start()
            for t in ts:
                t.join()
            if variant == "blas-tile":
                assert nmse(two, one.astype(np.float64)) < 1e-12
            else:
                np.testing.assert_array_equal(one.view(np.uint32), two.view(np.uint32))


@pytest.mark.parametrize("variant", RECORD_VARIANTS)
@pytest.mark.parametrize("qt", BLOCK_TYPES, ids=lambda q: q.name)
def test_int8_activations_nonfinite_and_zero_inputs(qt, variant):
    unit = nk.get(qt)
    if variant not in unit.variants():
        pytest.skip(f"CPU cannot run {variant}")
    w = unit.prepare(weights(qt, np.random.default_rng(6)))
    x = np.zeros((2, K), np.float32)
    x[1, 40] = np.inf
    out = np.full((2, N), 3.0, np.float32)
    unit.run(variant, w, x, out, 0, N)
    assert np.all(out[0] == 0.0)
    assert np.all(np.isnan(out[1]))  # the block scale is NaN, so even zero weights give NaN


@pytest.mark.parametrize("variant", RECORD_VARIANTS)
@pytest.mark.parametrize("qt", BLOCK_TYPES, ids=lambda q: q.name)
def test_record_kernel_is_exact_on_the_quantized_activations(qt, variant):
    """The 8-row kernel's only approximation is x's int8 encoding: against the float64 product
    of the exact weights with the *decoded* codes it agrees to float32 rounding."""
    unit = nk.get(qt)
    if variant not in unit.variants():
        pytest.skip(f"CPU cannot run {variant}")
    rng = np.random.default_rng(9)
    raw = weights(qt, rng)
    w = unit.prepare(raw)
    x = rng.standard_normal((3, K)).astype(np.float32)
    xq, dx, _ = q8_0_form(x)
    xdec = (xq.reshape(3, -1, 32).astype(np.float64) * dx[:, :, None]).reshape(3, K)
    want = xdec @ reference_dequantize(raw, qt).reshape(N, K).astype(np.float64).T
    out = np.zeros((3, N), np.float32)
    unit.run(variant, w, x, out, R0, R1)
    assert nmse(out[:, R0:R1], want[:, R0:R1]) < 1e-10


@pytest.mark.parametrize("qt", BLOCK_TYPES, ids=lambda q: q.name)
def test_record_variants_agree_bit_for_bit_and_decode_streams_match_prefill(qt):
    """The record variants form the same exact int32 sums and the same float operations, so
    they agree bit for bit; decode's two-stream loop (T = 1) gives each token the bytes of the
    one-group-at-a-time loop of prefill (T > 1). Odd row counts and ranges cut mid-group."""
    unit = nk.get(qt)
    have = [v for v in RECORD_VARIANTS if v in unit.variants()]
    if not have:
        pytest.skip("CPU lacks AVX2")
    rng = np.random.default_rng(12)
    n = 77
    w = unit.prepare(weights(qt, rng, n=n))
    x = rng.standard_normal((15, K)).astype(np.float32)   # token tiles of 8, 4, 2 and 1
    record_checks.decode_equals_prefill_rows(unit, w, x, n, have)


@pytest.mark.parametrize("qt", [T.Q4_0, T.Q8_0], ids=lambda q: q.name)
def test_native_task_names_the_chosen_variants_kernel(qt, monkeypatch):
    """The engine's worker threads run the kernel of the variant chosen for the token count:
    each record variant has its own native slot; the float variants have none (None: the pool
    then calls matmul_x)."""
    from numallm_kernels.base import Activations

    unit = nk.get(qt)
    w = unit.prepare(weights(qt, np.random.default_rng(10)))
    acts = Activations(np.ones((1, K), np.float32))
    out = np.zeros((1, N), np.float32)
    slots = set()
    for variant in unit.variants():
        monkeypatch.setenv("NUMALLM_KERNEL", f"{qt.name.lower()}:{variant}")
        unit._choice = None
        unit.prepare_x(acts)
        task = unit.native_task(w, acts, out, 0, N)
        if variant in RECORD_VARIANTS:
            assert task is not None and task[0] == unit.native_slots[variant]
            slots.add(task[0])
        else:
            assert task is None
    assert len(slots) == len([v for v in unit.variants() if v in RECORD_VARIANTS])


@pytest.mark.parametrize("qt", BLOCK_TYPES, ids=lambda q: q.name)
def test_interleaved_layout_size_and_strided_output(qt):
    """The 8-row records hold the GGUF bytes once (plus < 8 padding rows); an output that is a
    column slice of a wider array (not contiguous) gets the same values as a contiguous one."""
    unit = nk.get(qt)
    rng = np.random.default_rng(8)
    raw = weights(qt, rng)
    w = unit.prepare(raw)
    assert unit.repacks and w.q.nbytes == -(-N // 8) * 8 * raw.shape[1]
    x = rng.standard_normal((3, K)).astype(np.float32)
    for variant in unit.variants():
        flat = np.zeros((3, N), np.float32)
        unit.run(variant, w, x, flat, 0, N)
        wide = np.zeros((3, N + 9), np.float32)
        unit.run(variant, w, x, wide[:, 4:4 + N], 0, N)
        np.testing.assert_array_equal(wide[:, 4:4 + N], flat)
        assert np.all(wide[:, :4] == 0) and np.all(wide[:, 4 + N:] == 0)


def test_bad_forced_variant_is_a_user_error(monkeypatch):
    unit = nk.get(T.Q8_0)
    monkeypatch.setenv("NUMALLM_KERNEL", "q8_0:no-such-variant")
    unit._choice = None
    with pytest.raises(_calibrate.KernelChoiceError, match="NUMALLM_KERNEL") as e:
        unit.matvec(unit.prepare(weights(T.Q8_0, np.random.default_rng(7))),
                    np.zeros(K, np.float32), np.zeros(N, np.float32), 0, N)
    from numallm.errors import describe        # the CLI's one line and exit code for it
    line, code = describe(e.value)
    assert line.startswith("numallm: error: NUMALLM_KERNEL") and "no-such-variant" in line and code == 1


def test_calibration_measures_once_then_uses_the_cache(tmp_path):
    unit = nk.get(T.Q4_1)
    first = _calibrate.choose(unit)
    assert first.source == "measured" and first.matvec in unit.variants()
    assert set(first.gbs) == set(unit.variants()) and all(g > 0 for g in first.gbs.values())
    assert (tmp_path / "cache" / "kernels.json").is_file()
    again = _calibrate.choose(unit)
    assert again.source == "cached"
    assert (again.matvec, again.prefill) == (first.matvec, first.prefill)
    rows = {r["type"]: r for r in nk.describe(calibrate=False)}
    assert rows["Q4_1"]["variant"] is None  # not chosen in-process yet: no timing happened
    unit.choice()
    rows = {r["type"]: r for r in nk.describe(calibrate=False)}
    assert rows["Q4_1"]["variant"] == first.matvec and rows["Q4_1"]["source"] == "cached"


def test_choice_by_token_count():
    c = _calibrate.Choice("avx2-x8", ((8, "avx2-x8"), (32, "blas-tile")))
    assert [c.for_tokens(t) for t in (1, 2, 8, 31, 32, 500)] == [
        "avx2-x8", "avx2-x8", "avx2-x8", "avx2-x8", "blas-tile", "blas-tile"]


# --- dense types --------------------------------------------------------------------------------

def _dense_raw(qt, rng, n, k):
    vals = rng.standard_normal((n, k)).astype(np.float32)
    if qt == T.F32:
        return vals.view(np.uint8)
    if qt == T.F16:
        return vals.astype(np.float16).view(np.uint8)
    return (vals.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)  # BF16: truncated


def _dense_ref(qt, raw, n, k):
    if qt == T.BF16:
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(n, k)
    return reference_dequantize(raw, qt).reshape(n, k)


@pytest.mark.parametrize("qt", [T.F32, T.F16, T.BF16], ids=lambda q: q.name)
def test_dense_units(qt):
    rng = np.random.default_rng(11)
    n, k = 29, 72  # K need not be a multiple of anything
    raw = _dense_raw(qt, rng, n, k)
    unit = nk.get(qt)
    w = unit.prepare(raw)
    assert unit.n_cols(w) == k
    ref = _dense_ref(qt, raw, n, k)
    out = np.empty((n - 4, k), np.float32)
    unit.dequantize(w, out, 3, n - 1)
    np.testing.assert_array_equal(out, ref[3:n - 1])
    for n_t in (1, 6):
        x = rng.standard_normal((n_t, k)).astype(np.float32)
        y = np.full((n_t, n), -7.0, np.float32)
        if n_t == 1:
            unit.matvec(w, x[0], y[0], 3, n - 1)
        else:
            unit.matmul(w, x, y, 3, n - 1)
        assert nmse(y[:, 3:n - 1], x.astype(np.float64) @ ref[3:n - 1].T.astype(np.float64)) < 1e-9
        assert np.all(y[:, :3] == -7.0) and np.all(y[:, n - 1:] == -7.0)


def test_f16_model_tensors_match_reference():
    path = MODELS / "random" / "llama-2-tiny-random.gguf"
    if not path.is_file():
        pytest.skip(f"test model not found: {path}")
    g = GGUFFile(path)
    checked = 0
    for t in g.tensors.values():
        if t.qtype != T.F16 or len(t.shape) != 2:
            continue
        unit = nk.get(t.qtype)
        w = unit.prepare(t.data)
        n, k = t.shape
        ref = t.dequantize().astype(np.float64)
        x = np.random.default_rng(checked).standard_normal(k).astype(np.float32)
        y = np.zeros(n, np.float32)
        unit.matvec(w, x, y, 0, n)
        assert nmse(y, ref @ x) < 1e-9, t.name
        checked += 1
    assert checked > 0
