"""The token tiles (variant avx512vnni-t16: `kernels/_iq_tile.py` for the IQ and ternary types,
`kernels/_q6_tile.py` for Q6_K's records): 16 tokens in the lanes of a zmm, 4 rows per
activation load.

Their only approximation is x's int8 encoding (as the decode kernels'); their float order is their
own (one exact int32 sum per block and row), so they are checked against the float64 product with
the decoded codes, and against themselves: any token of a T-token call equals that token alone,
bit for bit, whatever T, the token's tile and lane, and the row range (IQ rows go 4 at a time,
then one by one; Q6_K in halves of its 8-row groups).
"""
from __future__ import annotations

import numpy as np
import pytest

import numallm_kernels as nk
from numallm_kernels._iq_tile import FEATURES
from numallm_kernels._kquant_common import q8_k_form
from numallm_kernels._simd import has_avx2, host_features
from numallm.gguf_file import GGMLQuantizationType as T
from numallm.gguf_file import reference_dequantize

TYPES = [T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ3_XXS, T.IQ3_S, T.IQ1_S, T.IQ1_M, T.TQ1_0, T.TQ2_0,
         T.Q6_K]
ids = [t.name for t in TYPES]
TILE16 = "avx512vnni-t16"
HAS = has_avx2() and set(FEATURES) <= host_features()


def unit_with_tiles(qtype):
    unit = nk.get(qtype)
    if not HAS:
        assert TILE16 not in unit.variants()
        pytest.skip("this CPU has no AVX-512 F/BW/VL/VNNI")
    assert TILE16 in unit.variants()
    return unit


def nmse(got, want):
    return float(np.sum((got.astype(np.float64) - want) ** 2) / np.sum(want ** 2))


@pytest.mark.parametrize("qtype", TYPES, ids=ids)
def test_exact_on_the_quantized_activations(qtype):
    """Against the float64 product of the exact weights with x's decoded int8 codes: float32
    rounding only (a wrong weight, scale or correction term gives NMSE ~ 1e-3 or more), for T
    within one tile, a whole tile, and past it; rows outside the range untouched."""
    unit = unit_with_tiles(qtype)
    n, k = 23, 1024
    raw = unit.synthetic(n, k, np.random.default_rng(1))
    w = unit.prepare(raw)
    ref = reference_dequantize(raw, qtype).reshape(n, -1).astype(np.float64)
    r0, r1 = 2, n - 1       # IQ: 5 groups of 4 rows and one alone; Q6_K: groups cut at both ends
    for t in (1, 2, 5, 16, 17, 33):
        x = np.random.default_rng(t).standard_normal((t, k)).astype(np.float32)
        xq, xd, _ = q8_k_form(x)
        xdec = (xq.reshape(t, -1, 256).astype(np.float64) * xd[:, :, None]).reshape(t, k)
        want = xdec @ ref.T
        out = np.full((t, n), -7.0, np.float32)
        unit.run(TILE16, w, x, out, r0, r1)
        assert nmse(out[:, r0:r1], want[:, r0:r1]) < 1e-10, t
        assert np.all(out[:, :r0] == -7.0) and np.all(out[:, r1:] == -7.0)


@pytest.mark.parametrize("qtype", TYPES, ids=ids)
def test_each_token_alone_gives_the_same_bits(qtype):
    unit = unit_with_tiles(qtype)
    n, k = 29, 512
    w = unit.prepare(unit.synthetic(n, k, np.random.default_rng(2)))
    x = np.random.default_rng(3).standard_normal((35, k)).astype(np.float32)
    one = np.zeros((35, n), np.float32)
    for t in range(35):
        unit.run(TILE16, w, x[t:t + 1], one[t:t + 1], 0, n)
    for r0, r1 in ((0, n), (3, 18), (5, 6), (1, 28)):
        for t in (2, 16, 19, 35):
            many = np.zeros((t, n), np.float32)
            unit.run(TILE16, w, x[:t], many, r0, r1)
            np.testing.assert_array_equal(many[:, r0:r1].view(np.uint32),
                                          one[:t, r0:r1].view(np.uint32),
                                          err_msg=f"T={t} rows {r0}..{r1}")


@pytest.mark.parametrize("qtype", [T.IQ2_XXS, T.IQ1_S, T.TQ2_0, T.Q6_K], ids=lambda q: q.name)
def test_special_inputs(qtype):
    """Zero input gives zeros; a non-finite input shows in its token's outputs only."""
    unit = unit_with_tiles(qtype)
    n, k = 6, 512
    w = unit.prepare(unit.synthetic(n, k, np.random.default_rng(4)))
    x = np.random.default_rng(5).standard_normal((3, k)).astype(np.float32)
    x[0] = 0.0
    x[1, 300] = np.nan
    out = np.full((3, n), 5.0, np.float32)
    unit.run(TILE16, w, x, out, 0, n)
    np.testing.assert_array_equal(out[0], 0.0)
    assert np.all(np.isnan(out[1])) and np.all(np.isfinite(out[2]))


@pytest.mark.parametrize("qtype", [T.IQ2_XXS, T.Q6_K], ids=lambda q: q.name)
def test_tile_is_broadcast_vpdpbusd_on_zmm(qtype):
    """The tile's inner product is vpdpbusd on zmm with the weights as a {1to16} broadcast
    operand (no scalar fallback, no per-quad broadcast instruction)."""
    import re

    from numba import typeof

    from numallm_kernels.base import fresh_asm
    unit = unit_with_tiles(qtype)
    kern = unit._mm[TILE16] if qtype == T.Q6_K else unit._kernels[TILE16]
    w = unit.prepare(unit.synthetic(8, 256, np.random.default_rng(0)))
    q = w.q if qtype == T.Q6_K else w
    xq, xd, xb = q8_k_form(np.zeros((1, 256), np.float32))
    args = tuple(typeof(a) for a in (q, xq, xd, xb, np.zeros((1, 8), np.float32), 0, 1, 0))
    asm = fresh_asm(kern, args)
    found = re.findall(r"vpdpbusd\s+[^\n]*\{1to16\}[^\n]*%zmm", asm)
    assert len(found) >= 16, len(found)
