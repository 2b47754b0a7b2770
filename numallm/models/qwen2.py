"""Qwen2 / Qwen2.5: llama with biases on the Q, K and V projections and NeoX (half-split) RoPE."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .base import HEADS, BaseArgs, Block, T, Transformer


@dataclass(frozen=True)
class ModelArgs(BaseArgs):
    rope_base: float = 1000000.0
    norm_eps: float = 1e-6


class QwenBlock(Block):
    TENSORS = Block.TENSORS + (
        T("attn_q.bias", ("q_dim",), (0, HEADS)),       # a bias follows its matrix's rows
        T("attn_k.bias", ("kv_dim",), (0, HEADS)),
        T("attn_v.bias", ("kv_dim",), (0, HEADS)),
    )

    def qkv(self, x: np.ndarray):
        q, k, v = super().qkv(x)
        a = self.a
        return (q + self.attn_q_bias.reshape(a.n_head, a.head_dim),
                k + self.attn_k_bias.reshape(a.n_head_kv, a.head_dim),
                v + self.attn_v_bias.reshape(a.n_head_kv, a.head_dim))


class Model(Transformer):
    Args = ModelArgs
    Block = QwenBlock
    ROPE_NEOX = True
