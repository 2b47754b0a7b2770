"""The hot decode kernels compile to vector code (ymm/zmm registers with packed operations).

Speed itself is measured in benchmarks/bench_kernels.py; this only guards against a change that
silently turns a kernel scalar (e.g. a type promotion that defeats vectorization). Units expose
their hot kernels through `KernelUnit.hot_kernels()`; types whose unit is missing or exposes none
are skipped, except the quantized types (the 8-row record types and the IQ codebook types), which
must have one on an AVX2 machine.
"""
from __future__ import annotations

import re

import pytest

import numallm_kernels as nk
from numallm.gguf_file import GGMLQuantizationType as T
from numallm_kernels import _simd
from numallm_kernels._iq512_simd import FEATURES as IQ512_FEATURES
from numallm_kernels.base import fresh_asm, hot_kernels

IQ = [T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ3_XXS, T.IQ3_S, T.IQ1_S, T.IQ1_M, T.TQ1_0, T.TQ2_0]
REQUIRED = {T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.IQ4_NL, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K,
            T.Q6_K, T.IQ4_XS, *IQ}
# packed integer dot steps and packed float multiply-adds: the work of a vectorized block dot
PACKED = re.compile(r"^\s*(vpmaddubsw|vpmaddwd|vpdpbusd|vpdpwssd|vfmadd\w*ps|vpmulld|vmulps)"
                    r"\s[^\n]*%[yz]mm", re.M)


@pytest.mark.parametrize("qt", [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.IQ4_NL, T.F16, T.Q2_K,
                                T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.IQ4_XS, *IQ],
                         ids=lambda q: q.name)
def test_hot_decode_kernel_is_vector_code(qt):
    if not _simd.has_avx2():
        pytest.skip("CPU lacks AVX2")
    if qt not in nk.registered_types():
        pytest.skip(f"no unit registered for {qt.name}")
    kernels = hot_kernels(qt)
    if not kernels:
        assert qt not in REQUIRED, f"{qt.name} exposes no hot kernel"
        pytest.skip(f"{qt.name} unit exposes no hot kernels")
    for dispatcher, argtypes in kernels:
        asm = fresh_asm(dispatcher, argtypes)
        ops = PACKED.findall(asm)
        assert len(ops) >= 4, f"{dispatcher.__name__}: only {ops} packed ops on ymm/zmm"
        if qt in REQUIRED:  # the int8 block dot must be the vpmaddubsw/vpmaddwd pair (or VNNI)
            # (with AVX512-VNNI, LLVM fuses a vpmaddwd and its vpaddd into vpdpwssd)
            pair = "vpmaddubsw" in ops and bool({"vpmaddwd", "vpdpwssd"} & set(ops))
            assert pair or "vpdpbusd" in ops, sorted(set(ops))


VNNI_TYPES = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.IQ4_NL, T.Q4_K, T.Q5_K, T.Q6_K]


@pytest.mark.parametrize("qt", VNNI_TYPES, ids=lambda q: q.name)
def test_vnni_kernel_uses_vpdpbusd(qt):
    """Where the CPU has AVX512-VNNI (+VL), the avx512vnni-x8 kernel is offered, listed first
    among the hot kernels, and its block dot is vpdpbusd (the activation broadcast folded in as
    {1to8}), with no vpmaddubsw left; elsewhere it is neither offered nor compiled."""
    unit = nk.get(qt)
    if not _simd.has_vnni():
        assert "avx512vnni-x8" not in unit.variants()
        pytest.skip("CPU lacks AVX512-VNNI/VL")
    assert unit.variants()[0] == "avx512vnni-x8"
    dispatcher, argtypes = hot_kernels(qt)[0]
    asm = fresh_asm(dispatcher, argtypes)
    dots = re.findall(r"^\s*vpdpbusd\s[^\n]*", asm, re.M)
    assert len(dots) >= 8 and all("ymm" in d for d in dots), dots[:4]
    assert any("{1to8}" in d for d in dots)
    assert "vpmaddubsw" not in asm


@pytest.mark.parametrize("qt", [T.Q4_0, T.Q8_0, T.Q4_K, T.Q5_K, T.Q6_K],
                         ids=lambda q: q.name)
def test_wide_token_tiles_use_zmm_vpdpbusd(qt):
    """Where the CPU has AVX512-VNNI and -BW, the avx512vnni-x16 variant's token tiles run
    vpdpbusd on zmm registers (16 rows) with the activations broadcast {1to16} from memory."""
    unit = nk.get(qt)
    if not (_simd.has_vnni() and "avx512bw" in _simd.host_features()):
        assert "avx512vnni-x16" not in unit.variants()
        pytest.skip("CPU lacks AVX512-VNNI/VL/BW")
    tiles = unit._mm["avx512vnni-x16"].py_func.__globals__["GROUPS"]
    argtypes = next(a for k, a in unit.hot_kernels() if k is tiles)
    dots = re.findall(r"^\s*vpdpbusd\s[^\n]*", fresh_asm(tiles, argtypes), re.M)
    wide = [d for d in dots if "zmm" in d]
    assert len(wide) >= 64 and any("{1to16}" in d for d in wide), dots[:4]


# the in-register grid lookup of each avx512-iq type (`_iq512_lut`, `_iq512_iq1`)
IQ512_LOOKUP = {**{t: r"vperm[it]2w" for t in (T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ3_XXS, T.IQ3_S)},
                T.IQ1_S: r"vpgatherdq", T.IQ1_M: r"vpgatherdq"}


@pytest.mark.parametrize("qt", IQ, ids=lambda q: q.name)
def test_avx512_iq_kernel_uses_zmm(qt):
    """Where the CPU has AVX-512 F/BW/VL/VBMI, the avx512-iq kernel is offered, listed first
    among the hot kernels, and dots 64 weights per step on zmm registers (vpmaddubsw, then
    vpmaddwd or its fused vpdpwssd) with the signs applied by a k-mask, not vpsignb; elsewhere
    it is neither offered nor compiled."""
    unit = nk.get(qt)
    if not (_simd.has_avx2() and set(IQ512_FEATURES) <= _simd.host_features()):
        assert "avx512-iq" not in unit.variants()
        pytest.skip("CPU lacks AVX-512 F/BW/VL/VBMI")
    assert unit.variants()[0] == "avx512-iq"
    dispatcher, argtypes = hot_kernels(qt)[0]
    asm = fresh_asm(dispatcher, argtypes)
    zmm = lambda op: re.findall(rf"^\s*{op}\s[^\n]*%zmm", asm, re.M)  # noqa: E731
    assert len(zmm("vpmaddubsw")) >= 4, "no zmm vpmaddubsw"
    assert len(zmm("vpmaddwd") + zmm("vpdpwssd")) >= 4
    assert re.search(r"^\s*vpsubb\s[^\n]*%zmm\d+\s*\{%k\d\}", asm, re.M), "no masked vpsubb"
    if qt != T.TQ1_0:   # TQ1_0's step decodes its digits with avx2-iq's (|w| by vpsignb)
        assert "vpsignb" not in asm
    if qt in IQ512_LOOKUP:
        assert re.search(rf"^\s*{IQ512_LOOKUP[qt]}\s[^\n]*%zmm", asm, re.M), IQ512_LOOKUP[qt]
