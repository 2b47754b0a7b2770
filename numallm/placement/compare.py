"""The strategies side by side for `numallm topo MODEL`: each one's plan (make_plan, the same
bytes `load` would place), whether it fits, and its decode-speed ceiling.

Decoding one token reads every weight once plus the KV cache, so tok/s <= bandwidth / bytes read
per token. Sharded and replicated nodes each read their threads' share of the weights from local
memory (shard: and the KV cache each node holds; MLA's latent is a whole copy per node), so a
step takes as long as the slowest node; isolate reads everything on one node.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..cache_types import DEFAULT_CACHE_TYPE
from .plan import Request, make_plan
from .spec import ModelSpec

COMPARED = ("isolate", "shard", "replicate")


@dataclass(frozen=True)
class Option:
    strategy: str
    nodes: tuple[int, ...]
    bytes_per_node: tuple[tuple[int, int], ...]   # (node, weights + KV cache + scratch)
    bytes_per_token: int                          # read per decode step, all nodes together
    bandwidth_gbps: float                         # effective: what the slowest node allows
    tok_s_ceiling: float
    fits: str                                     # "yes" (in free memory), "tight" (in total), "no"

    def to_dict(self) -> dict:
        return {"strategy": self.strategy, "nodes": list(self.nodes),
                "bytes_per_node": {str(n): b for n, b in self.bytes_per_node},
                "bytes_per_token": self.bytes_per_token, "bandwidth_gbps": round(self.bandwidth_gbps, 2),
                "tok_s_ceiling": round(self.tok_s_ceiling, 3), "fits": self.fits}


def compare(spec: ModelSpec, topo, n_ctx: int, node_ids: list[int],
            bandwidth: dict[int, float], cache_types: tuple[str, str] = (DEFAULT_CACHE_TYPE,) * 2) -> list[Option]:
    """One Option per strategy over `node_ids` (isolate: the one with most free memory), the KV
    cache in cache_types (K, V)."""
    by_id = {n.id: n for n in topo.nodes}
    best = max(node_ids, key=lambda i: (by_id[i].mem_free_bytes, -i))
    out = []
    for strategy in COMPARED:
        ids = (best,) if strategy == "isolate" else tuple(node_ids)
        plan = make_plan(spec, topo, Request(numa=strategy, n_ctx=n_ctx, nodes=ids,
                                             cache_type_k=cache_types[0],
                                             cache_type_v=cache_types[1]))
        threads = sum(n.n_threads for n in plan.nodes) or 1
        share = [n.n_threads / threads for n in plan.nodes]
        # each node reads its threads' share of the weights (MoE: of the used experts) per step,
        # and of the KV cache: shard, the cache it holds (MLA: a whole latent copy per node)
        kv = [n.kv / plan.n_seq if strategy == "shard" else plan.kv_bytes * f
              for n, f in zip(plan.nodes, share)]
        per_token = spec.active_bytes + max(plan.kv_bytes, int(sum(kv)))
        step_s = max((spec.active_bytes * f + k) / (bandwidth[n.node] * 1e9)
                     for n, f, k in zip(plan.nodes, share, kv))
        need = {n.node: n.total for n in plan.nodes}
        fits = ("yes" if all(b <= by_id[i].mem_free_bytes for i, b in need.items()) else
                "tight" if all(b <= by_id[i].mem_total_bytes for i, b in need.items()) else "no")
        out.append(Option(strategy, tuple(need), tuple(need.items()), per_token,
                          per_token / step_s / 1e9, 1.0 / step_s if step_s else float("inf"), fits))
    return out


def render(path: str, spec: ModelSpec, n_ctx: int, options: list[Option], how: str,
           cache_types: tuple[str, str] = (DEFAULT_CACHE_TYPE,) * 2) -> list[str]:
    from ..topology.sysfs import format_cpulist

    def size(n: int) -> str:
        return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"

    a = spec.args
    out = [f"model {path} ({a.arch}): weights {size(spec.weight_bytes)}, KV cache "
           f"{size(a.kv_bytes(1024, *cache_types))} per 1k tokens ({'/'.join(dict.fromkeys(cache_types))}), "
           f"{n_ctx} tokens: {size(a.kv_bytes(n_ctx, *cache_types))}",
           f"decode ceiling: tok/s <= bandwidth / bytes read per token "
           f"({size(options[0].bytes_per_token)}); bandwidth {how}"]
    if a.n_expert:
        out.insert(1, f"experts: {a.n_expert_used} of {a.n_expert} per token; a token reads "
                      f"{size(spec.active_bytes)} of the {size(spec.weight_bytes)} of weights, and the KV cache")
    for p in options:
        mem = ", ".join(f"node {n}: {size(b)}" for n, b in p.bytes_per_node)
        fit = {"yes": "fits in free memory", "tight": "fits only after freeing memory",
               "no": "DOES NOT FIT"}[p.fits]
        out.append(f"  {p.strategy:<10} nodes {format_cpulist(p.nodes)}: {mem}; {fit}; "
                   f"{p.bandwidth_gbps:.0f} GB/s -> <= {p.tok_s_ceiling:.1f} tok/s")
    return out
