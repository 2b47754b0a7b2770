"""DeepSeek-V2 / V2-Lite / V2.5 / V3 / R1 (GGUF `deepseek2`), as llama.cpp builds them.

Multi-head Latent Attention: each token's K and V come from one compressed vector, the latent
c = rms_norm(first kv_lora_rank of attn_kv_a_mqa(h)), plus one RoPE key k_pe (the last rope_dim
values of that product) shared by all heads. The cache keeps only [c, k_pe] per token
(kv_lora_rank + rope_dim values: 576 for V3, not 128 heads x 2 x 192). Attention runs in the
latent space ("absorbed" weights): head h's query on c is W_UK[h]^T q_nope[h], its output
W_UV[h] (softmax . c), where W_UK / W_UV are the key / value halves of attn_kv_b (or the split
attn_k_b / attn_v_b of newer files); with q_pe . k_pe added to the scores this is the same
number as decompressing every cached token, for a cache read of one latent per token.

Queries: attn_q (V2-Lite, q_lora_rank 0) or attn_q_b(rms_norm(attn_q_a(h))). RoPE: llama.cpp's
"normal" (adjacent pairs) on the rope part only. The first leading_dense_block_count layers
have a SwiGLU feed-forward; the rest routed experts plus expert_shared_count shared experts
(one SwiGLU of n_ff_exp * count), routing by softmax (V2) or sigmoid with the selection bias
exp_probs_b (V3), group-limited where the file has group counts, top-k weights renormalised
(expert_weights_norm) and scaled (expert_weights_scale). YaRN: the RoPE magnitude is the
attention factor only, and the score scale takes mscale^2 with mscale = 1 + 0.1 * log_mul *
ln(factor) (llama.cpp's deepseek2 handling of rope.scaling.yarn_log_multiplier).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from .. import kvcache, ops
from ..cache_types import DEFAULT_CACHE_TYPE, check_width, row_bytes
from ..errors import GGUFError
from ..gguf_file import GGUFFile
from .base import FF_SHEXP, MLA_HEADS, Block, T, Transformer
from .moe import EXPERT_TENSORS, MoEArgs

# ModelArgs field -> GGUF key suffix (after "deepseek2.")
GGUF_KEYS = {
    "n_lora_q": "attention.q_lora_rank",
    "n_lora_kv": "attention.kv_lora_rank",
    "v_head_dim": "attention.value_length",
    "n_layer_dense_lead": "leading_dense_block_count",
    "n_expert_shared": "expert_shared_count",
    "expert_weights_scale": "expert_weights_scale",
    "expert_weights_norm": "expert_weights_norm",
    "expert_gating_func": "expert_gating_func",
    "n_expert_groups": "expert_group_count",
    "n_group_used": "expert_group_used_count",
    "rope_yarn_log_mul": "rope.scaling.yarn_log_multiplier",
}
SOFTMAX, SIGMOID = 1, 2        # llama.cpp's expert_gating_func values


@dataclass(frozen=True)
class ModelArgs(MoEArgs):
    norm_eps: float = 1e-6
    n_lora_q: int = 0              # 0: a plain attn_q (V2-Lite)
    n_lora_kv: int = 0             # the latent's width
    v_head_dim: int = 0            # head_dim is q/k's (nope + rope); v's may differ
    n_layer_dense_lead: int = 0
    n_expert_shared: int = 0
    expert_weights_scale: float = 0.0
    expert_weights_norm: bool = False
    expert_gating_func: int = SOFTMAX
    n_expert_groups: int = 0
    n_group_used: int = 0
    rope_yarn_log_mul: float = 0.0  # as stored (converters write 0.1 * mscale_all_dim)
    split_kv_b: bool = False        # attn_k_b / attn_v_b instead of attn_kv_b

    @classmethod
    def from_gguf(cls, f: GGUFFile) -> "ModelArgs":
        a = super().from_gguf(f)
        md = {k: f.get(f"{a.arch}.{key}") for k, key in GGUF_KEYS.items()}
        vals = {k: (v.item() if isinstance(v, np.ndarray) and v.size == 1 else v)
                for k, v in md.items() if v is not None}
        # files split for absorbed MLA carry the per-head sizes under *_mla keys
        k_mla, v_mla = f.get(f"{a.arch}.attention.key_length_mla"), f.get(f"{a.arch}.attention.value_length_mla")
        if k_mla is not None and v_mla is not None:
            vals.update(head_dim=int(k_mla), v_head_dim=int(v_mla))
        vals["split_kv_b"] = "blk.0.attn_k_b.weight" in f.tensors
        a = dataclasses.replace(a, **vals)
        a = dataclasses.replace(a, v_head_dim=a.v_head_dim or a.head_dim - a.rope_dim,
                                n_ff_shexp=a.n_ff_exp * a.n_expert_shared,
                                expert_weights_norm=bool(a.expert_weights_norm))
        bad = []
        if not 0 < a.n_lora_kv <= (1 << 16):
            bad.append(f"attention.kv_lora_rank = {a.n_lora_kv}")
        if not 0 < a.rope_dim < a.head_dim or a.rope_dim % 2:
            bad.append(f"rope.dimension_count = {a.rope_dim} with key length {a.head_dim}")
        if not 0 <= a.n_layer_dense_lead <= a.n_layer:
            bad.append(f"leading_dense_block_count = {a.n_layer_dense_lead}")
        if a.expert_gating_func not in (SOFTMAX, SIGMOID):
            bad.append(f"expert_gating_func = {a.expert_gating_func}")
        if a.n_expert_groups > 1 and (a.n_expert % a.n_expert_groups or
                                      not 0 < a.n_group_used <= a.n_expert_groups):
            bad.append(f"expert_group_count = {a.n_expert_groups} / used {a.n_group_used}")
        if bad:
            raise GGUFError(f"{f.path}: deepseek2 metadata {'; '.join(bad)} is not sane; "
                            f"the file is corrupt")
        return a

    @property
    def nope_dim(self) -> int:
        return self.head_dim - self.rope_dim

    @property
    def kv_a_dim(self) -> int:
        """One token's latent plus its RoPE key: what the cache stores per layer."""
        return self.n_lora_kv + self.rope_dim

    @property
    def kv_b_dim(self) -> int:
        return self.n_head * (self.nope_dim + self.v_head_dim)

    @property
    def o_dim(self) -> int:
        return self.n_head * self.v_head_dim

    def kv_bytes_per_token(self, type_k: str = DEFAULT_CACHE_TYPE, type_v: str | None = None) -> int:
        # one latent row per token and layer, in the key type (llama.cpp's MLA cache: V is a view of K)
        return self.n_layer * row_bytes(type_k, self.kv_a_dim)

    def check_cache_types(self, type_k: str, type_v: str) -> None:
        check_width(type_k, self.kv_a_dim, "latent cache rows (kv_lora_rank + rope dims)",
                    "--cache-type-k")

    @property
    def yarn_factor(self) -> float:
        return self.rope_scaling_factor if self.rope_scaling_type == "yarn" else 1.0

    @property
    def rope_mscale(self) -> float:
        """The RoPE magnitude (llama.cpp's attn_factor_org): the file's attention factor,
        times YaRN's 1 + 0.1 ln(factor) only when no log multiplier is given."""
        f = max(self.yarn_factor, 1.0)
        return self.rope_attn_factor * (1.0 if self.rope_yarn_log_mul else 1.0 + 0.1 * math.log(f))

    @property
    def kq_scale(self) -> float:
        m = self.rope_mscale * (1.0 + self.rope_yarn_log_mul * math.log(max(self.yarn_factor, 1.0)))
        return m * m / math.sqrt(self.head_dim)


class LatentCache(ops.KVCache):
    """One layer's latent cache: k = v = (1, n_ctx, kv_lora_rank + rope_dim), [c, k_pe] per
    position, in the key cache type. Attention reads it as one KV head whose values are the
    whole row (the k_pe columns of the output are dropped), so the shared kernels run it."""

    def __init__(self, n_ctx: int, width: int, zeros=np.zeros, type_k: str = DEFAULT_CACHE_TYPE):
        self.k = kvcache.KVArray(type_k, (1, n_ctx, width), zeros)
        self.v = self.k
        self.n = 0

    @property
    def nbytes(self) -> int:
        return self.k.nbytes

    shared = True

    def part(self, h0: int, h1: int, zeros) -> "LatentCache":
        return LatentCache(self.n_ctx, self.k.a.shape[2], zeros, self.k.type)

    def store(self, k: np.ndarray, v: np.ndarray, pos0: int) -> None:
        self.k.store(k, pos0)          # v is k: the one latent row
        self.n = pos0 + k.shape[0]

    def attend(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, pos0: int) -> np.ndarray:
        return ops.attend_latent(q, k, self, pos0)     # (k is v: the latent rows)


MLA_TENSORS = (
    T("attn_norm.weight", ("n_embd",), role="norm"),
    T("attn_q.weight", ("q_dim", "n_embd"), (0, MLA_HEADS), optional=True, role="q"),
    T("attn_q_a.weight", ("n_lora_q", "n_embd"), optional=True, role="q_a"),
    T("attn_q_a_norm.weight", ("n_lora_q",), optional=True, role="q_a_norm"),
    T("attn_q_b.weight", ("q_dim", "n_lora_q"), (0, MLA_HEADS), optional=True, role="q_b"),
    T("attn_kv_a_mqa.weight", ("kv_a_dim", "n_embd"), role="kv_a"),
    T("attn_kv_a_norm.weight", ("n_lora_kv",), role="kv_a_norm"),
    T("attn_kv_b.weight", ("kv_b_dim", "n_lora_kv"), (0, MLA_HEADS), optional=True, role="kv_b"),
    T("attn_k_b.weight", ("n_head", "n_lora_kv", "nope_dim"), (0, MLA_HEADS), optional=True, role="k_b"),
    T("attn_v_b.weight", ("n_head", "v_head_dim", "n_lora_kv"), (0, MLA_HEADS), optional=True, role="v_b"),
    T("attn_output.weight", ("n_embd", "o_dim"), (1, MLA_HEADS), role="out"),
)
DENSE_FFN = tuple(t for t in Block.TENSORS if t.name.startswith("ffn_"))
# the declarations MLABlock reads as per-head operands (absorbed) rather than as matrices
ABSORBED = ("attn_kv_b.weight", "attn_k_b.weight", "attn_v_b.weight")


def absorbed(a: ModelArgs, f: GGUFFile, i: int) -> tuple[ops.HeadLinear, ops.HeadLinear]:
    """Layer i's absorbed products as per-head kernel operands: uk (H, lat, nope), head h's
    query mapped into the latent (W_UK[h]^T q_nope), and uv (H, v, lat), its latent output
    mapped to values (W_UV[h] o). attn_k_b / attn_v_b files hold exactly these; from attn_kv_b
    the value rows are its own bytes and the key rows are transposed once (ops.split_heads:
    float files keep their type, quantized ones give Q8_0)."""
    h, nope, v, lat = a.n_head, a.nope_dim, a.v_head_dim, a.n_lora_kv
    if a.split_kv_b:
        kb, vb = f.tensor(f"blk.{i}.attn_k_b.weight"), f.tensor(f"blk.{i}.attn_v_b.weight")
        for t, want in ((kb, (h, lat, nope)), (vb, (h, v, lat))):
            if tuple(t.shape) != want:
                raise GGUFError(f"{f.path}: tensor {t.name} has shape {t.shape}, expected {want} "
                                f"from the metadata; the file is corrupt")
        return ops.HeadLinear(kb), ops.HeadLinear(vb)
    kv = f.tensor(f"blk.{i}.attn_kv_b.weight")
    if tuple(kv.shape) != (a.kv_b_dim, lat):
        raise GGUFError(f"{f.path}: tensor {kv.name} has shape {kv.shape}, expected "
                        f"{(a.kv_b_dim, lat)} from the metadata; the file is corrupt")
    return ops.split_heads(kv, h, nope)


class MLABlock(Block):
    """MLA attention with a dense SwiGLU feed-forward (the leading layers)."""

    TENSORS = MLA_TENSORS + DENSE_FFN

    def __init__(self, a: ModelArgs, w, i: int, rope: ops.Rope):
        self.a, self.rope = a, rope
        for spec in self.TENSORS:       # (the absorbed ones are read below, in per-head form)
            setattr(self, spec.attr, None if spec.name in ABSORBED else
                    w.load(f"blk.{i}.{spec.name}", spec, a))
        self.attn_uk, self.attn_uv = absorbed(a, w.file, i)   # (H, lat, nope), (H, v, lat)

    def attn(self, x: np.ndarray, cache: LatentCache, pos0: int) -> np.ndarray:
        a, t = self.a, x.shape[0]
        hn, lat = a.n_head, a.n_lora_kv
        h = ops.rms_norm(x, self.attn_norm, a.norm_eps)
        if self.attn_q is None:
            qa, kva = ops.matmuls(h, self.attn_q_a, self.attn_kv_a_mqa)
            q = self.attn_q_b(ops.rms_norm(qa, self.attn_q_a_norm, a.norm_eps))
        else:
            q, kva = ops.matmuls(h, self.attn_q, self.attn_kv_a_mqa)
        scale = a.kq_scale * math.sqrt(a.kv_a_dim)          # the kernels divide by sqrt(width)
        qn, qc, latent = ops.mla_split(q.reshape(t, hn, a.head_dim), kva, self.attn_kv_a_norm,
                                       a.norm_eps, self.rope, pos0, scale)
        # qn (H, T, nope); qc (T, H, lat + rope), rope part filled; latent (T, 1, lat + rope)
        qc = ops.mla_scores_q(ops.head_matmul(qn, self.attn_uk), scale, qc)
        width = a.kv_a_dim
        o = ops.attention(qc, latent, latent, cache, pos0).reshape(t, hn, width)
        out = ops.head_matmul(o[..., :lat].transpose(1, 0, 2), self.attn_uv)  # (H, T, v)
        return self.attn_output(np.ascontiguousarray(out.transpose(1, 0, 2)).reshape(t, a.o_dim))


class MLAMoEBlock(MLABlock):
    """MLA attention with routed experts plus the shared experts."""

    TENSORS = MLA_TENSORS + EXPERT_TENSORS + (
        T("exp_probs_b.bias", ("n_expert",), optional=True),   # V3's selection bias
        T("ffn_gate_shexp.weight", ("n_ff_shexp", "n_embd"), (0, FF_SHEXP)),
        T("ffn_up_shexp.weight", ("n_ff_shexp", "n_embd"), (0, FF_SHEXP)),
        T("ffn_down_shexp.weight", ("n_embd", "n_ff_shexp"), (1, FF_SHEXP)),
    )

    def ffn(self, x: np.ndarray) -> np.ndarray:
        a = self.a
        h = ops.rms_norm(x, self.ffn_norm, a.norm_eps)
        logits, g, u = ops.matmuls(h, self.ffn_gate_inp, self.ffn_gate_shexp, self.ffn_up_shexp)
        ids, w = ops.moe_route(logits, a.n_expert_used, a.expert_weights_norm,
                               sigmoid=a.expert_gating_func == SIGMOID, bias=self.exp_probs_b_bias,
                               groups=(a.n_expert_groups, a.n_group_used),
                               scale=a.expert_weights_scale)
        # routed first: where the experts run elsewhere (the CPU, for a block on a GPU) the
        # shared experts are computed meanwhile
        routed = ops.moe_ffn(h, ids, w, self.ffn_gate_exps, self.ffn_up_exps, self.ffn_down_exps)
        shared = self.ffn_down_shexp(ops.swiglu(g, u))                       # (T, n_embd)
        return routed + shared


# the optional declarations a config does not use (its file lacks them)
def _unused(a: ModelArgs) -> set[str]:
    out = {"attn_q.weight"} if a.n_lora_q else {"attn_q_a.weight", "attn_q_a_norm.weight",
                                                 "attn_q_b.weight"}
    out |= {"attn_kv_b.weight"} if a.split_kv_b else {"attn_k_b.weight", "attn_v_b.weight"}
    if a.expert_gating_func != SIGMOID:
        out.add("exp_probs_b.bias")
    return out


class Model(Transformer):
    Args = ModelArgs
    Block = MLAMoEBlock
    ROPE_NEOX = False

    @classmethod
    def layer_class(cls, a: ModelArgs, i: int) -> type:
        return MLABlock if i < a.n_layer_dense_lead else MLAMoEBlock

    @classmethod
    def layer_tensors(cls, a: ModelArgs, i: int) -> tuple[T, ...]:
        skip = _unused(a)
        return tuple(t for t in cls.layer_class(a, i).TENSORS if t.name not in skip)

    def yarn_mscale(self, a: ModelArgs) -> float:
        return a.rope_mscale

    def new_cache(self, n_ctx: int, type_k: str = DEFAULT_CACHE_TYPE,
                  type_v: str = DEFAULT_CACHE_TYPE) -> list[LatentCache]:
        a = self.args          # (type_v unused: the latent is read as keys and as values)
        return [LatentCache(n_ctx, a.kv_a_dim, type_k=type_k) for _ in range(a.n_layer)]
