"""KV cache types (numallm.cache_types, numallm.kvcache): what is stored, the bytes every report
shows, the flags. The numerics against llama.cpp and a float64 forward with the same rounding are
in test_llamacpp_parity.py; the kernels against a float64 attention in test_fused_ops.py."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as GT, quants

import numallm
from numallm import kvcache, synth
from numallm.cache_types import CACHE_TYPES, DEFAULT_CACHE_TYPE
from numallm.errors import OptionError
from numallm.gguf_file import GGUFFile
from numallm.placement import ModelSpec, Request, make_plan
from test_bad_input import assert_one_line, cli


def _values(rng, shape):
    x = (rng.standard_normal(shape) * rng.choice([1e-6, 1.0, 300.0], size=shape)).astype(np.float32)
    x[0, 0, :3] = (0.0, 6e-8, 7e4)        # zero, an f16 subnormal, past the f16 range (inf)
    return x


def test_default_is_f16():
    assert DEFAULT_CACHE_TYPE == "f16" and set(CACHE_TYPES) == {"f32", "f16", "q8_0"}


def test_f16_store_is_numpys_round_to_nearest_even():
    x = _values(np.random.default_rng(0), (5, 3, 64))
    c = kvcache.KVCache(8, 3, 64, type_k="f16", type_v="f32")
    c.store(x, x, 2)
    with np.errstate(over="ignore"):
        want = x.transpose(1, 0, 2).astype(np.float16)
    assert np.array_equal(c.k.a[:, 2:7], want.view(np.uint16))
    assert np.array_equal(c.k.rows(7)[:, 2:], want.astype(np.float32))
    assert np.array_equal(c.v.rows(7)[:, 2:], x.transpose(1, 0, 2))           # f32: as given
    assert c.n == 7 and not c.k.a[:, :2].any()


def test_q8_0_store_is_ggmls_block():
    """Codes and f16 scales equal gguf-py's Q8_0 quantizer (GGML's block_q8_0), byte for byte."""
    x = _values(np.random.default_rng(1), (4, 2, 96))
    x[1, 1, 32:64] = 0.0                                                         # an all-zero block
    c = kvcache.KVCache(6, 2, 96, type_k="q8_0", type_v="q8_0")
    c.store(x, x, 1)
    blocks = quants.quantize(x.transpose(1, 0, 2).reshape(-1, 96), GT.Q8_0).reshape(2, 4, 3, 34)
    assert np.array_equal(c.k.d[:, 1:5], blocks[..., :2].copy().view(np.uint16)[..., 0])
    assert np.array_equal(c.k.a[:, 1:5].reshape(2, 4, 3, 32), blocks[..., 2:].view(np.int8))
    want = quants.dequantize(blocks.reshape(-1, 34), GT.Q8_0).reshape(2, 4, 96)
    assert np.array_equal(c.k.rows(5)[:, 1:], want)
    assert c.nbytes == 2 * (2 * 6 * 96 + 2 * 6 * 3 * 2)                         # 34 bytes per 32


def test_bad_types_are_one_line_errors(synth_dir):
    with pytest.raises(OptionError, match="cache_type_k 'q4_0' is not a KV cache type; use one of f32, f16, q8_0"):
        numallm.load("unused.gguf", cache_type_k="q4_0")
    with pytest.raises(OptionError, match="--cache-type-v"):
        Request(cache_type_v="F16")
    with pytest.raises(ValueError):
        kvcache.KVCache(4, 1, 48, type_k="q8_0")                                 # 48: not whole blocks


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_bytes_follow_the_type_everywhere(synth_dir, arch):
    """The formula, the plan and the allocated caches agree for every type; f16 is half of f32,
    q8_0 34/128 of it."""
    path = synth.cached_model(synth_dir, arch=arch, qtype="Q8_0", shape="tiny", seed=3)
    spec = ModelSpec.from_gguf(GGUFFile(path))
    a = spec.args
    f32 = a.kv_bytes(100, "f32")
    assert a.kv_bytes(100) == a.kv_bytes(100, "f16") == f32 // 2
    assert a.kv_bytes(100, "q8_0") * 128 == f32 * 34
    assert a.kv_bytes(100, "q8_0", "f32") == a.kv_bytes(100, "q8_0") // 2 + f32 // 2   # K q8_0, V f32
    from numallm.models import get_module
    model = get_module(arch).Model(GGUFFile(path))
    for tk, tv in (("f32", "f32"), ("f16", "f16"), ("q8_0", "f16"), ("q8_0", "q8_0")):
        plan = make_plan(spec, None, Request(numa="off", n_ctx=100, cache_type_k=tk, cache_type_v=tv, n_seq=2))
        assert plan.kv_bytes == 2 * a.kv_bytes(100, tk, tv)
        assert sum(c.nbytes for c in model.new_cache(100, tk, tv)) == a.kv_bytes(100, tk, tv)


def test_greedy_text_is_kept_by_every_type(synth_dir):
    """Each cache type decodes the f32 cache's greedy tokens (a tiny random model with clear
    winners; the logits within each type's rounding)."""
    path = synth.cached_model(synth_dir, arch="llama", qtype="F16", shape="tiny", seed=7)
    prompt = [1, 50, 300, 7, 99, 12]
    runs = {}
    for t in ("f32", "f16", "q8_0"):
        with numallm.load(path, n_ctx=64, cache_type_k=t, cache_type_v=t) as llm:
            runs[t] = llm.generate(prompt, max_tokens=12, temperature=0).tokens
    assert runs["f16"] == runs["f32"] and runs["q8_0"] == runs["f32"]


def _cli_json(*args):
    r = subprocess.run([sys.executable, "-m", "numallm", *args], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_info_and_plan_show_the_halved_memory(synth_dir):
    path = str(synth.cached_model(synth_dir, arch="llama", qtype="Q4_0", shape="tiny", seed=3))
    f32 = _cli_json("info", path, "-c", "256", "--json", "-ctk", "f32", "-ctv", "f32")
    f16 = _cli_json("info", path, "-c", "256", "--json")
    q8 = _cli_json("info", path, "-c", "256", "--json", "--cache-type-k", "q8_0", "--cache-type-v", "q8_0")
    assert f16["kv_cache_bytes"] * 2 == f32["kv_cache_bytes"] > 0
    assert q8["kv_cache_bytes"] * 128 == f32["kv_cache_bytes"] * 34
    assert f16["cache_label"] == "f16" and f32["total_bytes"] - f16["total_bytes"] == f16["kv_cache_bytes"]
    r = subprocess.run([sys.executable, "-m", "numallm", "info", path, "-c", "256", "-ctk", "q8_0"],
                       capture_output=True, text=True, timeout=120)
    assert "(K q8_0, V f16, 256 tokens" in r.stdout, r.stdout
    plan = _cli_json("plan", path, "-c", "256", "--json", "--numa", "off", "-ctk", "q8_0")["placement"]
    assert plan["cache_type_k"] == "q8_0" and plan["cache_type_v"] == "f16"


@pytest.mark.parametrize("verb", ["run", "info", "plan", "bench", "serve"])
def test_bad_flag_value_is_one_line(synth_dir, verb):
    path = str(synth.cached_model(synth_dir, arch="llama", qtype="Q4_0", shape="tiny", seed=3))
    extra = ["hi"] if verb == "run" else []
    err = assert_one_line(cli(verb, path, *extra, "-ctv", "q4_1"), "--cache-type-v 'q4_1'",
                          "f32, f16, q8_0")
    assert err.startswith("numallm: error:")


def test_q8_0_needs_whole_blocks_per_head():
    """stories260K's heads of 8 values cannot hold q8_0 blocks of 32: one line before loading."""
    path = Path(__file__).resolve().parents[1].parent / "shared" / "models" / "stories260K.gguf"
    if not path.exists():
        pytest.skip("../shared/models/stories260K.gguf is absent")
    assert_one_line(cli("run", str(path), "hi", "-ctk", "q8_0"), "--cache-type-k q8_0",
                    "blocks of 32", "holds 8", "use f16 or f32")
    with numallm.load(str(path)) as llm:           # the default type fits any head size
        assert llm.loaded.plan.cache_types == ("f16", "f16")


def test_llama_compat_takes_llama_cpp_type_k_type_v(synth_dir):
    """numallm.Llama reads llama-cpp-python's type_k / type_v (ggml type numbers)."""
    path = str(synth.cached_model(synth_dir, arch="llama", qtype="Q4_0", shape="tiny", seed=3))
    llm = numallm.Llama(path, n_ctx=64, type_k=8, type_v=0, verbose=False)
    assert llm._loaded.plan.cache_types == ("q8_0", "f32")
    assert numallm.Llama(path, n_ctx=64, verbose=False)._loaded.plan.cache_types == ("f16", "f16")
    with pytest.raises(OptionError, match="type_v=2"):
        numallm.Llama(path, n_ctx=64, type_v=2, verbose=False)


def test_half_conversions_without_f16c_match_numpy():
    """The integer half conversions a generic target (NUMBA_CPU_NAME=generic: no F16C, where LLVM
    would call a runtime library Numba does not link) uses: every half, and float32s around
    every rounding boundary, as numpy converts them."""
    from numallm_kernels import kvcache as kv

    h = np.arange(65536, dtype=np.uint16)
    ref = h.view(np.float16).astype(np.float32)
    got = np.array([kv._sw_f16_to_f32(np.uint16(x)) for x in h], dtype=np.float32)
    assert np.all((got.view(np.uint32) == ref.view(np.uint32)) | (np.isnan(got) & np.isnan(ref)))
    rng = np.random.default_rng(0)
    bits = np.concatenate([
        rng.integers(0, 2 ** 32, 20000, dtype=np.uint64).astype(np.uint32),
        np.arange(0x33000000 - 4, 0x33000000 + 4, dtype=np.uint32),      # 2**-25: rounds to 0
        np.arange(0x387FE000 - 2, 0x38800000 + 2, dtype=np.uint32),      # subnormal -> normal
        rng.integers(0x33000000, 0x38800000, 2000, dtype=np.uint64).astype(np.uint32),
        np.arange(0x477FF000 - 4, 0x477FF000 + 4, dtype=np.uint32),      # 65520: rounds to inf
        np.array([0, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000], np.uint32)])
    x = bits.view(np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        ref16 = x.astype(np.float16)
    got16 = np.array([kv._sw_f32_to_f16(np.float32(v)) for v in x], dtype=np.uint16)
    nan = np.isnan(x)
    assert np.array_equal(got16[~nan], ref16.view(np.uint16)[~nan])
    assert np.all(np.isnan(got16[nan].view(np.float16)))
