"""Read bandwidth the machine is assumed to have when it was not measured (`topo --bench`).

Decoding one token reads every weight once plus the KV cache, so memory bandwidth bounds speed:
tok/s <= bandwidth / bytes read per token. numallm.placement plans with these figures.
"""
from __future__ import annotations

from .model import Node

GB = 1e9
# Without --bench: a rough sustained read bandwidth per physical core, capped per node
# (DDR4/DDR5 servers measure about 3-8 GB/s per core when every core streams).
ASSUMED_GBPS_PER_CORE = 4.0
ASSUMED_GBPS_NODE_CAP = 300.0


def assumed_bandwidth(node: Node) -> float:
    """GB/s: the node's stated figure (a --topology file's mem_bandwidth_gbps), else per core."""
    if node.mem_bandwidth_gbps is not None:
        return node.mem_bandwidth_gbps
    return min(node.physical_cores * ASSUMED_GBPS_PER_CORE, ASSUMED_GBPS_NODE_CAP)
