"""Qwen3 (dense): llama with an RMS norm on each query and key head before RoPE (no biases),
an explicit head size (`attention.key_length`, often != n_embd / n_head) and NeoX RoPE."""
from __future__ import annotations

from dataclasses import dataclass

from .. import ops
from .base import BaseArgs, Block, T, Transformer


@dataclass(frozen=True)
class ModelArgs(BaseArgs):
    rope_base: float = 1000000.0
    norm_eps: float = 1e-6


class Qwen3Block(Block):
    TENSORS = Block.TENSORS + (
        T("attn_q_norm.weight", ("head_dim",)),         # one norm shared by every head
        T("attn_k_norm.weight", ("head_dim",)),
    )

    def qkv(self, x):
        q, k, v = super().qkv(x)
        return (ops.rms_norm(q, self.attn_q_norm, self.a.norm_eps),
                ops.rms_norm(k, self.attn_k_norm, self.a.norm_eps), v)


class Model(Transformer):
    Args = ModelArgs
    Block = Qwen3Block
    ROPE_NEOX = True
