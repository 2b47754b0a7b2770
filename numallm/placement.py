"""NUMA placement of a built model: the one module that knows about nodes.

    placement = apply(model, topo, strategy="shard")   # model's Linears now sharded per node
    with threads.activate(placement.pool): model(...)
    placement.report()                                 # per slice: node, bytes, share of local pages

shard:   every weight matrix is split along its output rows (whole rows, so quant blocks are never
         cut) in proportion to each node's cores; attention projections are split at KV-head
         boundaries with each query head on its KV head's node (GQA). Each slice is copied into
         its node's memory and computed by that node's threads.
isolate: one node holds every matrix and runs every thread.
off:     nothing moves; an unpinned pool over the allowed cores.

Virtual nodes (carved from one real node) allocate on the real node they came from; the report
says so. Model files are untouched: ShardedLinear replaces ops.Linear in place.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import numpy as np

from . import numa_mem, ops, threads
from .errors import NumallmError
from .topology import Topology

STRATEGIES = ("off", "shard", "isolate")


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
    nbytes: int
    local: float | None       # share of the slice's pages on mem_node; None: not verifiable


def split_units(n_units: int, weights: list[float]) -> list[tuple[int, int]]:
    """[a, b) ranges of `n_units` indivisible units in proportion to weights (largest remainder)."""
    total = float(sum(weights))
    exact = [n_units * w / total for w in weights]
    counts = [int(e) for e in exact]
    by_rest = sorted(range(len(weights)), key=lambda i: exact[i] - counts[i], reverse=True)
    for i in by_rest[: n_units - sum(counts)]:
        counts[i] += 1
    out, a = [], 0
    for c in counts:
        out.append((a, a + c))
        a += c
    return out


class Exchange:
    """Cross-node data movement of one op. On one host the nodes share an address space, so a
    matvec writes its slice straight into the shared output and only batched outputs, computed
    per slice, are copied into place. A multi-host backend (MPI) implements the same method."""

    def gather_cols(self, parts: list[np.ndarray], out: np.ndarray, bounds: list[tuple[int, int]]) -> None:
        """out[:, r0:r1] = part for each (T, r1 - r0) part."""
        for p, (r0, r1) in zip(parts, bounds):
            out[:, r0:r1] = p


class _Part:
    """One node's rows [r0, r1) of a matrix: prepared weights in node memory, its thread indices."""

    def __init__(self, group: int, r0: int, r1: int, w, arrays: list[np.ndarray], tids: list[int],
                 multiple: int = 1):
        self.group, self.r0, self.r1, self.w, self.arrays = group, r0, r1, w, arrays
        # (thread index, local row range) for each share of this slice
        self.shares = [(tids[j], a, b) for j, (a, b) in
                       enumerate(threads.split_rows(r1 - r0, len(tids), multiple))]


class ShardedLinear(ops.Linear):
    """An ops.Linear whose output rows are split into per-node parts; same call as Linear."""

    def __init__(self, lin: ops.Linear, parts: list[_Part], pool: threads.RowPool, exchange: Exchange):
        # not Linear.__init__: the full matrix is not kept, only the node-local parts
        self.unit, self.name, self.qtype, self.shape = lin.unit, lin.name, lin.qtype, lin.shape
        self.nbytes, self.raw = lin.nbytes, None
        self.parts, self._pool, self.exchange = parts, pool, exchange

    def pool(self) -> threads.RowPool:
        return self._pool

    def add_jobs(self, acts, out, jobs):
        """Each part's shares go to the threads of its node. A decode step writes each part's
        rows straight into `out` (one row of T = 1 is contiguous); batched outputs are computed
        per part and gathered by the exchange once all threads are done."""
        unit, t = self.unit, acts.x.shape[0]
        if t == 1:
            for p in self.parts:
                ov = out[:, p.r0:p.r1]                                    # (1, rows_i)
                for tid, a, b in p.shares:
                    jobs[tid].append(lambda w=p.w, ov=ov, a=a, b=b: unit.matmul_x(w, acts, ov, a, b))
            return None
        outs = [np.empty((t, p.r1 - p.r0), dtype=np.float32) for p in self.parts]  # (T, rows_i)
        for p, o in zip(self.parts, outs):
            for tid, a, b in p.shares:
                jobs[tid].append(lambda w=p.w, o=o, a=a, b=b: unit.matmul_x(w, acts, o, a, b))
        bounds = [(p.r0, p.r1) for p in self.parts]
        return lambda: self.exchange.gather_cols(outs, out, bounds)

    def rows(self, ids: np.ndarray) -> np.ndarray:
        out = np.empty((len(ids), self.shape[1]), dtype=np.float32)     # (len(ids), K)
        for i, r in enumerate(ids):
            r = int(r)
            p = next(p for p in self.parts if p.r0 <= r < p.r1)
            self.unit.dequantize(p.w, out[i:i + 1], r - p.r0, r - p.r0 + 1)
        return out


def _localize(unit, raw: np.ndarray, node: int | None):
    """Prepared weights for `raw` rows with every array in node memory: (w, [arrays])."""
    if node is None:
        local = np.ascontiguousarray(raw)
        return unit.prepare(local), [local]
    local = numa_mem.to_node(raw, node)
    numa_mem.release_file_pages(raw)
    w = unit.prepare(local)
    if not dataclasses.is_dataclass(w):
        return w, [local]
    # K-quant units unpack scales into fresh numpy arrays, repacking units copy everything:
    # move those to the node as well (a repacked copy no longer needs `local`)
    moved = {f.name: numa_mem.to_node(v, node, readonly=not v.flags.writeable)
             for f in dataclasses.fields(w) if isinstance(v := getattr(w, f.name), np.ndarray)
             and not np.shares_memory(v, local)}
    kept = [] if unit.repacks else [local]
    return dataclasses.replace(w, **moved), [*kept, *moved.values()]


def _groups(topo: Topology, strategy: str, nodes: list[int] | None,
            threads_per_node: int | None) -> list[NodeGroup]:
    cpu_nodes = {n.id: n for n in topo.cpu_nodes}
    chosen = nodes if nodes is not None else sorted(cpu_nodes)
    bad = [n for n in chosen if n not in cpu_nodes]
    if bad or not chosen:
        raise NumallmError(f"--nodes {','.join(map(str, chosen))}: node(s) {','.join(map(str, bad))} "
                           f"have no CPUs here (CPU nodes: {','.join(map(str, sorted(cpu_nodes)))}); "
                           f"see `numallm topo`")
    if strategy == "isolate":
        chosen = chosen[:1]
    mem = numa_mem.status()
    allowed = set(topo.process.allowed_cpus)
    out = []
    for nid in chosen:
        nd = cpu_nodes[nid]
        # one CPU per physical core: hyperthreads add no decode bandwidth
        cpus = tuple(sorted(next(t for t in c.threads if t in allowed) for c in nd.cores
                            if any(t in allowed for t in c.threads)))
        real = nd.real_node if topo.virtual else nd.id
        mem_node = real if mem.available and real in mem.nodes else None
        out.append(NodeGroup(nid, cpus, threads_per_node or len(cpus), mem_node))
    return out


def _units(name: str, n_rows: int, args) -> tuple[int, int]:
    """(units, rows per unit) a matrix splits in: KV heads for attention projections (a query
    head goes with its KV head), single rows otherwise."""
    group = args.n_head // args.n_head_kv
    if name.endswith("attn_q.weight"):
        return args.n_head_kv, group * args.head_dim
    if name.endswith(("attn_k.weight", "attn_v.weight")):
        return args.n_head_kv, args.head_dim
    return n_rows, 1


class Placement:
    """The result of `apply`: the pool to activate, per-slice records, and what was degraded."""

    def __init__(self, strategy: str, groups: list[NodeGroup], pool: threads.RowPool,
                 virtual: bool, notes: list[str]):
        self.strategy, self.groups, self.pool, self.virtual = strategy, groups, pool, virtual
        self.notes = notes
        self.linears: list[ShardedLinear] = []

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
                out.append(SliceReport(lin.name, g.node, g.mem_node, (p.r0, p.r1),
                                       sum(a.nbytes for a in p.arrays), local))
        return out

    def summary(self) -> str:
        """A few lines for /stats and `topo --verify`: bytes and local pages per node."""
        if self.strategy == "off":
            return "numa: off (one unpinned pool; memory where the GGUF mapping puts it)"
        rep = self.report()
        lines = [f"numa: {self.strategy} over {len(self.groups)} "
                 f"{'virtual ' if self.virtual else ''}node(s)"]
        for g in self.groups:
            mine = [r for r in rep if r.node == g.node]
            nbytes = sum(r.nbytes for r in mine)
            where = f"memory node {g.mem_node}" if g.mem_node is not None else "memory not placed"
            checked = [r for r in mine if r.local is not None]
            locs = [r.local for r in checked]
            local_bytes = sum(r.local * r.nbytes for r in checked)
            share = (f"{100 * local_bytes / max(sum(r.nbytes for r in checked), 1):.1f}% local pages"
                     if checked else "pages not verified")
            worst = min(locs, default=1.0)
            warn = f" WARNING: a slice has only {100 * worst:.1f}% local pages" if worst < 0.999 else ""
            lines.append(f"  node {g.node}: {g.n_threads} threads on CPUs "
                         f"{','.join(map(str, g.cpus))}, {len(mine)} slices, {nbytes / 2**20:.1f} MiB "
                         f"on {where}, {share}{warn}")
        return "\n".join(lines + [f"  note: {n}" for n in self.notes])

    def close(self) -> None:
        self.pool.close()


def _replace_linears(model, mapping: Callable[[ops.Linear], ops.Linear]) -> None:
    """Swap every ops.Linear attribute of the model and of its blocks (lists of objects)."""
    for obj in [model] + [b for v in vars(model).values() if isinstance(v, list) for b in v]:
        for k, v in list(vars(obj).items()):
            if isinstance(v, ops.Linear):
                setattr(obj, k, mapping(v))


def apply(model, topo: Topology | None, strategy: str = "shard", nodes: list[int] | None = None,
          threads_per_node: int | None = None, n_threads: int | None = None) -> Placement:
    """Place `model`'s weight matrices on `topo`'s nodes and return the pool to run it with.
    strategy "off" needs no topology and leaves the model as built (n_threads: its pool size)."""
    if strategy not in STRATEGIES:
        raise NumallmError(f"--numa {strategy}: unknown strategy; use one of {', '.join(STRATEGIES)}")
    if strategy == "off":
        return Placement("off", [], threads.RowPool(n_threads or threads.physical_cores()), False, [])
    groups = _groups(topo, strategy, nodes, threads_per_node)
    cpus = [g.cpus for g in groups for _ in range(g.n_threads)]
    tids, t = [], 0
    for g in groups:
        tids.append(list(range(t, t + g.n_threads)))
        t += g.n_threads
    pool = threads.RowPool(len(cpus), cpus)
    notes = []
    if topo.virtual:
        notes.append("virtual nodes: slices are allocated on the real node each was carved from")
    if any(g.mem_node is None for g in groups):
        notes.append(numa_mem.status().note)
    placement = Placement(strategy, groups, pool, topo.virtual, notes)
    exchange = Exchange()
    weights = [len(g.cpus) for g in groups]
    done: dict[int, ShardedLinear] = {}

    def shard(lin: ops.Linear) -> ops.Linear:
        if id(lin) not in done:                  # a tied output matrix is placed once
            n_units, unit_rows = _units(lin.name, lin.shape[0], model.args)
            parts = []
            for gi, (a, b) in enumerate(split_units(n_units, weights)):
                r0, r1 = a * unit_rows, b * unit_rows
                if r1 > r0:
                    w, arrays = _localize(lin.unit, lin.raw[r0:r1], groups[gi].mem_node)
                    parts.append(_Part(gi, r0, r1, w, arrays, tids[gi], lin.unit.row_multiple))
            done[id(lin)] = ShardedLinear(lin, parts, pool, exchange)
            placement.linears.append(done[id(lin)])
        return done[id(lin)]

    _replace_linears(model, shard)
    return placement
