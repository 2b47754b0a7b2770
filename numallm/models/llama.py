"""Llama 2/3.x, Mistral, TinyLlama, stories (llama2.c): the reference decoder.

RoPE rotates adjacent pairs (llama.cpp's "normal" mode; the converter permuted attn_q/attn_k so
this matches HF's rotate-half). Llama 3.1+ long-context scaling arrives as a `rope_freqs.weight`
tensor of per-frequency divisors, handled by the shared Transformer.
"""
from __future__ import annotations

from dataclasses import dataclass

from .base import BaseArgs, Transformer


@dataclass(frozen=True)
class ModelArgs(BaseArgs):
    pass


class Model(Transformer):
    Args = ModelArgs
    ROPE_NEOX = False
