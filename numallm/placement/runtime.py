"""Applying a Plan to a built model: the Placement object (pool, slices, reports) and `apply`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .. import numa_mem, ops, threads
from ..placement_check import pct
from .plan import Plan, Request, make_plan, split_units
from .spec import ModelSpec
from .experts import replicate_experts, shard_experts
from .sharded import Exchange, LocalLinear, ShardedBlock, ShardedLinear, _localize, _slice

GiB = 2 ** 30


@dataclass(frozen=True)
class NodeGroup:
    """A topology node as execution sees it: its threads' CPU set and where its memory goes.

    mem_node: the real memory node slices are allocated on (None: placement is a no-op)."""

    node: int
    cpus: tuple[int, ...]
    n_threads: int
    mem_node: int | None


@dataclass(frozen=True)
class SliceReport:
    tensor: str
    node: int                 # topology node (virtual or real)
    mem_node: int | None      # real memory node the slice was allocated on
    rows: tuple[int, int]     # output rows [r0, r1) of the full matrix
    nbytes: int               # bytes held on the node (replicate: the node's whole copy)
    local: float | None       # share of the slice's pages on mem_node; None: not verifiable
    cols: tuple[int, int] | None = None   # input columns [c0, c1) of a column slice


@dataclass(frozen=True)
class KVReport:
    layer: int
    node: int
    mem_node: int | None
    heads: tuple[int, int]    # KV heads [h0, h1) of the layer
    nbytes: int
    local: float | None       # share of the touched pages on mem_node; None: none touched / not verifiable


@dataclass(frozen=True)
class SyncStats:
    """Cross-node synchronisation so far: `joins` node joins (NodePools.run_nodes), `wall_s` the
    caller's time in them, `slowest_s` the slowest node's own work in them, `exchange_s` time in
    Exchange reduces and gathers. sync_s = wall - slowest + exchange is what synchronising cost
    on top of the work; subtract two snapshots for an interval."""

    joins: int = 0
    wall_s: float = 0.0
    slowest_s: float = 0.0
    exchange_s: float = 0.0

    @property
    def sync_s(self) -> float:
        return self.wall_s - self.slowest_s + self.exchange_s

    def __sub__(self, o: "SyncStats") -> "SyncStats":
        return SyncStats(self.joins - o.joins, self.wall_s - o.wall_s, self.slowest_s - o.slowest_s,
                         self.exchange_s - o.exchange_s)


def _groups(use: list[tuple[int, tuple[int, ...], int]], topo) -> list[NodeGroup]:
    mem = numa_mem.status()
    by_id = {nd.id: nd for nd in topo.nodes}
    out = []
    for nid, cpus, n in use:
        real = by_id[nid].real_node if topo.virtual else nid
        out.append(NodeGroup(nid, cpus, n, real if mem.available and real in mem.nodes else None))
    return out


# -- the placement -------------------------------------------------------------------------------

class Placement:
    """The result of `apply`: the pool to activate, per-slice records, and what was degraded."""

    def __init__(self, strategy: str, groups: list[NodeGroup], pool, virtual: bool,
                 notes: list[str], reason: str | None = None, plan: Plan | None = None):
        self.strategy, self.groups, self.pool, self.virtual = strategy, groups, pool, virtual
        self.notes, self.reason, self.plan = notes, reason, plan
        self.linears: list[ShardedLinear] = []
        self.blocks: list[ShardedBlock] = []
        self.exchange = Exchange()

    def adopt_cache(self, cache: list) -> list:
        """The engine's per-layer cache list with each sharded layer's entry replaced by its
        per-node caches (NodeCaches; the host arrays it replaces were never touched)."""
        by_layer = {b.layer: b for b in self.blocks}
        return [by_layer[i].make_cache(c) if i in by_layer and isinstance(c, ops.KVCache)
                else c for i, c in enumerate(cache)]

    def sync_stats(self) -> SyncStats | None:
        """Joins and their cost so far (None for off: no node joins)."""
        if not isinstance(self.pool, threads.NodePools):
            return None
        p = self.pool
        return SyncStats(p.joins, p.wall_s, p.slowest_s, self.exchange.seconds)

    def report(self) -> list[SliceReport]:
        """Per slice: where it should be and the share of its pages the kernel reports there."""
        out = []
        for lin in self.linears:
            for p in lin.parts:
                g = self.groups[p.group]
                counts = [numa_mem.where(a) if g.mem_node is not None else None for a in p.arrays]
                local = None
                if all(c is not None for c in counts):
                    total = sum(sum(c.values()) for c in counts)
                    local = sum(c.get(g.mem_node, 0) for c in counts) / total if total else 1.0
                rows, cols = ((p.a, p.b), None) if p.axis == 0 else ((0, lin.shape[-2]), (p.a, p.b))
                out.append(SliceReport(lin.name, g.node, g.mem_node, rows,
                                       sum(a.nbytes for a in p.arrays), local, cols))
        return out

    def kv_report(self) -> list[KVReport]:
        """Per layer and node: the KV cache the last new_cache made, and the share of its pages
        that were written so far (untouched pages have no node yet) on the intended node."""
        out = []
        for b in self.blocks:
            cache = b._last_cache()
            if cache is None:
                continue
            for i, c in enumerate(cache.parts):
                if c is None:
                    continue
                node = self.groups[i].mem_node
                local = None
                if node is not None:
                    counts = [numa_mem.where(x) for x in c.arrays]
                    present = sum(v for cn in counts for k, v in cn.items() if k >= 0)
                    local = sum(cn.get(node, 0) for cn in counts) / present if present else None
                out.append(KVReport(b.layer, self.groups[i].node, node, b.heads[i], c.nbytes, local))
        return out

    def summary(self, min_local: float = 1.0) -> str:
        """A few lines for /stats and `topo --verify`: bytes and local pages per node, with a
        WARNING where a slice or the KV cache has less than `min_local` of its pages on its node
        (placement_check's threshold: 1.0 = every page)."""
        head = [self.reason] if self.reason else []
        if self.strategy == "off":
            return "\n".join(head + ["numa: off (one unpinned pool; weights in huge-page blocks, no node placement)"])
        rep, kv = self.report(), self.kv_report()
        lines = head + [f"numa: {self.strategy} over {len(self.groups)} "
                        f"{'virtual ' if self.virtual else ''}node(s)"]
        for g in self.groups:
            mine = [r for r in rep if r.node == g.node]
            nbytes = sum(r.nbytes for r in mine)
            where = f"memory node {g.mem_node}" if g.mem_node is not None else "memory not placed"
            checked = [r for r in mine if r.local is not None]
            locs = [r.local for r in checked]
            local_bytes = sum(r.local * r.nbytes for r in checked)
            share = (f"{pct(local_bytes / max(sum(r.nbytes for r in checked), 1))} local pages"
                     if checked else "pages not verified")
            worst = min(locs, default=1.0)
            warn = (f" WARNING: a slice has only {pct(worst)} local pages" if worst < min_local
                    else "")
            lines.append(f"  node {g.node}: {g.n_threads} threads on CPUs "
                         f"{','.join(map(str, g.cpus))}, {len(mine)} slices, {nbytes / 2**20:.1f} MiB "
                         f"on {where}, {share}{warn}")
            kmine = [k for k in kv if k.node == g.node]
            if kmine:
                seen = [k.local for k in kmine if k.local is not None]
                kshare = (f"{pct(min(seen))} of written pages local (worst layer)" if seen
                          else "no pages written yet" if g.mem_node is not None else "pages not verified")
                warn = " WARNING: KV pages off their node" if seen and min(seen) < min_local else ""
                lines.append(f"    KV cache of its heads: {sum(k.nbytes for k in kmine) / 2**20:.1f} MiB, "
                             f"{kshare}{warn}")
        st = self.sync_stats()
        if st and st.joins:
            lines.append(f"  cross-node joins: {st.joins} so far ({self._joins_per_layer()}), "
                         f"{1e3 * st.sync_s:.1f} ms spent synchronising")
        return "\n".join(lines + [f"  note: {n}" for n in self.notes])

    def _joins_per_layer(self) -> str:
        return ("4 per layer + 1 per forward" if self.strategy == "replicate"
                else "decode 5 per layer + 1 per token (a MoE layer 6, 7 with a shared expert), "
                     "flat; prefill 2 per layer + 1 per forward")

    def close(self) -> None:
        self.pool.close()


def _replace_linears(obj, mapping: Callable[[ops.Linear], ops.Linear]) -> None:
    for k, v in list(vars(obj).items()):
        if isinstance(v, ops.Linear):
            setattr(obj, k, mapping(v))


def _row_split(lin: ops.Linear, groups: list[NodeGroup], nodes, exchange, weights,
               replicate: bool) -> ShardedLinear:
    """`lin` split by output rows in proportion to weights; replicate: every node holds the whole
    matrix and computes its rows from its copy (cut at the kernel's row groups)."""
    lin.w = None      # the build's prepared copy (a repacked one is the matrix's size): parts replace it
    parts = []
    step = lin.unit.row_multiple if replicate else 1
    n_units = -(-lin.shape[0] // step)
    for i, (a, b) in enumerate(split_units(n_units, weights)):
        a, b = a * step, min(b * step, lin.shape[0])
        if b <= a:
            continue
        node = groups[i].mem_node
        if replicate:
            w, arrays = _localize(lin.unit, lin.raw, node)
            parts.append(LocalLinear(lin, i, 0, a, b, w, arrays, full=True))
        else:
            parts.append(_slice(lin, i, 0, a, b, node))
    numa_mem.release_file_pages(lin.raw)
    return ShardedLinear(lin, parts, nodes, exchange, 0)


def apply(model, topo, strategy: str = "shard", nodes: list[int] | None = None,
          threads_per_node: int | None = None, n_threads: int | None = None,
          n_ctx: int = 0) -> Placement:
    """Plan `model` (built, all on the host) on `topo` and apply the plan: the short form for
    tests and scripts. The engine plans from the GGUF header before building (make_plan) and
    calls apply_plan."""
    req = Request(numa=strategy, n_ctx=n_ctx, n_threads=n_threads,
                  nodes=None if nodes is None else tuple(nodes), threads_per_node=threads_per_node)
    plan = make_plan(ModelSpec.from_model(model), topo, req)
    if plan.strategy == "replicate":
        plan.check_fits()
    return apply_plan(model, plan, topo)


def apply_plan(model, plan: Plan, topo, gpu_layers: frozenset[int] = frozenset(),
               host_experts: list = ()) -> Placement:
    """Make `model` run as `plan` says: its matrices sliced (shard) or copied (replicate) into
    node memory, each sharded layer a ShardedBlock in model.blk. Layers in gpu_layers (the GPU
    offload's) are left alone, but for the routed experts they keep on the host (host_experts:
    (layer, block, attr, ExpertLinear), numallm.gpu.offload.Offload.host_experts), which are
    split over the nodes as a CPU block's are."""
    with numa_mem.packed():        # slices share per-node blocks (huge pages)
        placement = _apply(model, plan, topo, gpu_layers)
        if host_experts and plan.strategy != "off":
            _place_experts(host_experts, plan, placement)
        return placement


def _place_experts(host_experts: list, plan: Plan, placement: "Placement") -> None:
    """Routed experts of GPU blocks, run on the CPU by numallm.gpu.hybrid: each node's share of
    every expert in its memory (shard, isolate) or a copy per node (replicate), as for a block
    on the CPU."""
    groups, pool, exchange = placement.groups, placement.pool, placement.exchange
    weights = [g.n_threads for g in groups]
    for _, block, attr, value in host_experts:
        spec = next(t for t in type(block).TENSORS if t.attr == attr)
        if plan.strategy == "replicate":
            step = value.unit.row_multiple
            per = [(min(a * step, value.shape[1]), min(b * step, value.shape[1]))
                   for a, b in split_units(-(-value.shape[1] // step), weights)]
            rec = replicate_experts(value, per, groups, pool, exchange)
        else:
            axis, unit = spec.split
            rec = shard_experts(value, axis, plan.splits[unit], groups, pool, exchange)
        setattr(block, attr, rec)
        placement.linears.append(rec)


def _apply(model, plan: Plan, topo, gpu_layers: frozenset[int]) -> Placement:
    strategy = plan.strategy
    if strategy == "off":
        for lin in model.linears():     # huge pages for the repacked copies (numa_mem.pack)
            if isinstance(lin, ops.Linear) and lin.unit.repacks:   # (not a GPU's matrices)
                lin.w = numa_mem.pack(lin.w)
        n = plan.nodes[0].n_threads or threads.physical_cores()
        return Placement("off", [], threads.RowPool(n), False, [], plan.reason, plan)
    groups = _groups([(n.node, n.cpus, n.n_threads) for n in plan.nodes], topo)
    pool = threads.NodePools([g.cpus for g in groups], [g.n_threads for g in groups])
    notes = list(plan.notes)
    if any(g.mem_node is None for g in groups):
        notes.append(numa_mem.status().note)
    placement = Placement(strategy, groups, pool, plan.virtual, notes, plan.reason, plan)
    exchange = placement.exchange
    weights = [g.n_threads for g in groups]
    done: dict[int, ShardedLinear] = {}

    def rows(lin: ops.Linear) -> ops.Linear:
        if id(lin) not in done:                  # a tied output matrix is placed once
            done[id(lin)] = _row_split(lin, groups, pool, exchange, weights, strategy == "replicate")
            placement.linears.append(done[id(lin)])
        return done[id(lin)]

    _replace_linears(model, rows)                # token_embd, output
    host = [(i, b) for i, b in enumerate(model.blk) if i not in gpu_layers]
    if strategy == "replicate":
        for _, blk in host:
            _replace_linears(blk, rows)
            for k, v in list(vars(blk).items()):
                if isinstance(v, ops.ExpertLinear):      # a copy per node, rows cut by threads
                    step = v.unit.row_multiple
                    per = [(min(a * step, v.shape[1]), min(b * step, v.shape[1]))
                           for a, b in split_units(-(-v.shape[1] // step), weights)]
                    rec = replicate_experts(v, per, groups, pool, exchange)
                    setattr(blk, k, rec)
                    placement.linears.append(rec)
        return placement
    for i, blk in host:
        sb = ShardedBlock(blk, plan.splits, groups, pool, exchange, i)
        model.blk[i] = sb
        placement.blocks.append(sb)
        placement.linears.extend(sb.records.values())
    return placement
