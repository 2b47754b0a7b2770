"""What every architecture shares: config reading, the tensor declarations, weight lookup by GGUF
name, the decoder-only transformer skeleton. Architecture files subclass and change only what
differs.

Each block class declares its tensors in `TENSORS` (GGUF name, shape in config terms, how it
splits): the one table that placement, GPU offload, the planner and the synthetic-model writer
read. Nothing outside `numallm/models/` spells a block's tensor names.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from .. import ops
from ..cache_types import DEFAULT_CACHE_TYPE, check_width, row_bytes
from ..errors import GGUFError, UnsupportedError
from ..gguf_file import GGUFFile
from .decl import FF, FF_EXP, FF_SHEXP, HEADS, MLA_HEADS, ROWS, T  # noqa: F401 (the declaration vocabulary, re-exported)

# ModelArgs field -> GGUF key suffix (after "{arch}.")
GGUF_KEYS = {
    "context_length": "context_length",
    "n_embd": "embedding_length",
    "n_layer": "block_count",
    "n_ff": "feed_forward_length",
    "n_head": "attention.head_count",
    "n_head_kv": "attention.head_count_kv",
    "head_dim": "attention.key_length",
    "norm_eps": "attention.layer_norm_rms_epsilon",
    "rope_dim": "rope.dimension_count",
    "rope_base": "rope.freq_base",
    "rope_scaling_type": "rope.scaling.type",
    "rope_scaling_factor": "rope.scaling.factor",
    "rope_scaling_orig_ctx": "rope.scaling.original_context_length",
    "rope_attn_factor": "rope.scaling.attn_factor",
    # Mixture-of-Experts (read only by architectures whose ModelArgs has these fields)
    "n_expert": "expert_count",
    "n_expert_used": "expert_used_count",
    "n_ff_exp": "expert_feed_forward_length",
    "n_ff_shexp": "expert_shared_feed_forward_length",
}

# Sanity bounds: a hostile file must not make us allocate absurd caches
MAX_DIM = 1 << 20


@dataclass(frozen=True)
class BaseArgs:
    arch: str
    n_vocab: int
    n_embd: int
    n_layer: int
    n_ff: int
    n_head: int
    n_head_kv: int = 0         # 0: same as n_head
    head_dim: int = 0          # 0: n_embd // n_head
    norm_eps: float = 1e-5
    rope_dim: int = 0          # 0: head_dim
    rope_base: float = 10000.0
    rope_scaling_type: str = "none"
    rope_scaling_factor: float = 1.0
    context_length: int = 2048
    # YaRN (rope_scaling_type "yarn"): the context trained before the extension (0: context_length),
    # a magnitude factor, and ggml's ramp corners (llama.cpp's defaults; not read from files)
    rope_scaling_orig_ctx: int = 0
    rope_attn_factor: float = 1.0
    rope_yarn_beta_fast: float = 32.0
    rope_yarn_beta_slow: float = 1.0
    # Mixture-of-Experts (models/moe.py reads and checks them; 0 in a dense model)
    n_expert: int = 0          # routed experts per layer
    n_expert_used: int = 0     # experts each token runs (top k)
    n_ff_exp: int = 0          # one expert's feed-forward width
    n_ff_shexp: int = 0        # the shared expert's width (qwen2moe, deepseek2)

    @classmethod
    def from_gguf(cls, f: GGUFFile) -> "BaseArgs":
        """Fill the fields from `{arch}.<key>` metadata; derived defaults as llama.cpp does."""
        arch = f.architecture
        vals: dict = {"arch": arch, "n_vocab": f.tensor("token_embd.weight").shape[0]}
        names = {fl.name for fl in dataclasses.fields(cls)}
        for field, key in GGUF_KEYS.items():
            v = f.get(f"{arch}.{key}")
            if field in names and v is not None:
                vals[field] = v.item() if isinstance(v, np.ndarray) and v.size == 1 else v
        missing = [k for k in ("n_embd", "n_layer", "n_ff", "n_head") if k not in vals]
        if missing:
            raise GGUFError(f"{f.path}: metadata lacks {', '.join(f'{arch}.{GGUF_KEYS[m]}' for m in missing)}; "
                            f"the file is incomplete")
        for k in ("n_embd", "n_layer", "n_ff", "n_head", "n_head_kv", "head_dim", "rope_dim",
                  "context_length", "n_expert", "n_expert_used", "n_ff_exp", "n_ff_shexp"):
            if k not in names:
                continue
            v = vals.get(k, 0)
            if not isinstance(v, int) or v < 0 or v > MAX_DIM * (64 if k == "context_length" else 1):
                raise GGUFError(f"{f.path}: {arch}.{GGUF_KEYS[k]} = {v!r} is not a sane value; "
                                f"the file is corrupt")
        _check_shape_values(f.path, arch, vals)
        vals.setdefault("n_head_kv", vals["n_head"])
        if not vals["n_head_kv"]:
            vals["n_head_kv"] = vals["n_head"]
        if not vals.get("head_dim"):
            vals["head_dim"] = vals["n_embd"] // vals["n_head"]
        if not vals.get("rope_dim"):
            vals["rope_dim"] = vals["head_dim"]
        if vals["n_head"] % vals["n_head_kv"]:
            raise GGUFError(f"{f.path}: {vals['n_head']} attention heads cannot be grouped over "
                            f"{vals['n_head_kv']} KV heads; the file is corrupt")
        if vals["rope_dim"] > vals["head_dim"] or vals["rope_dim"] % 2:
            raise GGUFError(f"{f.path}: {arch}.{GGUF_KEYS['rope_dim']} = {vals['rope_dim']} does not "
                            f"fit heads of {vals['head_dim']} (it must be even and at most that); "
                            f"the file is corrupt")
        return cls(**vals)

    @property
    def q_dim(self) -> int:
        return self.n_head * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_head_kv * self.head_dim

    @property
    def rope_pairs(self) -> int:
        return self.rope_dim // 2

    def kv_bytes_per_token(self, type_k: str = DEFAULT_CACHE_TYPE, type_v: str | None = None) -> int:
        """K and V of every layer for one token in cache types type_k / type_v (None: type_k's;
        numallm.cache_types): the one KV-size formula. An architecture with another cache layout
        (an MLA latent) overrides this."""
        return self.n_layer * self.n_head_kv * (row_bytes(type_k, self.head_dim)
                                                + row_bytes(type_v or type_k, self.head_dim))

    def layer_kv_bytes(self, n_ctx: int, type_k: str = DEFAULT_CACHE_TYPE, type_v: str | None = None) -> int:
        """K and V of one layer for n_ctx positions."""
        return self.kv_bytes_per_token(type_k, type_v) // max(self.n_layer, 1) * n_ctx

    def kv_bytes(self, n_ctx: int, type_k: str = DEFAULT_CACHE_TYPE, type_v: str | None = None) -> int:
        """The whole KV cache for n_ctx positions."""
        return self.kv_bytes_per_token(type_k, type_v) * n_ctx

    def check_cache_types(self, type_k: str, type_v: str) -> None:
        """A one-line OptionError when this config's cache rows cannot be stored in these types
        (q8_0: head sizes in whole blocks of 32)."""
        check_width(type_k, self.head_dim, "key heads", "--cache-type-k")
        check_width(type_v, self.head_dim, "value heads", "--cache-type-v")

    def dims(self, shape: tuple[str, ...]) -> tuple[int, ...]:
        """A declared shape (field names) in numbers."""
        return tuple(int(getattr(self, d)) for d in shape)


def _check_shape_values(path: str, arch: str, vals: dict) -> None:
    """Header values every later division and size uses, checked before any is used (all are
    already known to be integers in 0..MAX_DIM): a hostile file gets one line, never a
    ZeroDivisionError or a nonsense shape."""
    def bad(field: str, why: str) -> GGUFError:
        return GGUFError(f"{path}: {arch}.{GGUF_KEYS[field]} = {vals.get(field)!r} {why}; the file "
                         f"is corrupt")

    for k in ("n_embd", "n_layer", "n_ff", "n_head", "context_length"):
        if k in vals and vals[k] == 0:
            raise bad(k, "must be positive")
    if not vals.get("head_dim") and vals["n_embd"] % vals["n_head"]:
        raise bad("n_head", f"does not divide the embedding length {vals['n_embd']} "
                            f"(and {arch}.{GGUF_KEYS['head_dim']} is not given)")
    for k in ("norm_eps", "rope_base", "rope_scaling_factor"):
        v = vals.get(k)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))
                              or not np.isfinite(v) or v < 0 or (v == 0 and k == "rope_base")):
            raise bad(k, "is not a usable number")


class Weights:
    """Tensors of a GGUF file looked up by their GGUF names."""

    def __init__(self, f: GGUFFile):
        self.file = f

    def has(self, name: str) -> bool:
        return name in self.file.tensors

    def linear(self, name: str, shape: tuple[int, int]) -> ops.Linear:
        qt = self.file.tensor(name)
        if qt.shape != shape:
            raise GGUFError(f"{self.file.path}: tensor {name} has shape {qt.shape}, expected {shape} "
                            f"from the metadata; the file is corrupt")
        return ops.Linear(qt)

    def load(self, name: str, spec: T, a: BaseArgs):
        """The declared tensor `spec` stored as `name`: a Linear, a float32 vector, or None
        when it is optional and absent."""
        if spec.optional and not self.has(name):
            return None
        shape = a.dims(spec.shape)
        if spec.kind == "experts":
            return self.experts(name, shape)
        return self.linear(name, shape) if spec.kind == "matrix" else self.vector(name, shape[0])

    def experts(self, name: str, shape: tuple[int, int, int]) -> ops.ExpertLinear:
        qt = self.file.tensor(name)
        if qt.shape != shape:
            raise GGUFError(f"{self.file.path}: expert tensor {name} has shape {qt.shape}, expected "
                            f"{shape} (experts, rows, cols) from the metadata; the file is corrupt")
        return ops.ExpertLinear(qt)

    def vector(self, name: str, size: int) -> np.ndarray:
        """A small tensor (norm weight, bias) as a float32 copy (size,)."""
        qt = self.file.tensor(name)
        if qt.n_elements != size:
            raise GGUFError(f"{self.file.path}: tensor {name} has {qt.n_elements} elements, "
                            f"expected {size}; the file is corrupt")
        return qt.dequantize().reshape(size)


class Block:
    """One pre-norm decoder layer: attention then a SwiGLU feed-forward (llama family).
    Attribute names are the GGUF tensor names under `blk.N.` (T.attr)."""

    TENSORS = (
        T("attn_norm.weight", ("n_embd",)),
        T("attn_q.weight", ("q_dim", "n_embd"), (0, HEADS)),
        T("attn_k.weight", ("kv_dim", "n_embd"), (0, HEADS)),
        T("attn_v.weight", ("kv_dim", "n_embd"), (0, HEADS)),
        T("attn_output.weight", ("n_embd", "q_dim"), (1, HEADS)),
        T("ffn_norm.weight", ("n_embd",)),
        T("ffn_gate.weight", ("n_ff", "n_embd"), (0, FF)),
        T("ffn_up.weight", ("n_ff", "n_embd"), (0, FF)),
        T("ffn_down.weight", ("n_embd", "n_ff"), (1, FF)),
    )

    def __init__(self, a: BaseArgs, w: Weights, i: int, rope: ops.Rope):
        self.a, self.rope = a, rope
        for spec in self.TENSORS:
            setattr(self, spec.attr, w.load(f"blk.{i}.{spec.name}", spec, a))

    def qkv(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """x: (T, n_embd) residual stream -> q (T, n_head, hd), k and v (T, n_head_kv, hd) of
        its attn_norm, before RoPE."""
        a, t = self.a, x.shape[0]
        q, k, v = ops.norm_matmuls(x, self.attn_norm, a.norm_eps, self.attn_q, self.attn_k, self.attn_v)
        return (q.reshape(t, a.n_head, a.head_dim), k.reshape(t, a.n_head_kv, a.head_dim),
                v.reshape(t, a.n_head_kv, a.head_dim))

    # A layer is x + attn(x), then + ffn(x). Each half ends in a matrix product, so it is also
    # the sum of the same half computed over disjoint heads (ff rows) with the matching columns
    # of attn_output (ffn_down): placement runs these halves on slices of the block.
    def attn(self, x: np.ndarray, cache: ops.KVCache, pos0: int) -> np.ndarray:
        """x: (T, n_embd) residual stream -> the attention update (T, n_embd)."""
        q, k, v = self.qkv(x)
        return self.attn_output(ops.rope_attention(self.rope, q, k, v, cache, pos0))

    def ffn(self, x: np.ndarray) -> np.ndarray:
        """x: (T, n_embd) residual stream -> the feed-forward update (T, n_embd)."""
        gate, up = ops.norm_matmuls(x, self.ffn_norm, self.a.norm_eps, self.ffn_gate, self.ffn_up)
        return self.ffn_down(ops.swiglu(gate, up))

    def __call__(self, x: np.ndarray, cache: ops.KVCache, pos0: int) -> np.ndarray:
        """x: (T, n_embd) residual stream -> (T, n_embd)."""
        x = x + self.attn(x, cache, pos0)
        return x + self.ffn(x)


class Transformer:
    """token_embd -> blk[0..n_layer) -> output_norm -> output (tied to token_embd if absent)."""

    Args = BaseArgs
    Block = Block
    ROPE_NEOX = False
    # the tensors outside the blocks (the output head is tied to token_embd when absent)
    TENSORS = (
        T("token_embd.weight", ("n_vocab", "n_embd"), (0, ROWS)),
        T("rope_freqs.weight", ("rope_pairs",), optional=True),
        T("output_norm.weight", ("n_embd",)),
        T("output.weight", ("n_vocab", "n_embd"), (0, ROWS), optional=True),
    )

    def __init__(self, f: GGUFFile, progress=None):
        """progress(done, total): called after each block is built (loading and repacking a
        large model takes a while; the CLI shows a bar)."""
        self.args = a = self.Args.from_gguf(f)
        w = Weights(f)
        for spec in self.TENSORS:
            setattr(self, spec.attr, w.load(spec.name, spec, a))
        self.rope = self.make_rope(a, self.rope_freqs)
        self.blk = []
        for i in range(a.n_layer):
            self.blk.append(self.layer_class(a, i)(a, w, i, self.rope))
            if progress is not None:
                progress(i + 1, a.n_layer)
        if self.output is None:
            self.output = self.token_embd

    @classmethod
    def block_class(cls, a: BaseArgs) -> type:
        """The block class for this config (llama: dense or Mixture-of-Experts)."""
        return cls.Block

    @classmethod
    def layer_class(cls, a: BaseArgs, i: int) -> type:
        """The block class of layer i (deepseek2: dense leading layers, then MoE)."""
        return cls.block_class(a)

    @classmethod
    def layer_tensors(cls, a: BaseArgs, i: int) -> tuple[T, ...]:
        """The declarations layer i's file holds (an architecture may drop the optional ones
        its config does not use)."""
        return cls.layer_class(a, i).TENSORS

    @classmethod
    def declared(cls, a: BaseArgs) -> list[tuple[str, T]]:
        """(GGUF name, declaration) of every tensor this architecture reads, in file order."""
        top = {t.name: t for t in cls.TENSORS}
        head = [(n, top[n]) for n in ("token_embd.weight", "rope_freqs.weight")]
        blocks = [(f"blk.{i}.{t.name}", t) for i in range(a.n_layer) for t in cls.layer_tensors(a, i)]
        return head + blocks + [(n, top[n]) for n in ("output_norm.weight", "output.weight")]

    def make_rope(self, a: BaseArgs, factors: np.ndarray | None) -> ops.Rope:
        if a.rope_scaling_type not in ("none", "linear", "yarn"):
            raise UnsupportedError(f"RoPE scaling {a.rope_scaling_type!r} is not supported yet "
                                   f"(none, linear, yarn and Llama-3 rope_freqs are)")
        scale = 1.0 / a.rope_scaling_factor if a.rope_scaling_type != "none" and a.rope_scaling_factor else 1.0
        if a.rope_scaling_type != "yarn":
            return ops.Rope(a.rope_dim, float(a.rope_base), self.ROPE_NEOX, scale, factors)
        corr = ops.yarn_corr_dims(a.rope_dim, a.rope_scaling_orig_ctx or a.context_length,
                                  float(a.rope_base), a.rope_yarn_beta_fast, a.rope_yarn_beta_slow)
        return ops.Rope(a.rope_dim, float(a.rope_base), self.ROPE_NEOX, scale, factors,
                        ext_factor=1.0, corr_dims=corr, mscale=self.yarn_mscale(a))

    def yarn_mscale(self, a: BaseArgs) -> float:
        """YaRN's magnitude on the rotated dims: llama.cpp's cos/sin factor (attn_factor times
        1 + 0.1 ln(factor), the interpolation's entropy correction)."""
        return a.rope_attn_factor * (1.0 + 0.1 * math.log(max(a.rope_scaling_factor, 1.0)))

    def new_cache(self, n_ctx: int, type_k: str = DEFAULT_CACHE_TYPE,
                  type_v: str = DEFAULT_CACHE_TYPE) -> list[ops.KVCache]:
        """Each layer's empty cache, keys and values in cache types type_k / type_v."""
        a = self.args
        return [ops.KVCache(n_ctx, a.n_head_kv, a.head_dim, type_k=type_k, type_v=type_v)
                for _ in range(a.n_layer)]

    def linears(self) -> list[ops.Linear]:
        """Every weight matrix (placement walks these)."""
        mats = [self.token_embd] + [m for b in self.blk for m in vars(b).values()
                                    if isinstance(m, ops.Linear)]
        return mats + ([self.output] if self.output is not self.token_embd else [])

    def experts(self) -> list[ops.ExpertLinear]:
        """Every routed expert tensor (MoE blocks; placement's records of them included)."""
        return [m for b in self.blk for m in vars(b).values() if isinstance(m, ops.ExpertLinear)]

    def __call__(self, tokens: np.ndarray, cache: list[ops.KVCache], pos0: int,
                 last_only: bool = True) -> np.ndarray:
        """tokens: (T,) ids at positions pos0.. -> logits float32 (1 or T, n_vocab)."""
        x = self.token_embd.rows(tokens)                                   # (T, n_embd)
        for layer, c in zip(self.blk, cache):
            x = layer(x, c, pos0)
        if last_only:
            x = x[-1:]
        return self.output(ops.rms_norm(x, self.output_norm, self.args.norm_eps))
