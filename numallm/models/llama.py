"""Llama 2/3.x, Mistral, TinyLlama, stories (llama2.c), and Mixtral (llama with
`llama.expert_count` > 0: routed experts, softmax over the top k, as llama.cpp builds it).

RoPE rotates adjacent pairs (llama.cpp's "normal" mode; the converter permuted attn_q/attn_k so
this matches HF's rotate-half). Llama 3.1+ long-context scaling arrives as a `rope_freqs.weight`
tensor of per-frequency divisors, handled by the shared Transformer.
"""
from __future__ import annotations

from dataclasses import dataclass

from .base import Transformer
from .moe import MoEArgs, MoEBlock


@dataclass(frozen=True)
class ModelArgs(MoEArgs):
    MOE_ONLY = False           # dense unless expert_count > 0

    @classmethod
    def default_ff_exp(cls, v: dict) -> int:
        return v["n_ff"]       # Mixtral's experts are feed_forward_length wide


class MixtralBlock(MoEBlock):
    RENORM = True


class Model(Transformer):
    Args = ModelArgs
    ROPE_NEOX = False

    @classmethod
    def block_class(cls, a: ModelArgs) -> type:
        return MixtralBlock if a.n_expert else cls.Block
