"""How a model declares its tensors (no Numba, no data): the vocabulary that placement, the GPU
offload, the planner and the synthetic-model writer read. Block classes list `T` entries in their
`TENSORS`; see models/base.py.
"""
from __future__ import annotations

from dataclasses import dataclass

# How a declared tensor splits over nodes: (axis, unit) cuts that axis into whole units.
#   "heads": one KV head's share of the axis (its query heads for q, itself for k/v), so
#            attention runs each node's heads against its own KV cache;
#   "ff":    feed-forward rows;
#   "rows":  plain rows (the embedding and the output head);
#   "ff_exp": the routed experts' feed-forward rows (every expert's gate/up rows and down
#            columns, so each node's share of a token's work is the same whatever the router
#            picks);
#   "ff_shexp": the shared expert's feed-forward rows;
#   "mla_heads": Multi-head Latent Attention's per-head rows (deepseek2's q, kv_b, k_b/v_b and
#            attn_output columns); every head reads the one shared latent cache.
# None: every node (or device) keeps the whole tensor (norms, small vectors, the router).
HEADS, FF, ROWS, FF_EXP, FF_SHEXP = "heads", "ff", "rows", "ff_exp", "ff_shexp"
MLA_HEADS = "mla_heads"


@dataclass(frozen=True)
class T:
    """One declared tensor: `name` under `blk.N.` (or the model's top level), `shape` as config
    fields in numallm's (rows, cols) order, `split` as above, `optional`: the file may omit it,
    `role`: what it is to an executor that runs the block's attention with its own kernels
    (numallm.gpu.mla reads MLA's tensors by role, never by name; "" for the rest)."""

    name: str
    shape: tuple[str, ...]
    split: tuple[int, str] | None = None
    optional: bool = False
    role: str = ""

    @property
    def attr(self) -> str:
        """The attribute holding it: the GGUF name without ".weight", ".bias" as "_bias"."""
        base, _, kind = self.name.rpartition(".")
        return base if kind == "weight" else f"{base}_{kind}"

    @property
    def kind(self) -> str:
        """"matrix" (2-D, a Linear), "experts" (3-D (expert, rows, cols), an ExpertLinear),
        "bias" or "norm" (vectors)."""
        if len(self.shape) == 3:
            return "experts"
        if len(self.shape) == 2:
            return "matrix"
        return "bias" if self.name.endswith(".bias") else "norm"

    @property
    def routed(self) -> bool:
        """A routed expert tensor (3-D, split by the experts' rows); MLA's per-head 3-D tensors
        (attn_k_b, attn_v_b) are read every token and are not."""
        return self.kind == "experts" and self.split is not None and self.split[1] == FF_EXP
