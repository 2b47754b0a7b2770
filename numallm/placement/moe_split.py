"""How `--numa shard` splits a MoE layer's routed experts over the nodes (`--moe-split`).

ff (the default): every node holds its share of EVERY expert's feed-forward rows (the matching
down columns), so each token's work splits over the nodes alike whatever the router picks, and
the decode dispatch is encoded once (the slots' tasks only change their weight addresses).
experts: whole experts per node (expert parallel, ranges of expert ids in proportion to the
nodes' threads); a token's k picks then fall on the nodes unevenly (a node with none of them
idles while the other works), and a decode step's tasks depend on where its picks live, so its
dispatch is built per token. Either way one copy of the weights and one partial-sum exchange per
MoE layer; the shared expert (qwen2moe) is always split by its ff rows.
"""
from __future__ import annotations

from ..errors import NumallmError

MOE_SPLITS = ("auto", "ff", "experts")
EXPERTS = "experts"          # a split unit of the plan: expert ids [a, b) per node


def choose(args, asked: str, strategy: str, n_nodes: int) -> tuple[str, str | None]:
    """(split, one line for auto's choice or None) for a model with `args` under `strategy`."""
    if not args.n_expert or strategy != "shard" or n_nodes < 2:
        return "ff", None
    if asked == "experts" and args.n_expert < n_nodes:
        raise NumallmError(f"--moe-split experts: {args.n_expert} experts per layer cannot give "
                           f"each of {n_nodes} nodes one; use --moe-split ff")
    if asked != "auto":
        return asked, None
    return "ff", (f"moe split auto: ff (each node a share of all {args.n_expert} experts: every "
                  f"token's {args.n_expert_used} picks split evenly over the {n_nodes} nodes; "
                  f"whole experts per node (--moe-split experts) leave a node idle when the picks "
                  f"fall unevenly, and build each decode step's dispatch anew)")
