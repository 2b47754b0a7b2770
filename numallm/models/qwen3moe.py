"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): Qwen3 attention (per-head q/k RMS norms, NeoX
RoPE) and routed experts only; softmax routing with the top-k weights renormalised (llama.cpp
builds qwen3moe with norm_w)."""
from __future__ import annotations

from dataclasses import dataclass

from .base import Transformer
from .moe import EXPERT_TENSORS, MoEArgs, MoEBlock, attention_tensors
from .qwen3 import Qwen3Block


@dataclass(frozen=True)
class ModelArgs(MoEArgs):
    rope_base: float = 1000000.0
    norm_eps: float = 1e-6


class Qwen3MoEBlock(MoEBlock, Qwen3Block):
    TENSORS = attention_tensors(Qwen3Block) + EXPERT_TENSORS
    RENORM = True


class Model(Transformer):
    Args = ModelArgs
    Block = Qwen3MoEBlock
    ROPE_NEOX = True
