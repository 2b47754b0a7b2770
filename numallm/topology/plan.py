"""What a model needs and how it would sit on this machine: memory per node and decode ceilings.

Decoding one token reads every weight once plus the whole KV cache, so memory bandwidth bounds
speed: tok/s <= bandwidth / bytes read per token. These pure functions are shared by
`numallm topo MODEL` and the NUMA placement code.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

from ..errors import UnsupportedError
from .model import Node

GB = 1e9
# Without --bench: a rough sustained read bandwidth per physical core, capped per node
# (DDR4/DDR5 servers measure about 3-8 GB/s per core when every core streams).
ASSUMED_GBPS_PER_CORE = 4.0
ASSUMED_GBPS_NODE_CAP = 300.0
STRATEGIES = ("one_node", "sharded", "replicated")


@dataclass(frozen=True)
class ModelNeeds:
    arch: str
    weight_bytes: int            # all tensors as stored (sum of QTensor.nbytes)
    n_layer: int
    n_head_kv: int               # per layer (the largest, when it varies)
    kv_bytes_per_token: int      # K and V of every layer, float32

    @property
    def kv_bytes_per_1k(self) -> int:
        return self.kv_bytes_per_token * 1024

    def to_dict(self) -> dict:
        return {"arch": self.arch, "weight_bytes": self.weight_bytes, "n_layer": self.n_layer,
                "n_head_kv": self.n_head_kv, "kv_bytes_per_token": self.kv_bytes_per_token,
                "kv_bytes_per_1k_tokens": self.kv_bytes_per_1k}


def kv_bytes_per_token(n_layer: int, n_head_kv: int, key_dim: int, value_dim: int | None = None,
                       elem_bytes: int = 4) -> int:
    """K and V for one token over all layers: n_layer * n_head_kv * (key_dim + value_dim) * elem."""
    value_dim = key_dim if value_dim is None else value_dim
    return n_layer * n_head_kv * (key_dim + value_dim) * elem_bytes


def model_needs(gguf) -> ModelNeeds:
    """Needs of a numallm.gguf_file.GGUFFile (duck-typed: .metadata, .tensors, .path)."""
    md = gguf.metadata
    arch = md.get("general.architecture")
    if not isinstance(arch, str):
        raise UnsupportedError(f"{gguf.path}: no general.architecture key; `numallm topo MODEL` "
                               f"needs a model file, not a vocab-only GGUF")

    def num(key: str, default=None):
        v = md.get(f"{arch}.{key}", default)
        if v is None:
            raise UnsupportedError(f"{gguf.path}: metadata key {arch}.{key} is missing; cannot size "
                                   f"the KV cache (is this a {arch} model converted by llama.cpp?)")
        return v

    n_layer = int(num("block_count"))
    n_head = num("attention.head_count")
    n_kv = num("attention.head_count_kv", n_head)
    # some models give per-layer head counts as arrays (numpy, from GGUFFile)
    per_layer_kv = [int(n_kv)] * n_layer if isinstance(n_kv, (int, float)) else [int(x) for x in n_kv]
    head_max = int(n_head) if isinstance(n_head, (int, float)) else int(max(n_head))
    if head_max <= 0:
        raise UnsupportedError(f"{gguf.path}: {arch}.attention.head_count is {head_max}; the file "
                               f"is corrupt")
    key_dim = int(md.get(f"{arch}.attention.key_length", int(num("embedding_length")) // head_max))
    value_dim = int(md.get(f"{arch}.attention.value_length", key_dim))
    kv = sum(kv_bytes_per_token(1, h, key_dim, value_dim) for h in per_layer_kv[:n_layer])
    weights = sum(t.nbytes for t in gguf.tensors.values())
    return ModelNeeds(arch, int(weights), n_layer, max(per_layer_kv, default=0), int(kv))


def assumed_bandwidth(node: Node) -> float:
    return min(node.physical_cores * ASSUMED_GBPS_PER_CORE, ASSUMED_GBPS_NODE_CAP)


@dataclass(frozen=True)
class Placement:
    strategy: str                             # one_node, sharded, replicated
    nodes: tuple[int, ...]
    bytes_per_node: tuple[tuple[int, int], ...]  # (node, bytes of weights + KV it holds)
    bytes_per_token: int                      # read per decode step, all nodes together
    bandwidth_gbps: float                     # effective: what the slowest node allows
    tok_s_ceiling: float
    fits: str                                 # "yes" (in free memory), "tight" (in total), "no"

    def to_dict(self) -> dict:
        return {"strategy": self.strategy, "nodes": list(self.nodes),
                "bytes_per_node": {str(n): b for n, b in self.bytes_per_node},
                "bytes_per_token": self.bytes_per_token, "bandwidth_gbps": round(self.bandwidth_gbps, 2),
                "tok_s_ceiling": round(self.tok_s_ceiling, 3), "fits": self.fits}


def _fits(nodes: Sequence[Node], need: Mapping[int, int]) -> str:
    by_id = {n.id: n for n in nodes}
    if all(need[i] <= by_id[i].mem_free_bytes for i in need):
        return "yes"
    return "tight" if all(need[i] <= by_id[i].mem_total_bytes for i in need) else "no"


def plan_memory(needs: ModelNeeds, context: int, nodes: Sequence[Node],
                bandwidth_gbps: Mapping[int, float]) -> tuple[Placement, ...]:
    """Placements of a model with `context` tokens of KV cache over `nodes`, one per strategy.

    one_node:   weights and KV on the node with most free memory; its bandwidth alone.
    sharded:    weights and KV split evenly; each node reads its 1/N from local memory, so a step
                takes as long as the slowest node: tok/s = N * min(bw) / bytes_per_token.
    replicated: every node holds all weights (KV still split); same reads per node as sharded,
                N times the weight memory, no layout constraint on how work is split.
    """
    if not nodes:
        raise ValueError("plan_memory needs at least one node")
    kv = needs.kv_bytes_per_token * context
    per_token = needs.weight_bytes + kv
    n = len(nodes)
    ids = tuple(nd.id for nd in nodes)
    best = max(nodes, key=lambda nd: (nd.mem_free_bytes, -nd.id))
    slowest = min(bandwidth_gbps[i] for i in ids)
    shard = {i: -(-needs.weight_bytes // n) + -(-kv // n) for i in ids}
    replica = {i: needs.weight_bytes + -(-kv // n) for i in ids}
    one = {best.id: per_token}

    def ceiling(bw: float) -> float:
        return bw * GB / per_token if per_token else float("inf")

    return (
        Placement("one_node", (best.id,), tuple(one.items()), per_token, bandwidth_gbps[best.id],
                  ceiling(bandwidth_gbps[best.id]), _fits(nodes, one)),
        Placement("sharded", ids, tuple(shard.items()), per_token, n * slowest, ceiling(n * slowest),
                  _fits(nodes, shard)),
        Placement("replicated", ids, tuple(replica.items()), per_token, n * slowest,
                  ceiling(n * slowest), _fits(nodes, replica)),
    )
