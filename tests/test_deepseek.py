"""DeepSeek-V2/V3 (`deepseek2`) on synthetic files (numallm.synth_deepseek), and YaRN RoPE.

Logits against llama.cpp at every position of 64 tokens, held to test_llamacpp_parity's bounds:
  tiny-v2-lite: no q_lora, softmax routing (not renormalised, scale 1), 2 shared experts,
                1 dense leading layer, attn_kv_b; hidden 256, 2 layers, 4 heads, kv_lora 128,
                nope 32 + rope 32, v 32, 8 experts top-2
  tiny-v3:      q_lora 128, sigmoid routing + exp_probs_b in 4 groups (2 used), renormalised,
                scaled 2.5, 1 shared expert, YaRN (factor 4 over an original context of 32, so
                64 positions feel it; yarn_log_multiplier 0.1), 3 layers, 16 experts top-4
  *-kb:         the same models in the split attn_k_b / attn_v_b layout (newer converters;
                llama.cpp then attends in the latent space too)
llama.cpp runs attn_kv_b files as plain multi-head attention over decompressed K/V; numallm
attends in the latent space, so agreement also checks the absorption. numallm's absorbed
products run on the quantized kernels (the key half of attn_kv_b transposed once at load, as
Q8_0 for quantized files). Measured (llama.cpp 0.3.36, seed 0): v2-lite F16 NMSE 8.9e-7, v3 F16
1.6e-6, v3-kb F16 1.5e-6, v2-lite Q8_0 9.9e-4, v2-lite-kb Q8_0 8.1e-4. The seed is fixed
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

CASES = [("tiny-v2-lite", "F16"), ("tiny-v3", "F16"), ("tiny-v2-lite", "Q8_0"), ("tiny-v3-kb", "F16"),
         ("tiny-v2-lite-kb", "Q8_0")]
YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}


@pytest.fixture(scope="module")
def tokens() -> list[int]:
    rng = np.random.default_rng(1234)
    return [int(t) for t in rng.integers(0, 512, N_TOKENS)]


def _numallm(path, tokens, **options) -> np.ndarray:
    from numallm import load

    return np.asarray(load(path, **options).logits(tokens))


# Q8_0 files run both engines with float32 KV caches: their MoE routing has near-ties that the
# caches' f16 rounding (different in each engine's order of operations) can tip, which moves
# whole positions; the f16 cache's parity is the F16 cases' (and tests/test_kv_cache.py's)
F32_CACHE = {"Q8_0": ({"cache_type_k": "f32", "cache_type_v": "f32"}, {"type_k": 0, "type_v": 0})}


@pytest.mark.llamacpp
@pytest.mark.parametrize("shape,qtype", CASES, ids=[f"{s}-{q}" for s, q in CASES])
def test_deepseek2_matches_llamacpp(shape, qtype, synth_dir, tokens):
    pytest.importorskip("llama_cpp")
    path = synth_deepseek.cached_deepseek(synth_dir, qtype, shape, seed=0)
    ours, theirs = F32_CACHE.get(qtype, ({}, {}))
    ref = llamacpp_logits(path, tokens, **theirs)
    assert ref.std() > 1.0 and np.all(np.isfinite(ref))
    fig = compare(_numallm(path, tokens, **ours), ref)
    print("\n" + fig.line("numallm", f"deepseek2-{shape}-{qtype}"))
    check(fig, qtype, "numallm", f"deepseek2-{shape}-{qtype}")
    assert fig.decisive >= N_TOKENS // 2


# V3 routing with Q8_0: selection scores (sigmoid + bias, in groups) closer than this at a
# position may pick other experts under either engine's 8-bit activations (router logits move
# by up to ~0.1, a sigmoid by up to ~0.025)
V3_ROUTE_MARGIN = 0.05


def _selection_margin(logits, k, bias, groups) -> np.ndarray:
    """(T,) the smaller of the gap between the last kept and the first dropped group score and
    the gap between the k-th and (k+1)-th expert score inside the kept groups."""
    n_group, n_used = groups
    sel = 1 / (1 + np.exp(-logits.astype(np.float64))) + bias
    score = np.sort(sel.reshape(len(sel), n_group, -1), -1)[..., -2:].sum(-1)       # (T, groups)
    gs = np.sort(score, -1)
    g_gap = gs[:, -n_used] - gs[:, -n_used - 1]
    kept = np.argsort(-score, -1)[:, :n_used]
    inside = np.take_along_axis(sel.reshape(len(sel), n_group, -1), kept[..., None], 1).reshape(len(sel), -1)
    es = np.sort(inside, -1)
    return np.minimum(g_gap, es[:, -k] - es[:, -k - 1])


@pytest.mark.llamacpp
def test_v3_q8_0_matches_llamacpp(synth_dir, tokens, monkeypatch):
    """V3's full routing (q_lora, sigmoid + bias in groups, renormalised and scaled, YaRN) with
    Q8_0 weights, one MoE layer: the positions whose routing is decisive by V3_ROUTE_MARGIN (at
    least half) against llama.cpp, to the Q8_0 bound."""
    pytest.importorskip("llama_cpp")
    from numallm import load

    path = synth_deepseek.cached_deepseek(synth_dir, "Q8_0", "tiny-v3-1layer", seed=0)
    margins = []
    route = ops.moe_route

    def spy(logits, k, renorm, **kw):
        margins.append(_selection_margin(logits, k, kw["bias"], kw["groups"]))
        return route(logits, k, renorm, **kw)
    monkeypatch.setattr(ops, "moe_route", spy)
    got = np.asarray(load(path).logits(tokens))
    assert len(margins) == 1
    keep = margins[0] > V3_ROUTE_MARGIN                                          # (T,)
    assert keep.mean() >= 0.5, f"only {keep.sum()} decisive positions"
    ref = llamacpp_logits(path, tokens)[keep]
    assert ref.std() > 1.0 and np.all(np.isfinite(ref))
    fig = compare(got[keep], ref)
    case = f"deepseek2-tiny-v3-1layer-Q8_0 ({keep.sum()} pos)"
    print("\n" + fig.line("numallm", case))
    check(fig, "Q8_0", "numallm", case)
    assert fig.decisive >= keep.sum() // 2


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


@pytest.mark.parametrize("shape", ["tiny-v2-lite", "tiny-v2-lite-kb"])
def test_absorbed_matrices_stay_quantized(shape, synth_dir):
    """The absorbed per-head products are kernel operands in the file's encoding (Q8_0 here):
    a layer holds as many bytes for them as the file's attn_kv_b (or attn_k_b + attn_v_b), and
    no float32 copy of them."""
    from numallm.gguf_file import GGMLQuantizationType as QT

    path = synth_deepseek.cached_deepseek(synth_dir, "Q8_0", shape, seed=0)
    f = GGUFFile(path)
    model = get_module("deepseek2").Model(f)
    a = model.args
    for i, b in enumerate(model.blk):
        names = deepseek2.ABSORBED[1:] if a.split_kv_b else deepseek2.ABSORBED[:1]
        stored = sum(f.tensors[f"blk.{i}.{n}"].nbytes for n in names)
        assert b.attn_uk.nbytes + b.attn_uv.nbytes == stored
        assert b.attn_uk.qtype == b.attn_uv.qtype == QT.Q8_0
        assert b.attn_uk.shape == (a.n_head, a.n_lora_kv, a.nope_dim)
        assert b.attn_uv.shape == (a.n_head, a.v_head_dim, a.n_lora_kv)
        assert not any(isinstance(v, np.ndarray) and v.size >= a.n_head * a.nope_dim * a.n_lora_kv
                       for v in vars(b).values())


def test_split_kv_b_layout_is_the_same_model(synth_dir):
    """attn_k_b / attn_v_b hold the halves of the same seed's attn_kv_b: F16 logits agree."""
    toks = [3, 99, 250, 7, 400, 64]
    from numallm import load

    a = np.asarray(load(synth_deepseek.cached_deepseek(synth_dir, "F16", "tiny-v3", seed=0)).logits(toks))
    b = np.asarray(load(synth_deepseek.cached_deepseek(synth_dir, "F16", "tiny-v3-kb", seed=0)).logits(toks))
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-4 * np.abs(a).max())


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


@pytest.mark.slow
def test_deepseek_rss_near_file_size(tmp_path):
    """Resident memory after a forward stays near the file's size: with float32 absorbed
    matrices (16 heads x (128 + 128) x 512 per layer) this model would grow by ~60% more."""
    import json
    import subprocess
    import sys

    from test_memory import PROBE, PROBE_ENV

    big = synth_deepseek.DeepseekShape(vocab=4096, hidden=1024, n_layers=4, n_heads=16, n_ff=2048,
                                       kv_lora=512, qk_nope=128, qk_rope=64, v_head=128,
                                       n_expert=8, n_ff_exp=512, n_shared=1)
    path = synth_deepseek.write_deepseek(tmp_path / "big.gguf", "Q8_0", big)
    small = synth_deepseek.write_deepseek(tmp_path / "small.gguf", "Q8_0", "tiny-v2-lite")
    size = path.stat().st_size
    r = subprocess.run([sys.executable, "-c", PROBE, str(path), str(small)], capture_output=True,
                       text=True, timeout=600, env=PROBE_ENV)
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout)
    grown = m["after"] - m["base"] - m["kv"]
    print(f"deepseek2 Q8_0: file {size / 1e6:.1f} MB, RSS growth after a forward {grown / 1e6:.1f} MB")
    assert grown < 1.15 * size + 24e6
