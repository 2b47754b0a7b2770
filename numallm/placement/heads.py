"""Per-head operands (ops.HeadLinear: MLA's absorbed products) over NUMA nodes: each node holds
its heads' matrices in its own memory, and a product over all heads runs each head on its
node's threads (a node view's products run its heads on its own pool).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from .. import numa_mem, threads
from ..heads import HeadLinear


def _to_node(w, node: int | None):
    """Prepared weights `w` (an array or a dataclass of arrays) copied into node memory:
    (w, [arrays held]); node None: left where they are."""
    if isinstance(w, np.ndarray):
        arrs = {"": w}
    else:
        arrs = {f.name: v for f in dataclasses.fields(w) if isinstance(v := getattr(w, f.name), np.ndarray)}
    if node is None:
        return w, list(arrs.values())
    moved = {k: numa_mem.to_node(v, node, readonly=not v.flags.writeable) for k, v in arrs.items()}
    if isinstance(w, np.ndarray):
        return moved[""], [moved[""]]
    return dataclasses.replace(w, **moved), list(moved.values())


class LocalHeads(HeadLinear):
    """Node `group`'s heads [a, b) of a HeadLinear, in that node's memory (axis 0: heads are
    its "rows" for the placement report). Runs on the current pool (its node's)."""

    def __init__(self, src: HeadLinear, group: int, a: int, b: int, node: int | None):
        view = src.heads(a, b)
        self.unit, self.name, self.qtype, self.shape, self.nbytes = (
            view.unit, view.name, view.qtype, view.shape, view.nbytes)
        self.group, self.axis, self.a, self.b, self.full = group, 0, a, b, False
        self.ws, self.arrays = [], []
        for w in view.ws:
            w, arrays = _to_node(w, node)
            self.ws.append(w)
            self.arrays += arrays


class ShardedHeads(HeadLinear):
    """A HeadLinear split over nodes by heads: `ws` every head (each in its node's memory), and
    a product over all heads gives each node's threads its own heads (thread_groups)."""

    def __init__(self, src: HeadLinear, parts: list[LocalHeads], nodes: threads.NodePools):
        self.unit, self.name, self.qtype, self.shape, self.nbytes = (
            src.unit, src.name, src.qtype, src.shape, src.nbytes)
        self.parts, self.nodes = parts, nodes
        self.ws = [w for p in parts for w in p.ws]

    def pool(self):
        return self.nodes

    def thread_groups(self, pool) -> list[tuple[range, int, int]]:
        return [(self.nodes.tids(p.group), p.a, p.b) for p in self.parts]


def shard_heads(src: HeadLinear, per: list[tuple[int, int]], groups: list,
                nodes: threads.NodePools) -> ShardedHeads:
    """`src` cut into node i's heads per[i] (whole heads), each in groups[i]'s memory."""
    parts = [LocalHeads(src, i, a, b, g.mem_node) for i, (g, (a, b)) in enumerate(zip(groups, per))
             if b > a]
    src.ws = []                 # the build's prepared copy: the node parts replace it
    numa_mem.trim_heap()
    return ShardedHeads(src, parts, nodes)
