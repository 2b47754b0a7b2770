"""Routed experts over NUMA nodes, one copy of the weights: each node holds its share of EVERY
expert's feed-forward (gate/up rows [a, b) of each expert, the matching down columns) in its own
memory, so a token's work splits over the nodes alike whatever the router picks, and each node's
down products are a partial sum of the layer's output (one exchange per MoE layer, as the dense
feed-forward). `replicate` gives every node a whole copy instead and cuts the same rows of it.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from .. import numa_mem, threads
from ..errors import UnsupportedError
from ..experts import ExpertLinear, ExpertPart
from .sharded import Exchange, _localize


class LocalExperts(ExpertLinear):
    """One node's part of an ExpertLinear (E, N, K), in that node's memory: axis 0, rows [a, b)
    of every expert (gate/up: its ff rows); axis 1, whole-block columns [a, b) of every expert
    (down: its ff columns); `full`: every node holds the whole tensor (replicate) and computes
    rows [a, b) of it; `experts` (e0, e1): only those experts, whole (--moe-split experts; the
    other entries of `ws` are None). `arrays`: the node-memory arrays it holds (what the report
    checks)."""

    def __init__(self, src: ExpertLinear, group: int, axis: int, a: int, b: int,
                 node: int | None, full: bool = False, experts: tuple[int, int] | None = None):
        # not ExpertLinear.__init__: the weights come prepared from node memory
        self.unit, self.name, self.qtype = src.unit, src.name, src.qtype
        n_exp, n, k = src.shape
        self.group, self.axis, self.a, self.b, self.full = group, axis, a, b, full
        self.experts = experts or (0, n_exp)
        e0, e1 = self.experts
        unit, raw = src.unit, src.raw                  # (E * N, row_bytes)
        if full or experts:
            lo, hi, cols = 0, n, slice(None)
        elif axis == 0:
            if a % unit.row_multiple or b % unit.row_multiple and b != n:
                raise UnsupportedError(f"{src.name}: rows [{a}, {b}) of each expert cut the "
                                       f"{src.qtype.name} kernels' {unit.row_multiple}-row groups")
            lo, hi, cols = a, b, slice(None)
        else:
            bs, ts = unit.block_size, unit.type_size
            if a % bs or b % bs:
                raise UnsupportedError(f"{src.name}: columns [{a}, {b}) cut {bs}-value quant blocks")
            lo, hi, cols = 0, n, slice(a // bs * ts, b // bs * ts)
        self.ws, self.arrays = [], []              # filled expert by expert: `add`
        self._src, self._node, self._cut = src, node, (lo, hi, cols)
        self.shape = (src.shape if full or experts else (n_exp, b - a, k) if axis == 0
                      else (n_exp, n, b - a))
        row_bytes = raw.shape[1]
        self.nbytes = (e1 - e0) * ((hi - lo) * row_bytes if axis == 0 or full
                                   else n * (b - a) * row_bytes // k)
        self.raw = None

    def add(self, e: int) -> None:
        """Expert e's part, prepared in node memory (experts are added in order)."""
        (lo, hi, cols), n = self._cut, self._src.shape[1]
        if self.experts[0] <= e < self.experts[1]:
            w, arrays = _localize(self.unit, self._src.raw[e * n + lo:e * n + hi, cols], self._node)
            self.ws.append(w)
            self.arrays += arrays
        else:
            self.ws.append(None)
        if e + 1 == self._src.shape[0]:
            self._src = None

    def moe_parts(self, up: "LocalExperts", down: "LocalExperts", pool) -> list[ExpertPart]:
        """As ExpertLinear's (one node leader's whole part), over this part's experts only."""
        return [dataclasses.replace(p, experts=self.experts)
                for p in super().moe_parts(up, down, pool)]


def _fill(src: ExpertLinear, parts: list[LocalExperts]) -> None:
    """Every part's experts, expert by expert, each expert's file pages dropped once every node
    has its copy (a column cut cannot drop them itself) and the build's copy of it handed back."""
    n = src.shape[1]
    for e in range(src.shape[0]):
        for p in parts:
            p.add(e)
        numa_mem.release_file_pages(src.raw[e * n:(e + 1) * n])


class ShardedExperts(ExpertLinear):
    """An ExpertLinear split over nodes into LocalExperts parts (one per node with a share).
    moe_ffn asks it how to cut a routed feed-forward: node i's threads run node i's parts of
    gate, up and down (`moe_parts`), and the nodes' down outputs are summed by the Exchange
    (shard) or are row ranges of one output (replicate)."""

    def __init__(self, src: ExpertLinear, parts: list[LocalExperts], nodes: threads.NodePools,
                 exchange: Exchange):
        self.unit, self.name, self.qtype, self.shape = src.unit, src.name, src.qtype, src.shape
        self.nbytes, self.raw, self.ws = src.nbytes, None, None
        self.parts, self.nodes, self.exchange = parts, nodes, exchange
        self.axis = 0            # as ShardedLinear's records: the report reads each part's axis

    def pool(self) -> threads.NodePools:
        return self.nodes

    def moe_parts(self, up: "ShardedExperts", down: "ShardedExperts", pool) -> list[ExpertPart]:
        ups, downs = {p.group: p for p in up.parts}, {p.group: p for p in down.parts}
        out = []
        for g in self.parts:
            u, d = ups[g.group], downs[g.group]
            tids = self.nodes.tids(g.group)
            if g.full:           # replicate: one shared buffer, node rows of every output
                out.append(ExpertPart(tids, g, u, d, (g.a, g.b), self.shape[1], 0, (d.a, d.b)))
            elif g.experts != (0, self.shape[0]):   # whole experts: their rows of one output
                out.append(ExpertPart(tids, g, u, d, (0, self.shape[1]), self.shape[1], 0,
                                      (0, d.shape[1]), g.experts))
            else:                # shard: the node's own ff columns, a partial sum of the output
                out.append(ExpertPart(tids, g, u, d, (0, g.b - g.a), g.b - g.a, g.group,
                                      (0, d.shape[1])))
        return out

    def reduce(self, outs: list[np.ndarray]) -> np.ndarray:
        return outs[0] if len(outs) == 1 else self.exchange.allreduce(outs)


def shard_experts(src: ExpertLinear, axis: int, per: list[tuple[int, int]], groups: list,
                  nodes: threads.NodePools, exchange: Exchange) -> ShardedExperts:
    """`src` cut along `axis` (1: each expert's rows, 2: its columns) into node i's range
    per[i], each in node i's memory; the build's prepared copy is dropped."""
    _drop_copy(src)            # first: the slices are read from the file, not from it
    parts = [LocalExperts(src, i, axis - 1, s, e, g.mem_node)
             for i, (g, (s, e)) in enumerate(zip(groups, per)) if e > s]
    _fill(src, parts)
    return ShardedExperts(src, parts, nodes, exchange)


def shard_whole_experts(src: ExpertLinear, per: list[tuple[int, int]], groups: list,
                        nodes: threads.NodePools, exchange: Exchange) -> ShardedExperts:
    """`src` cut by experts: node i holds experts per[i] whole, in its memory."""
    _drop_copy(src)
    parts = [LocalExperts(src, i, 0, 0, src.shape[1], g.mem_node, experts=(s, e))
             for i, (g, (s, e)) in enumerate(zip(groups, per)) if e > s]
    _fill(src, parts)
    return ShardedExperts(src, parts, nodes, exchange)


def _drop_copy(src: ExpertLinear) -> None:
    """The build's prepared copy, which node copies replace, handed back to the kernel."""
    src.ws = None
    numa_mem.trim_heap()


def replicate_experts(src: ExpertLinear, per: list[tuple[int, int]], groups: list,
                      nodes: threads.NodePools, exchange: Exchange) -> ShardedExperts:
    """A whole copy of `src` in every node's memory; node i computes rows per[i] of each
    expert's output from its copy."""
    _drop_copy(src)
    parts = [LocalExperts(src, i, 0, s, e, g.mem_node, full=True)
             for i, (g, (s, e)) in enumerate(zip(groups, per))]
    _fill(src, parts)
    return ShardedExperts(src, parts, nodes, exchange)
