"""DeepSeek-V2/V3 (`deepseek2`) on synthetic files (numallm.synth_deepseek), and YaRN RoPE.

Logits against llama.cpp at every position of 64 tokens, held to test_llamacpp_parity's bounds:
  tiny-v2-lite: no q_lora, softmax routing (not renormalised, scale 1), 2 shared experts,
                1 dense leading layer, attn_kv_b; hidden 256, 2 layers, 4 heads, kv_lora 128,
                nope 32 + rope 32, v 32, 8 experts top-2
  tiny-v3:      q_lora 128, sigmoid routing + exp_probs_b in 4 groups (2 used), renormalised,
                scaled 2.5, 1 shared expert, YaRN (factor 4 over an original context of 32, so
                64 positions feel it; yarn_log_multiplier 0.1), 3 layers, 16 experts top-4
llama.cpp runs attn_kv_b files as plain multi-head attention over decompressed K/V; numallm
attends in the latent space, so agreement also checks the absorption. Measured (llama.cpp
0.3.36, seed 0): v2-lite F16 NMSE 8.9e-7, v3 F16 1.6e-6, v2-lite Q8_0 7.4e-4. The seed is fixed
and its F16 routings agree (argmax at every decisive position); a V3 Q8_0 file of these sizes
flips near-tied sigmoid routings with 8-bit activations (position 5 of seed 0), so Q8_0 runs on
the softmax config only (see tests/test_moe.py for the routing-margin approach).
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from numallm import ops, synth, synth_deepseek
from numallm.gguf_file import GGUFFile
from numallm.models import deepseek2, get_module

from test_llamacpp_parity import N_TOKENS, check, compare, llamacpp_logits

CASES = [("tiny-v2-lite", "F16"), ("tiny-v3", "F16"), ("tiny-v2-lite", "Q8_0")]
YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}


@pytest.fixture(scope="module")
def tokens() -> list[int]:
    rng = np.random.default_rng(1234)
    return [int(t) for t in rng.integers(0, 512, N_TOKENS)]


def _numallm(path, tokens) -> np.ndarray:
    from numallm import load

    return np.asarray(load(path).logits(tokens))


@pytest.mark.llamacpp
@pytest.mark.parametrize("shape,qtype", CASES, ids=[f"{s}-{q}" for s, q in CASES])
def test_deepseek2_matches_llamacpp(shape, qtype, synth_dir, tokens):
    pytest.importorskip("llama_cpp")
    path = synth_deepseek.cached_deepseek(synth_dir, qtype, shape, seed=0)
    ref = llamacpp_logits(path, tokens)
    assert ref.std() > 1.0 and np.all(np.isfinite(ref))
    fig = compare(_numallm(path, tokens), ref)
    print("\n" + fig.line("numallm", f"deepseek2-{shape}-{qtype}"))
    check(fig, qtype, "numallm", f"deepseek2-{shape}-{qtype}")
    assert fig.decisive >= N_TOKENS // 2


@pytest.mark.llamacpp
def test_bounds_catch_deepseek_bugs(synth_dir, tokens, monkeypatch):
    """The comparison can fail: V3 without YaRN's score scale, or routing that ignores the
    selection bias, lands far over the F16 bound."""
    pytest.importorskip("llama_cpp")
    path = synth_deepseek.cached_deepseek(synth_dir, "F16", "tiny-v3", seed=0)
    ref = llamacpp_logits(path, tokens)
    with monkeypatch.context() as m:
        m.setattr(deepseek2.ModelArgs, "kq_scale", property(lambda a: 1 / math.sqrt(a.head_dim)))
        assert compare(_numallm(path, tokens), ref).nmse > 1e-4
    route = ops.moe_route
    with monkeypatch.context() as m:
        m.setattr(ops, "moe_route", lambda *args, **kw: route(*args, **{**kw, "bias": None}))
        assert compare(_numallm(path, tokens), ref).nmse > 1e-4


@pytest.mark.llamacpp
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_yarn_dense_matches_llamacpp(arch, synth_dir, tokens):
    pytest.importorskip("llama_cpp")
    path = synth.cached_model(synth_dir, arch=arch, qtype="F16", shape="tiny", seed=7, rope_scaling=YARN)
    ref = llamacpp_logits(path, tokens)
    fig = compare(_numallm(path, tokens), ref)
    print("\n" + fig.line("numallm", f"{arch}-F16-yarn"))
    check(fig, "F16", "numallm", f"{arch}-F16-yarn")
    # YaRN is visible: the same weights without it are far off
    plain = synth.cached_model(synth_dir, arch=arch, qtype="F16", shape="tiny", seed=7)
    assert compare(_numallm(plain, tokens), ref).nmse > 1e-3


def test_yarn_rope_tables():
    """ggml's ramp: pairs below corr_dims[0] keep theta, above corr_dims[1] get theta/factor,
    and cos/sin carry mscale."""
    lo, hi = ops.yarn_corr_dims(32, 32, 10000.0, 32.0, 1.0)
    assert (lo, hi) == (0.0, 3.0)
    r = ops.Rope(32, 10000.0, False, 0.25, ext_factor=1.0, corr_dims=(lo, hi), mscale=1.5)
    assert r.pos_scale[0] == 1.0 and np.all(r.pos_scale[3:] == 0.25)
    assert 0.25 < r.pos_scale[1] < 1.0
    cos, sin = r.tables(4)
    np.testing.assert_allclose(cos[:, 0] ** 2 + sin[:, 0] ** 2, 1.5 ** 2, rtol=1e-6)


@pytest.mark.parametrize("shape", ["tiny-v2-lite", "tiny-v3"])
def test_decode_equals_prefill(shape, synth_dir):
    """Token-by-token decode (the fused one-query attention over the latent cache) gives the
    one-chunk prefill's logits (the batched path). F16: both exact in float32."""
    path = synth_deepseek.cached_deepseek(synth_dir, "F16", shape, seed=0)
    model = get_module("deepseek2").Model(GGUFFile(path))
    toks = np.random.default_rng(5).integers(0, 512, 24)
    full = model(toks, model.new_cache(32), 0, last_only=False)
    cache = model.new_cache(32)
    steps = np.concatenate([model(toks[i:i + 1], cache, i) for i in range(len(toks))])
    np.testing.assert_allclose(steps, full, rtol=0, atol=1e-4 * np.abs(full).max())


def test_latent_kv_bytes(synth_dir):
    """The cache holds kv_lora_rank + rope_dim values per token per layer in the key cache type
    (f16 by default), and info/plan say so."""
    from numallm.commands.info import describe

    path = synth_deepseek.cached_deepseek(synth_dir, "F16", "tiny-v3", seed=0)
    a = get_module("deepseek2").Model.Args.from_gguf(GGUFFile(path))
    assert a.kv_bytes_per_token("f32") == 3 * (128 + 32) * 4
    assert a.kv_bytes_per_token() == a.kv_bytes_per_token("f16", "f32") == 3 * (128 + 32) * 2
    assert a.kv_bytes_per_token("q8_0") == 3 * (128 + 32) // 32 * 34
    d = describe(str(path), 256)
    assert d["kv_bytes_per_token"] == 960 and d["kv_cache_bytes"] == 960 * 256
    model = get_module("deepseek2").Model(GGUFFile(path))
    assert sum(c.nbytes for c in model.new_cache(256)) == 960 * 256
    assert sum(c.nbytes for c in model.new_cache(256, "q8_0", "f32")) == 510 * 256


def test_shard_refuses_mla(synth_dir):
    """NUMA shard cannot split MLA heads yet: one clear line, exit 1 (placement refuses the
    unknown split unit)."""
    import subprocess
    import sys

    path = synth_deepseek.cached_deepseek(synth_dir, "F16", "tiny-v2-lite", seed=0)
    r = subprocess.run([sys.executable, "-m", "numallm", "run", str(path), "hi", "-n", "2",
                        "--numa", "shard", "--virtual-nodes", "2"], capture_output=True, text=True,
                       timeout=300)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and "cannot split by 'mla_heads'" in lines[0], r.stderr
