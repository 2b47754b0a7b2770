"""What the Mixture-of-Experts architectures share: the expert config (read from
`{arch}.expert_*` metadata and checked), and a block whose feed-forward is routed experts.

The architecture files combine these with their attention (qwen3moe: Qwen3's q/k norms,
qwen2moe: Qwen2's biases plus a shared expert, llama: Mixtral). Routing follows llama.cpp's
build_moe_ffn: softmax over all experts, the top k, renormalised where the architecture asks.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from .. import ops
from ..errors import GGUFError, UnsupportedError
from ..gguf_file import GGUFFile
from .base import FF_EXP, BaseArgs, Block, T


@dataclass(frozen=True)
class MoEArgs(BaseArgs):
    """BaseArgs' expert fields, read and checked (n_expert > 0 unless the architecture may be
    dense)."""

    # the model is MoE only (qwen*moe) or dense unless expert_count > 0 (llama)
    MOE_ONLY = True

    @classmethod
    def default_ff_exp(cls, v: dict) -> int:
        """llama.cpp's width when `expert_feed_forward_length` is absent."""
        return v["n_ff"] // max(v["n_expert_used"], 1)

    @classmethod
    def from_gguf(cls, f: GGUFFile) -> "MoEArgs":
        a = super().from_gguf(f)
        arch, n, used = a.arch, a.n_expert, a.n_expert_used
        if n == 0:
            if cls.MOE_ONLY:
                raise GGUFError(f"{f.path}: {arch}.expert_count is missing or 0; a {arch} model "
                                f"needs at least one expert; the file is corrupt")
            return a
        if not 0 < used <= n:
            raise GGUFError(f"{f.path}: {arch}.expert_used_count = {used} with {arch}.expert_count "
                            f"= {n}; each token must use 1..{n} experts; the file is corrupt")
        if "blk.0.ffn_gate.0.weight" in f.tensors:
            raise UnsupportedError(f"{f.path} stores its experts as per-expert 2-D tensors "
                                   f"(blk.N.ffn_gate.E.weight, an old Mixtral GGUF layout); "
                                   f"re-convert it with a current llama.cpp (3-D ffn_*_exps tensors)")
        v = dataclasses.asdict(a)
        ff_exp = a.n_ff_exp or cls.default_ff_exp(v)
        if ff_exp <= 0:
            raise GGUFError(f"{f.path}: no expert feed-forward width ({arch}.expert_feed_forward_"
                            f"length); the file is corrupt")
        return dataclasses.replace(a, n_ff_exp=ff_exp, n_ff_shexp=a.n_ff_shexp or a.n_ff)


def attention_tensors(block: type[Block]) -> tuple[T, ...]:
    """The attention part of a dense block's declaration (everything but the feed-forward)."""
    return tuple(t for t in block.TENSORS if not t.name.startswith("ffn_"))


# the routed feed-forward: router (kept whole), experts split by their ff rows
EXPERT_TENSORS = (
    T("ffn_norm.weight", ("n_embd",)),
    T("ffn_gate_inp.weight", ("n_expert", "n_embd")),
    T("ffn_gate_exps.weight", ("n_expert", "n_ff_exp", "n_embd"), (1, FF_EXP)),
    T("ffn_up_exps.weight", ("n_expert", "n_ff_exp", "n_embd"), (1, FF_EXP)),
    T("ffn_down_exps.weight", ("n_expert", "n_embd", "n_ff_exp"), (2, FF_EXP)),
)


class MoEBlock(Block):
    """A block whose feed-forward is k of n_expert SwiGLU experts, picked per token by a router.
    Subclasses combine it with their attention block (class X(MoEBlock, AttnBlock))."""

    TENSORS = attention_tensors(Block) + EXPERT_TENSORS
    RENORM = True              # renormalise the top-k weights (llama.cpp's norm_w)

    def routed(self, h: np.ndarray, logits: np.ndarray) -> np.ndarray:
        """h: (T, n_embd) normed input, logits: (T, n_expert) -> the experts' sum (T, n_embd)."""
        ids, w = ops.moe_route(logits, self.a.n_expert_used, self.RENORM)
        return ops.moe_ffn(h, ids, w, self.ffn_gate_exps, self.ffn_up_exps, self.ffn_down_exps)

    def ffn(self, x: np.ndarray) -> np.ndarray:
        h = ops.rms_norm(x, self.ffn_norm, self.a.norm_eps)
        return self.routed(h, self.ffn_gate_inp(h))
