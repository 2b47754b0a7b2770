"""Qwen2-MoE (Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B): Qwen2 attention (q/k/v biases, NeoX RoPE);
routed experts with plain softmax weights (not renormalised, as llama.cpp builds qwen2moe) plus
one shared expert every token runs, scaled by sigmoid(h . ffn_gate_inp_shexp)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import ops
from .base import FF_SHEXP, T, Transformer
from .moe import EXPERT_TENSORS, MoEArgs, MoEBlock, attention_tensors
from .qwen2 import QwenBlock


@dataclass(frozen=True)
class ModelArgs(MoEArgs):
    rope_base: float = 1000000.0
    norm_eps: float = 1e-6


class Qwen2MoEBlock(MoEBlock, QwenBlock):
    TENSORS = attention_tensors(QwenBlock) + EXPERT_TENSORS + (
        T("ffn_gate_inp_shexp.weight", ("n_embd",)),      # the shared expert's gate: a vector
        T("ffn_gate_shexp.weight", ("n_ff_shexp", "n_embd"), (0, FF_SHEXP)),
        T("ffn_up_shexp.weight", ("n_ff_shexp", "n_embd"), (0, FF_SHEXP)),
        T("ffn_down_shexp.weight", ("n_embd", "n_ff_shexp"), (1, FF_SHEXP)),
    )
    RENORM = False

    def ffn(self, x: np.ndarray) -> np.ndarray:
        h = ops.rms_norm(x, self.ffn_norm, self.a.norm_eps)
        # the router and the shared expert read the same input: one dispatch
        logits, g, u = ops.matmuls(h, self.ffn_gate_inp, self.ffn_gate_shexp, self.ffn_up_shexp)
        # routed first: where the experts run elsewhere (the CPU, for a block on a GPU) the
        # shared expert is computed meanwhile
        routed = self.routed(h, logits)
        shared = self.ffn_down_shexp(ops.swiglu(g, u))                    # (T, n_embd)
        return routed + ops.sigmoid_gate(shared, h, self.ffn_gate_inp_shexp)

class Model(Transformer):
    Args = ModelArgs
    Block = Qwen2MoEBlock
    ROPE_NEOX = True
