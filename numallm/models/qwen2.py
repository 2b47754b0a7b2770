"""Qwen2 / Qwen2.5: llama with biases on the Q, K and V projections and NeoX (half-split) RoPE."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .base import BaseArgs, Block, Transformer


@dataclass(frozen=True)
class ModelArgs(BaseArgs):
    rope_base: float = 1000000.0
    norm_eps: float = 1e-6


class QwenBlock(Block):
    def __init__(self, a, w, i, rope):
        super().__init__(a, w, i, rope)
        p = f"blk.{i}."
        self.attn_q_bias = w.vector(p + "attn_q.bias", a.n_head * a.head_dim)      # (q_dim,)
        self.attn_k_bias = w.vector(p + "attn_k.bias", a.n_head_kv * a.head_dim)   # (kv_dim,)
        self.attn_v_bias = w.vector(p + "attn_v.bias", a.n_head_kv * a.head_dim)

    def qkv(self, h: np.ndarray):
        q, k, v = super().qkv(h)
        a = self.a
        return (q + self.attn_q_bias.reshape(a.n_head, a.head_dim),
                k + self.attn_k_bias.reshape(a.n_head_kv, a.head_dim),
                v + self.attn_v_bias.reshape(a.n_head_kv, a.head_dim))


class Model(Transformer):
    Args = ModelArgs
    Block = QwenBlock
    ROPE_NEOX = True
