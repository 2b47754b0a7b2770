"""Placement: the one owner of "what runs where". A pure planner (plan.py) turns the model's
declared tensors and config, the topology, the GPUs and the request into one Plan; `apply`
(runtime.py) makes a built model run that way (sharded.py: slices, per-node caches and blocks).

    plan = make_plan(ModelSpec.from_gguf(f), topo, Request(numa="shard", n_ctx=4096))
    placement = apply_plan(model, plan, topo)          # the model's layers now run per node
    with threads.activate(placement.pool): model(...)
    placement.report()                                 # per slice: node, bytes, share of local pages

Strategies
  shard:     one copy of the weights split over the nodes in proportion to their threads; each node
             computes its slices with its own pinned threads from its own memory, and keeps the
             KV cache of its attention heads.
  replicate: a full copy of every matrix in every node's memory; each matrix product's rows are
             split over the nodes and each node's threads read their rows from their own copy;
             attention runs on node 0. N x the weight memory, but the split ignores head
             boundaries: for models whose few KV heads cannot be spread over the nodes.
  isolate:   everything on one node (its memory, its threads).
  off:       no node placement; an unpinned pool over the allowed cores (the repacked weights
             are copied into shared blocks for huge pages, numa_mem.pack).
  auto:      `decide` picks one of these and says why in one line.

Sharded layer flow (tensor parallelism as Megatron-LM splits a layer). Node i holds KV heads H_i,
each query head with its KV head, and feed-forward rows F_i:

    norm(x) -> q, k, v rows of H_i -> RoPE -> K, V into node i's cache -> attention of H_i
        -> attn_output[:, columns of H_i] @ it = node i's partial (T, n_embd)     on node i
    x += sum of the partials                                      cross-node sync 1 (allreduce)
    norm(x) -> gate, up rows F_i -> silu(gate) * up -> ffn_down[:, F_i] @ it = a partial
    x += sum of the partials                                      cross-node sync 2 (allreduce)

so 2 cross-node syncs per layer, plus 1 per forward for the output matrix (split by rows,
gathered); the embedding lookup reads one row wherever it lives. Column slices fall on
quant-block boundaries (32 values for legacy types, 256 for K-quants): KV heads are grouped so a
node's attn_output columns are whole blocks. Partial sums change the order of float additions,
so logits differ from `off` at float32 rounding. Replicate runs the block's own code with every
product's rows split over the nodes: 4 cross-node syncs per layer (q/k/v together, attn_output,
gate/up together, down).

Who runs the Python. A prefill (T > 1) runs each node's half-layer on its leader thread, and
inside a node each product joins that node's threads only. A decode step (T = 1) is too short
for that: two Python leaders take turns on the GIL at every op (measured: 84 us mean start delay
per join, ~20% of a 1B model's token on 2 virtual nodes). So a decode step runs the block's own
code once, on the caller, over ShardedLinear records of the slices, and every product and the
attention are *flat* dispatches of native tasks (NodePools.run_tasks): each node's threads get
their node's slices and KV heads, run them inside Numba without the GIL, and only the caller
runs Python. That is 5 joins per layer (q/k/v, attention, attn_output partials, gate/up,
ffn_down partials), each a few microseconds, of which the 2 partial sums are the data exchanged.

All cross-node data movement goes through `Exchange`; `Placement.sync_stats()` gives the joins and
the time they cost. Virtual nodes (carved from one real node) allocate on the real node they came
from; the report says so. Model files are untouched: a ShardedBlock runs the block's own
`attn` / `ffn` code on per-node views of it and is swapped in as the block's attn / ffn (the
block's __call__ adds them to the residual stream as always), and `adopt_cache` swaps the
engine's cache of each sharded layer for per-node caches (layers the GPU offload moved are left
alone).
"""
from .plan import (DECODE_JOINS_PER_LAYER, DEFAULT_CTX, JOIN_COST_S, PREFILL_CHUNK, STRATEGIES,
                   Needs, NodePlan, OutOfMemoryError, Plan, Request, assumed_bandwidth, decide,
                   default_ctx, heads_per_unit, make_plan, node_threads, split_units)
from .spec import ModelSpec

# execution (runtime.py, sharded.py) loads Numba: imported on first use, so planning stays light
_LAZY = {"runtime": ("KVReport", "NodeGroup", "Placement", "SliceReport", "SyncStats", "apply", "apply_plan"),
         "sharded": ("Exchange", "LocalLinear", "NodeCaches", "ShardedBlock", "ShardedLinear", "_slice")}


def __getattr__(name: str):
    import importlib

    for module, names in _LAZY.items():
        if name in names:
            return getattr(importlib.import_module(f"{__name__}.{module}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = ["KVReport", "NodeGroup", "Placement", "SliceReport", "SyncStats", "apply", "apply_plan",
           "DECODE_JOINS_PER_LAYER", "DEFAULT_CTX", "JOIN_COST_S", "PREFILL_CHUNK", "STRATEGIES",
           "ModelSpec", "Needs", "NodePlan", "OutOfMemoryError", "Plan", "Request", "assumed_bandwidth",
           "decide", "default_ctx", "heads_per_unit", "make_plan", "node_threads", "split_units",
           "Exchange", "LocalLinear", "NodeCaches", "ShardedBlock", "ShardedLinear", "_slice"]
