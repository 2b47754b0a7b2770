"""numallm.synth: synthetic GGUFs have the right shapes, metadata, tokenizer and weights."""
from __future__ import annotations

import numpy as np
import pytest

from numallm import llamacpp, synth
from numallm.errors import UnsupportedError
from numallm.gguf_file import GGMLQuantizationType as QT, GGUFFile

TINY = synth.SHAPES["tiny"]


@pytest.fixture(scope="module")
def f16_models(synth_dir):
    return {a: synth.cached_model(synth_dir, arch=a, qtype="F16", seed=3) for a in synth.ARCHS}


def _layer_names(arch: str) -> set[str]:
    names = {"attn_norm.weight", "attn_q.weight", "attn_k.weight", "attn_v.weight",
             "attn_output.weight", "ffn_norm.weight", "ffn_gate.weight", "ffn_up.weight",
             "ffn_down.weight"}
    if arch == "qwen2":
        names |= {"attn_q.bias", "attn_k.bias", "attn_v.bias"}
    if arch == "qwen3":
        names |= {"attn_q_norm.weight", "attn_k_norm.weight"}
    return names


@pytest.mark.parametrize("arch", synth.ARCHS)
def test_metadata_and_tensors(arch, f16_models):
    g = GGUFFile(f16_models[arch])
    md, s = g.metadata, TINY
    assert g.architecture == arch
    expect = {"context_length": s.ctx, "embedding_length": s.hidden, "block_count": s.n_layers,
              "feed_forward_length": s.n_ff, "attention.head_count": s.n_heads,
              "attention.head_count_kv": s.n_kv_heads, "rope.dimension_count": s.hd}
    for key, value in expect.items():
        assert md[f"{arch}.{key}"] == value, key
    assert md[f"{arch}.rope.freq_base"] == pytest.approx(s.rope_base)
    assert md[f"{arch}.attention.layer_norm_rms_epsilon"] == pytest.approx(s.rms_eps)
    assert (f"{arch}.attention.key_length" in md) == (arch == "qwen3")

    layer = {f"blk.{i}.{n}" for i in range(s.n_layers) for n in _layer_names(arch)}
    assert set(g.tensors) == layer | {"token_embd.weight", "output_norm.weight", "output.weight"}
    hd, q, kv = s.hd, s.n_heads * s.hd, s.n_kv_heads * s.hd
    shapes = {"token_embd.weight": (s.vocab, s.hidden), "output.weight": (s.vocab, s.hidden),
              "blk.0.attn_q.weight": (q, s.hidden), "blk.0.attn_k.weight": (kv, s.hidden),
              "blk.0.attn_v.weight": (kv, s.hidden), "blk.0.attn_output.weight": (s.hidden, q),
              "blk.0.ffn_gate.weight": (s.n_ff, s.hidden),
              "blk.0.ffn_up.weight": (s.n_ff, s.hidden),
              "blk.0.ffn_down.weight": (s.hidden, s.n_ff), "blk.0.attn_norm.weight": (s.hidden,)}
    if arch == "qwen2":
        shapes["blk.0.attn_k.bias"] = (kv,)
    if arch == "qwen3":
        shapes["blk.0.attn_q_norm.weight"] = (hd,)
    for name, shape in shapes.items():
        assert g.tensors[name].shape == shape, name
    for name, t in g.tensors.items():  # norms and biases stay F32, matrices take the qtype
        assert t.qtype == (QT.F32 if len(t.shape) == 1 else QT.F16), name


@pytest.mark.parametrize("arch", synth.ARCHS)
def test_bpe_vocab(arch, f16_models):
    md = GGUFFile(f16_models[arch]).metadata
    tokens, types = md["tokenizer.ggml.tokens"], md["tokenizer.ggml.token_type"]
    assert md["tokenizer.ggml.model"] == "gpt2"
    assert md["tokenizer.ggml.pre"] == ("llama-bpe" if arch == "llama" else "qwen2")
    assert len(tokens) == len(types) == TINY.vocab == len(set(tokens))
    merges = md["tokenizer.ggml.merges"]
    assert len(merges) > 50
    known = set(tokens)
    for m in merges:  # every merge joins two existing tokens into an existing token
        a, b = m.split(" ")
        assert a in known and b in known and a + b in known, m
    for key in ("tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id"):
        assert types[md[key]] == 3  # CONTROL
    assert "{% for message in messages %}" in md["tokenizer.chat_template"]


def test_spm_vocab(synth_dir):
    shape = {**vars(TINY), "vocab": 600, "n_layers": 1}
    g = GGUFFile(synth.write_model(synth_dir / "spm.gguf", qtype="F16", shape=shape, vocab="spm"))
    md = g.metadata
    tokens = md["tokenizer.ggml.tokens"]
    assert md["tokenizer.ggml.model"] == "llama"
    assert len(tokens) == len(md["tokenizer.ggml.scores"]) == 600
    assert g.tensors["output.weight"].shape == (600, TINY.hidden)
    assert tokens[:3] == ["<unk>", "<s>", "</s>"] and tokens[3 + 0x41] == "<0x41>"
    assert "\u2581the" in tokens


def test_real_shapes_have_real_parameter_counts():
    # totals published for the real checkpoints (HF safetensors metadata)
    real = {("tinyllama-1.1b", "llama", False): 1_100_048_384,
            ("qwen2.5-0.5b", "qwen2", True): 494_032_768,
            ("llama3-1b", "llama", True): 1_235_814_400,
            ("llama3.2-3b", "llama", True): 3_212_749_824,
            ("qwen3-0.6b", "qwen3", True): 596_049_920}
    for (name, arch, tied), n in real.items():
        specs = synth._tensor_specs(arch, synth.SHAPES[name], tied, False)
        assert sum(int(np.prod(t.shape)) for t in specs) == n, name


def test_weights_are_deterministic_and_shared_across_qtypes(synth_dir, f16_models):
    a = synth.write_model(synth_dir / "a.gguf", qtype="F16", seed=3)
    assert a.read_bytes() == f16_models["llama"].read_bytes()
    other = GGUFFile(synth.cached_model(synth_dir, qtype="F16", seed=4))
    f16 = GGUFFile(a)
    name = "blk.1.ffn_up.weight"
    assert not np.array_equal(f16.tensors[name].dequantize(), other.tensors[name].dequantize())
    # the same seed gives the same model in every qtype, up to quantization error
    ref = f16.tensors[name].dequantize()
    for qtype, rel in (("Q8_0", 0.01), ("Q4_0", 0.15)):
        t = GGUFFile(synth.cached_model(synth_dir, qtype=qtype, seed=3)).tensors[name]
        assert t.qtype == QT[qtype]
        err = np.sqrt(np.mean((t.dequantize() - ref) ** 2) / np.mean(ref ** 2))
        assert err < rel, (qtype, err)


def test_weight_statistics(f16_models):
    g = GGUFFile(f16_models["llama"])
    stds = [g.tensors[f"blk.{i}.attn_q.weight"].dequantize().std() * np.sqrt(TINY.hidden)
            for i in range(TINY.n_layers)]
    assert all(0.55 < s < 1.45 for s in stds) and np.ptp(stds) > 0.05  # per-layer gains vary
    norm = g.tensors["blk.0.attn_norm.weight"].dequantize()
    assert abs(norm.mean() - 1) < 0.05 and 0.05 < norm.std() < 0.15


def test_tied_and_rope_scaling(synth_dir):
    tied = GGUFFile(synth.cached_model(synth_dir, qtype="Q8_0", tied_embeddings=True))
    assert "output.weight" not in tied.tensors and "token_embd.weight" in tied.tensors

    rs = {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}
    g = GGUFFile(synth.cached_model(synth_dir, qtype="F16", rope_scaling=rs))
    f = g.tensors["rope_freqs.weight"]
    assert f.qtype == QT.F32 and f.shape == (TINY.hd // 2,)
    f = f.dequantize()
    # wavelength 2*pi*base^(2i/d): short ones (< 8192/4) untouched, long ones (> 8192) scaled 8x
    wavelen = 2 * np.pi * TINY.rope_base ** (np.arange(0, TINY.hd, 2) / TINY.hd)
    assert np.all(f[wavelen < 2048] == 1.0) and np.all(f[wavelen > 8192] == 8.0)
    mid = (wavelen >= 2048) & (wavelen <= 8192)
    assert mid.any() and np.all((f[mid] > 1) & (f[mid] < 8)) and np.all(np.diff(f) >= 0)

    lin = GGUFFile(synth.cached_model(synth_dir, qtype="F16", rope_scaling={"type": "linear",
                                                                          "factor": 4.0}))
    assert lin.metadata["llama.rope.scaling.type"] == "linear"
    assert lin.metadata["llama.rope.scaling.factor"] == 4.0


def test_free_head_dim_and_padded_vocab(synth_dir):
    shape = {**vars(TINY), "n_layers": 1, "hidden": 256, "head_dim": 64, "vocab": 3000}
    g = GGUFFile(synth.write_model(synth_dir / "q3.gguf", arch="qwen3", qtype="Q8_0", shape=shape))
    assert g.metadata["qwen3.attention.key_length"] == 64
    assert g.tensors["blk.0.attn_q.weight"].shape == (8 * 64, 256)
    tokens = g.metadata["tokenizer.ggml.tokens"]
    assert len(tokens) == 3000 and tokens[-1].startswith("<unused_")
    with pytest.raises(ValueError, match="head_dim"):
        synth.write_model(synth_dir / "bad.gguf", arch="llama", shape=shape)


def test_bad_arguments(synth_dir):
    with pytest.raises(UnsupportedError):
        synth.write_model(synth_dir / "x.gguf", arch="gemma")
    with pytest.raises(UnsupportedError):
        synth.write_model(synth_dir / "x.gguf", qtype="Q8_K")
    with pytest.raises(ValueError, match="shape"):
        synth.write_model(synth_dir / "x.gguf", shape="gpt5")


def test_kquant_without_llamacpp_is_a_clear_error(synth_dir, monkeypatch):
    monkeypatch.setattr(synth.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UnsupportedError, match="llama-cpp-python"):
        synth.write_model(synth_dir / "k.gguf", qtype="Q4_K")
    assert not list(synth_dir.glob("k.gguf*"))  # no F32 intermediate left behind


def test_cache_reuses_files(synth_dir):
    a = synth.cached_model(synth_dir, qtype="Q4_0", seed=11)
    mtime = a.stat().st_mtime_ns
    assert synth.cached_model(synth_dir, qtype="Q4_0", seed=11) == a
    assert a.stat().st_mtime_ns == mtime
    assert synth.cached_model(synth_dir, qtype="Q4_0", seed=12) != a
    assert not list(synth_dir.glob("*.tmp"))


# -- llama.cpp: the files load there too ---------------------------------------------------------

@pytest.mark.llamacpp
@pytest.mark.parametrize("arch", synth.ARCHS)
def test_llamacpp_loads_and_quantizes(arch, synth_dir):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    if llamacpp.problem():
        pytest.skip(llamacpp.problem())
    pure = GGUFFile(synth.cached_model(synth_dir, arch=arch, qtype="Q4_K", seed=5))
    assert {t.qtype for n, t in pure.tensors.items() if len(t.shape) == 2} == {QT.Q4_K}
    mixed = GGUFFile(synth.cached_model(synth_dir, arch=arch, qtype="Q4_K_M", seed=5))
    types = {t.qtype for t in mixed.tensors.values() if len(t.shape) == 2}
    assert QT.Q4_K in types and QT.Q6_K in types  # llama.cpp's recipe: some tensors get Q6_K

    llm = llama_cpp.Llama(model_path=str(pure.path), n_ctx=64, n_threads=2, verbose=False)
    try:
        assert llm.n_vocab() == TINY.vocab and llm.n_embd() == TINY.hidden
        text = b" the park with her friends"
        ids = llm.tokenize(text, add_bos=False)
        assert len(ids) < len(text)  # merges apply: fewer tokens than bytes
        assert llm.detokenize(ids) == text
    finally:
        llm.close()
