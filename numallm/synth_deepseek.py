"""Synthetic random-weight `deepseek2` GGUFs (DeepSeek-V2/V3 shapes), loadable by llama.cpp.

    write_deepseek(path, qtype="F16", shape="tiny-v2-lite", seed=0) -> Path
    cached_deepseek(cache_dir, **same keywords) -> Path

The tensors are the architecture's declaration (numallm.models.deepseek2.Model.declared) and
their values come from numallm.synth's generators (one per tensor name and seed), so an F16
and a Q8_0 file of one seed hold the same model. Files use the attn_kv_b layout (what
llama.cpp's converter wrote before the split attn_k_b / attn_v_b), which llama.cpp runs as
plain multi-head attention: a parity test then compares numallm's absorbed latent attention
with the decompressed form. Shapes named *-kb write the split attn_k_b / attn_v_b
layout of newer converters instead (the same model: the halves of the same attn_kv_b values), with
the *_mla keys, which llama.cpp runs in the latent space as numallm does. Like synth.py, this module may import `gguf` (the writer).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from . import synth
from .errors import UnsupportedError

__all__ = ["DeepseekShape", "SHAPES", "write_deepseek", "cached_deepseek"]

VERSION = 2


@dataclass(frozen=True)
class DeepseekShape:
    vocab: int = 1024
    hidden: int = 256
    n_layers: int = 2
    n_heads: int = 4
    n_ff: int = 512            # the dense leading layers' width
    q_lora: int = 0            # 0: plain attn_q (V2-Lite)
    kv_lora: int = 128
    qk_nope: int = 32
    qk_rope: int = 32
    v_head: int = 32
    n_expert: int = 8
    n_expert_used: int = 2
    n_ff_exp: int = 128
    n_shared: int = 2
    dense_lead: int = 1
    gating: int = 1            # 1 softmax (V2), 2 sigmoid + exp_probs_b (V3)
    weights_norm: bool = False
    weights_scale: float = 1.0
    groups: int = 0            # expert_group_count (0: not written)
    groups_used: int = 0
    yarn: tuple | None = None  # (factor, original context, yarn_log_multiplier as stored)
    ctx: int = 4096
    rope_base: float = 10000.0
    rms_eps: float = 1e-6
    split_kv_b: bool = False   # attn_k_b / attn_v_b (newer converters, absorbed MLA) for attn_kv_b


SHAPES = {
    # V2-Lite's structure: no q_lora, softmax routing, 2 shared experts, 1 dense leading layer
    "tiny-v2-lite": DeepseekShape(),
    # V3's: q_lora, sigmoid + bias routing in groups, renormalised and scaled top-k, YaRN
    "tiny-v3": DeepseekShape(n_layers=3, q_lora=128, n_expert=16, n_expert_used=4, n_shared=1,
                             gating=2, weights_norm=True, weights_scale=2.5, groups=4,
                             groups_used=2, yarn=(4.0, 32, 0.1)),
}
# V3's routing in one MoE layer (no dense lead): a routing near-tie then moves only its own
# position's logits (quantized parity compares the decisive positions, as tests/test_moe.py)
SHAPES["tiny-v3-1layer"] = dataclasses.replace(SHAPES["tiny-v3"], n_layers=1, dense_lead=0)
# the same configurations in the split attn_k_b / attn_v_b layout
SHAPES.update({f"{k}-kb": dataclasses.replace(v, split_kv_b=True) for k, v in list(SHAPES.items())})


def model_args(s: DeepseekShape):
    """The deepseek2 config this shape writes."""
    from .models.deepseek2 import ModelArgs

    y = s.yarn or (1.0, 0, 0.0)
    return ModelArgs(
        arch="deepseek2", n_vocab=s.vocab, n_embd=s.hidden, n_layer=s.n_layers, n_ff=s.n_ff,
        n_head=s.n_heads, n_head_kv=s.n_heads, head_dim=s.qk_nope + s.qk_rope, rope_dim=s.qk_rope,
        n_expert=s.n_expert, n_expert_used=s.n_expert_used, n_ff_exp=s.n_ff_exp,
        n_ff_shexp=s.n_ff_exp * s.n_shared, n_lora_q=s.q_lora, n_lora_kv=s.kv_lora,
        v_head_dim=s.v_head, n_layer_dense_lead=s.dense_lead, n_expert_shared=s.n_shared,
        expert_weights_scale=s.weights_scale, expert_weights_norm=s.weights_norm,
        expert_gating_func=s.gating, n_expert_groups=s.groups, n_group_used=s.groups_used,
        rope_scaling_type="yarn" if s.yarn else "none", rope_scaling_factor=y[0],
        rope_scaling_orig_ctx=y[1], rope_yarn_log_mul=y[2], split_kv_b=s.split_kv_b)


def _kind(name: str, t) -> str:
    if t.split == (0, "rows"):
        return "embed"
    if name.endswith("ffn_gate_inp.weight"):
        return "router"
    return "experts" if t.kind == "experts" else t.kind


def _values(spec, a, seed: int):
    """synth's values for a tensor; attn_k_b / attn_v_b are the key / value halves of the
    attn_kv_b of the same seed (so both layouts hold one model): k_b[h] = W_UK[h]^T."""
    layer, _, name = spec.name.partition(".")[2].partition(".")
    if name not in ("attn_k_b.weight", "attn_v_b.weight"):
        return synth._values(spec, seed)
    kv = synth._values(synth._Spec(f"blk.{layer}.attn_kv_b.weight", (a.kv_b_dim, a.n_lora_kv), "matrix"),
                       seed).reshape(a.n_head, a.nope_dim + a.v_head_dim, a.n_lora_kv)
    part = kv[:, :a.nope_dim].transpose(0, 2, 1) if name == "attn_k_b.weight" else kv[:, a.nope_dim:]
    return np.ascontiguousarray(part)


def _add_metadata(w: gguf.GGUFWriter, s: DeepseekShape, name: str, file_type: int) -> None:
    """The deepseek2 keys of shape `s` (everything but the tokenizer)."""
    arch = "deepseek2"
    w.add_name(name)
    w.add_file_type(file_type)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_context_length(s.ctx)
    w.add_embedding_length(s.hidden)
    w.add_block_count(s.n_layers)
    w.add_feed_forward_length(s.n_ff)
    w.add_head_count(s.n_heads)
    # the split form is llama.cpp's absorbed MLA: one KV head of the latent, per-head sizes
    # under *_mla keys
    w.add_head_count_kv(1 if s.split_kv_b else s.n_heads)
    w.add_layer_norm_rms_eps(s.rms_eps)
    w.add_rope_freq_base(s.rope_base)
    w.add_rope_dimension_count(s.qk_rope)
    if s.split_kv_b:
        w.add_key_length(s.kv_lora + s.qk_rope)
        w.add_value_length(s.kv_lora)
        w.add_uint32(f"{arch}.attention.key_length_mla", s.qk_nope + s.qk_rope)
        w.add_uint32(f"{arch}.attention.value_length_mla", s.v_head)
    else:
        w.add_key_length(s.qk_nope + s.qk_rope)
        w.add_value_length(s.v_head)
    w.add_vocab_size(s.vocab)
    k = f"{arch}."
    w.add_uint32(k + "attention.q_lora_rank", s.q_lora)
    w.add_uint32(k + "attention.kv_lora_rank", s.kv_lora)
    w.add_uint32(k + "leading_dense_block_count", s.dense_lead)
    w.add_uint32(k + "expert_count", s.n_expert)
    w.add_uint32(k + "expert_used_count", s.n_expert_used)
    w.add_uint32(k + "expert_feed_forward_length", s.n_ff_exp)
    w.add_uint32(k + "expert_shared_count", s.n_shared)
    w.add_float32(k + "expert_weights_scale", s.weights_scale)
    w.add_bool(k + "expert_weights_norm", s.weights_norm)
    w.add_uint32(k + "expert_gating_func", s.gating)
    if s.groups:
        w.add_uint32(k + "expert_group_count", s.groups)
        w.add_uint32(k + "expert_group_used_count", s.groups_used)
    if s.yarn:
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(s.yarn[0]))
        w.add_rope_scaling_orig_ctx_len(int(s.yarn[1]))
        w.add_float32(k + "rope.scaling.yarn_log_multiplier", float(s.yarn[2]))


def write_deepseek(path: str | os.PathLike, qtype: str = "F16", shape: str | DeepseekShape = "tiny-v2-lite",
                   seed: int = 0) -> Path:
    """A random-weight deepseek2 GGUF at `path`: qtype F32, F16, BF16 or a gguf-py legacy quant
    (Q8_0, Q4_0, ...) for every matrix, norms, biases and the router F32; or a K-quant recipe
    (Q4_K_M, ...) that llama.cpp's quantizer makes from the F16 file (llama-cpp-python)."""
    s = SHAPES[shape] if isinstance(shape, str) else shape
    llama = {**synth._LLAMA_PURE, **synth._LLAMA_MIXED}
    if qtype in llama:            # K-quants: an F16 file through llama.cpp's quantizer
        src = Path(path).with_name(Path(path).name + ".f16.tmp")
        try:
            write_deepseek(src, "F16", s, seed)
            synth._llama_quantize(src, Path(path), llama[qtype], qtype in synth._LLAMA_PURE)
        finally:
            src.unlink(missing_ok=True)
        return Path(path)
    if qtype not in synth._GGUF_PY:
        raise UnsupportedError(f"synthetic deepseek2 qtype {qtype!r} is not supported; use one of "
                               f"{', '.join(synth._GGUF_PY)}, {', '.join(llama)}")
    wtype = synth._GGUF_PY[qtype]
    from .models.deepseek2 import Model

    a = model_args(s)
    specs = [synth._Spec(n, a.dims(t.shape), _kind(n, t)) for n, t in Model.declared(a)
             if n != "rope_freqs.weight"]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arch = "deepseek2"
    w = gguf.GGUFWriter(str(path), arch)
    _add_metadata(w, s, f"numallm synthetic deepseek2 seed {seed}", synth._FILE_TYPE.get(qtype, 1))
    synth.add_tokenizer(w, synth._bpe_vocab(arch, s.vocab))

    dense = ("matrix", "embed", "experts")
    synth.write_tensors(w, specs, wtype, (synth._encode(_values(spec, a, seed), wtype)
                                          if spec.kind in dense else _values(spec, a, seed)
                                          for spec in specs))
    return path


def cached_deepseek(cache_dir: str | os.PathLike, qtype: str = "F16",
                    shape: str | DeepseekShape = "tiny-v2-lite", seed: int = 0) -> Path:
    """write_deepseek into `cache_dir` under a name derived from the arguments; reuse if present."""
    s = SHAPES[shape] if isinstance(shape, str) else shape
    key = json.dumps([VERSION, synth.SYNTH_VERSION, qtype, dataclasses.asdict(s), seed], sort_keys=True)
    label = shape if isinstance(shape, str) else "custom"
    name = f"deepseek2-{label}-{qtype}-s{seed}-{hashlib.sha256(key.encode()).hexdigest()[:10]}.gguf"
    out = Path(cache_dir) / name
    if out.is_file():
        return out
    tmp = out.with_name(f".{name}.{os.getpid()}.tmp")
    try:
        write_deepseek(tmp, qtype, s, seed)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


# DeepSeek-V2-Lite's layer shapes (16B, 27 layers), 4 layers of them (1 dense + 3 MoE): the
# benchmark model (benchmarks/results/*-deepseek.md)
SHAPES["v2-lite-4l"] = DeepseekShape(vocab=102400, hidden=2048, n_layers=4, n_heads=16, n_ff=10944,
                                     q_lora=0, kv_lora=512, qk_nope=128, qk_rope=64, v_head=128,
                                     n_expert=64, n_expert_used=6, n_ff_exp=1408, n_shared=2,
                                     dense_lead=1, gating=1, weights_norm=False, weights_scale=1.0,
                                     ctx=163840, yarn=(40.0, 4096, 0.0707))

# DeepSeek-R1 / V3 (671B): the config of the released model
SHAPES["r1"] = DeepseekShape(vocab=129280, hidden=7168, n_layers=61, n_heads=128, n_ff=18432,
                             q_lora=1536, kv_lora=512, qk_nope=128, qk_rope=64, v_head=128,
                             n_expert=256, n_expert_used=8, n_ff_exp=2048, n_shared=1, dense_lead=3,
                             gating=2, weights_norm=True, weights_scale=2.5, groups=8, groups_used=4,
                             yarn=(40.0, 4096, 0.1), ctx=163840)


def _q4_k_m(name: str, kind: str, n_layer: int) -> gguf.GGMLQuantizationType:
    """The type llama.cpp's Q4_K_M recipe gives a deepseek2 tensor (llama_tensor_get_type, in
    short): vectors and the router F32, output Q6_K, the ffn_down tensors Q6_K in the layers
    its use_more_bits picks (the first and last eighth, every third between), the rest Q4_K."""
    QT = gguf.GGMLQuantizationType
    if kind not in ("matrix", "embed", "experts"):
        return QT.F32
    if name == "output.weight":
        return QT.Q6_K
    if ".ffn_down" in name:
        i = int(name.split(".")[1])
        if i < n_layer // 8 or i >= 7 * n_layer // 8 or (i - n_layer // 8) % 3 == 2:
            return QT.Q6_K
    return QT.Q4_K


def write_header_only(path: str | os.PathLike, shape: str | DeepseekShape = "r1") -> Path:
    """A Q4_K_M-shaped deepseek2 GGUF whose header is complete (every tensor with its real shape,
    type and offset) and whose data region is a hole: a sparse file of the model's full size
    that takes a few MB of disk. For planning (`numallm topo MODEL`, `plan`, `info`), which read
    only the header; loading it would compute on zeros."""
    s = SHAPES[shape] if isinstance(shape, str) else shape
    from .models.deepseek2 import Model

    a = model_args(s)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(path), "deepseek2")
    _add_metadata(w, s, "numallm header-only deepseek2 (Q4_K_M-shaped)", 15)   # 15: MOSTLY_Q4_K_M
    def tensors():
        for n, t in Model.declared(a):
            if n == "rope_freqs.weight":
                continue
            qt = (gguf.GGMLQuantizationType.F32 if n.endswith("ffn_gate_inp.weight")
                  else _q4_k_m(n, _kind(n, t), s.n_layers))
            yield n, a.dims(t.shape), qt

    synth.write_sparse(w, tensors())
    return path
