"""What every architecture shares: config reading, weight lookup by GGUF name, the decoder-only
transformer skeleton. Architecture files subclass and change only what differs.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from .. import ops
from ..errors import GGUFError, UnsupportedError
from ..gguf_file import GGUFFile

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
                  "context_length"):
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
    def kv_bytes_per_token(self) -> int:
        """float32 K and V for every layer."""
        return 2 * self.n_layer * self.n_head_kv * self.head_dim * 4


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

    def vector(self, name: str, size: int) -> np.ndarray:
        """A small tensor (norm weight, bias) as a float32 copy (size,)."""
        qt = self.file.tensor(name)
        if qt.n_elements != size:
            raise GGUFError(f"{self.file.path}: tensor {name} has {qt.n_elements} elements, "
                            f"expected {size}; the file is corrupt")
        return qt.dequantize().reshape(size)


class Block:
    """One pre-norm decoder layer: attention then a SwiGLU feed-forward (llama family).
    Attribute names are the GGUF tensor names under `blk.N.`."""

    def __init__(self, a: BaseArgs, w: Weights, i: int, rope: ops.Rope):
        p = f"blk.{i}."
        self.a, self.rope = a, rope
        q_dim, kv_dim = a.n_head * a.head_dim, a.n_head_kv * a.head_dim
        self.attn_norm = w.vector(p + "attn_norm.weight", a.n_embd)
        self.attn_q = w.linear(p + "attn_q.weight", (q_dim, a.n_embd))
        self.attn_k = w.linear(p + "attn_k.weight", (kv_dim, a.n_embd))
        self.attn_v = w.linear(p + "attn_v.weight", (kv_dim, a.n_embd))
        self.attn_output = w.linear(p + "attn_output.weight", (a.n_embd, q_dim))
        self.ffn_norm = w.vector(p + "ffn_norm.weight", a.n_embd)
        self.ffn_gate = w.linear(p + "ffn_gate.weight", (a.n_ff, a.n_embd))
        self.ffn_up = w.linear(p + "ffn_up.weight", (a.n_ff, a.n_embd))
        self.ffn_down = w.linear(p + "ffn_down.weight", (a.n_embd, a.n_ff))

    def qkv(self, h: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """h: (T, n_embd) -> q (T, n_head, hd), k and v (T, n_head_kv, hd), before RoPE."""
        a, t = self.a, h.shape[0]
        q, k, v = ops.matmuls(h, self.attn_q, self.attn_k, self.attn_v)
        return (q.reshape(t, a.n_head, a.head_dim), k.reshape(t, a.n_head_kv, a.head_dim),
                v.reshape(t, a.n_head_kv, a.head_dim))

    # A layer is x + attn(x), then + ffn(x). Each half ends in a matrix product, so it is also
    # the sum of the same half computed over disjoint heads (ff rows) with the matching columns
    # of attn_output (ffn_down): placement runs these halves on slices of the block.
    def attn(self, x: np.ndarray, cache: ops.KVCache, pos0: int) -> np.ndarray:
        """x: (T, n_embd) residual stream -> the attention update (T, n_embd)."""
        q, k, v = self.qkv(ops.rms_norm(x, self.attn_norm, self.a.norm_eps))
        self.rope(q, pos0)
        self.rope(k, pos0)
        return self.attn_output(ops.attention(q, k, v, cache, pos0))

    def ffn(self, x: np.ndarray) -> np.ndarray:
        """x: (T, n_embd) residual stream -> the feed-forward update (T, n_embd)."""
        h = ops.rms_norm(x, self.ffn_norm, self.a.norm_eps)
        gate, up = ops.matmuls(h, self.ffn_gate, self.ffn_up)
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

    def __init__(self, f: GGUFFile):
        self.args = a = self.Args.from_gguf(f)
        w = Weights(f)
        self.rope = self.make_rope(a, w)
        self.token_embd = w.linear("token_embd.weight", (a.n_vocab, a.n_embd))
        self.blk = [self.Block(a, w, i, self.rope) for i in range(a.n_layer)]
        self.output_norm = w.vector("output_norm.weight", a.n_embd)
        self.output = (w.linear("output.weight", (a.n_vocab, a.n_embd)) if w.has("output.weight")
                       else self.token_embd)

    def make_rope(self, a: BaseArgs, w: Weights) -> ops.Rope:
        if a.rope_scaling_type not in ("none", "linear"):
            raise UnsupportedError(f"RoPE scaling {a.rope_scaling_type!r} is not supported yet "
                                   f"(none, linear and Llama-3 rope_freqs are)")
        scale = 1.0 / a.rope_scaling_factor if a.rope_scaling_type == "linear" and a.rope_scaling_factor else 1.0
        factors = w.vector("rope_freqs.weight", a.rope_dim // 2) if w.has("rope_freqs.weight") else None
        return ops.Rope(a.rope_dim, float(a.rope_base), self.ROPE_NEOX, scale, factors)

    def new_cache(self, n_ctx: int) -> list[ops.KVCache]:
        a = self.args
        return [ops.KVCache(n_ctx, a.n_head_kv, a.head_dim) for _ in range(a.n_layer)]

    def linears(self) -> list[ops.Linear]:
        """Every weight matrix (placement walks these)."""
        mats = [self.token_embd] + [m for b in self.blk for m in vars(b).values()
                                    if isinstance(m, ops.Linear)]
        return mats + ([self.output] if self.output is not self.token_embd else [])

    def __call__(self, tokens: np.ndarray, cache: list[ops.KVCache], pos0: int,
                 last_only: bool = True) -> np.ndarray:
        """tokens: (T,) ids at positions pos0.. -> logits float32 (1 or T, n_vocab)."""
        x = self.token_embd.rows(tokens)                                   # (T, n_embd)
        for layer, c in zip(self.blk, cache):
            x = layer(x, c, pos0)
        if last_only:
            x = x[-1:]
        return self.output(ops.rms_norm(x, self.output_norm, self.args.norm_eps))
