"""NUMA execution of a planned model: node-local matrix slices, their products, per-node KV
caches and the per-node run of a decoder block (the "sharded layer flow" of the package
docstring). Everything here acts on a built model from outside; model files never see nodes.
"""
from __future__ import annotations

import copy
import dataclasses
import time
import weakref
from typing import Callable

import numpy as np
from numallm_kernels import _native
from numallm_kernels.base import Activations

from .. import numa_mem, ops, threads
from ..errors import UnsupportedError
from ..models.base import FF, HEADS
from ..models.decl import FF_EXP, FF_SHEXP, MLA_HEADS
from .plan import split_units


class Exchange:
    """Cross-node data movement: the one seam a multi-host backend replaces.

    In one process the nodes share an address space, so each node's part is an array any thread
    can read, and these are plain sums and copies (timed in `seconds`). An MPI backend runs one
    rank per node, each holding only its own part, and implements
      allreduce   as MPI_Allreduce(part, MPI_SUM): every rank gets the sum and adds it to its
                  copy of the residual stream, so nothing needs a broadcast after it;
      gather_cols as MPI_Allgatherv of the (T, rows_i) parts, placed by the same bounds.
    Parts are added in node order, so every rank gets the same bits.
    """

    def __init__(self):
        self.seconds = 0.0

    def allreduce(self, parts: list[np.ndarray | None]) -> np.ndarray:
        """The sum of the nodes' (T, D) parts (None: the node had nothing to add; one has)."""
        t0 = time.perf_counter()
        out = None
        for p in parts:
            if p is not None:
                out = p.copy() if out is None else np.add(out, p, out=out)
        self.seconds += time.perf_counter() - t0
        return out

    def gather_cols(self, parts: list[np.ndarray], out: np.ndarray, bounds: list[tuple[int, int]]) -> None:
        """out[:, r0:r1] = part for each (T, r1 - r0) part."""
        t0 = time.perf_counter()
        for p, (r0, r1) in zip(parts, bounds):
            out[:, r0:r1] = p
        self.seconds += time.perf_counter() - t0


# -- node-local matrices ---------------------------------------------------------------------------

def _localize(unit, raw: np.ndarray, node: int | None):
    """Prepared weights for raw GGUF rows with every array in node memory: (w, [arrays held])."""
    if node is None:
        local = np.ascontiguousarray(raw)            # a view when raw is already contiguous
        return unit.prepare(local), [] if unit.repacks else [local]
    # a repacking unit copies everything: prepare from the file, then move the new layout; the
    # others keep (views of) their input, so that goes to the node first
    local = np.ascontiguousarray(raw) if unit.repacks else numa_mem.to_node(raw, node)
    w = unit.prepare(local)
    numa_mem.release_file_pages(raw)     # read: drop now, not after the whole matrix (peak RSS)
    if not dataclasses.is_dataclass(w):
        return w, [local]
    # K-quant units unpack scales into fresh numpy arrays: move those to the node as well
    moved = {f.name: numa_mem.to_node(v, node, readonly=not v.flags.writeable)
             for f in dataclasses.fields(w) if isinstance(v := getattr(w, f.name), np.ndarray)
             and not np.shares_memory(v, local)}
    kept = [] if unit.repacks else [local]
    return dataclasses.replace(w, **moved), [*kept, *moved.values()]


class LocalLinear(ops.Linear):
    """One node's part of a matrix, in that node's memory. axis 0: output rows [a, b), with `w`
    holding only those rows (shard) or the whole matrix (replicate, `full`); axis 1: input
    columns [a, b), whole quant blocks (its product is a partial sum). Called like ops.Linear,
    on the current pool: its node's, inside NodePools.run_nodes."""

    def __init__(self, lin: ops.Linear, group: int, axis: int, a: int, b: int, w,
                 arrays: list[np.ndarray], full: bool = False):
        # not Linear.__init__: the weights come prepared from node memory
        self.unit, self.name, self.qtype = lin.unit, lin.name, lin.qtype
        n, k = lin.shape
        self.shape = lin.shape if full else (b - a, k) if axis == 0 else (n, b - a)
        row_bytes = lin.raw.shape[1]
        self.nbytes = (n if full else b - a) * row_bytes if axis == 0 else n * (b - a) * row_bytes // k
        self.raw, self.w, self.arrays, self.full = None, w, arrays, full
        self.group, self.axis, self.a, self.b = group, axis, a, b


def _slice(lin: ops.Linear, group: int, axis: int, a: int, b: int, node: int | None) -> LocalLinear:
    """Rows (axis 0) or whole-block columns (axis 1) [a, b) of `lin`, prepared in node memory."""
    if axis == 0:
        raw = lin.raw[a:b]
    else:
        bs, ts = lin.unit.block_size, lin.unit.type_size
        if a % bs or b % bs:
            raise ValueError(f"{lin.name}: columns [{a}, {b}) cut {bs}-value quant blocks")
        raw = lin.raw[:, a // bs * ts: b // bs * ts]                       # (N, bytes of the blocks)
    w, arrays = _localize(lin.unit, raw, node)
    return LocalLinear(lin, group, axis, a, b, w, arrays)


class ShardedLinear(ops.Linear):
    """A matrix split over nodes into LocalLinear parts, computed as one product: each part's
    rows go to its node's threads (ops.matmuls dispatches every matrix of an input at once) and
    the Exchange gathers row parts of a batch or sums column parts. A one-token input (decode)
    writes row parts straight into the output (replicated parts, whole matrices, always do), and
    column parts read their columns of the input's one encoding; its dispatch is then made of
    kernel tasks only, which ops replays token after token as one flat dispatch over the nodes
    (NodePools.run_encoded) followed by the Exchange step."""

    def __init__(self, lin: ops.Linear, parts: list[LocalLinear], nodes: threads.NodePools,
                 exchange: Exchange, axis: int = 0):
        self.unit, self.name, self.qtype, self.shape = lin.unit, lin.name, lin.qtype, lin.shape
        self.nbytes, self.raw, self.w = lin.nbytes, None, None
        self.parts, self.nodes, self.exchange, self.axis = parts, nodes, exchange, axis

    def pool(self) -> threads.NodePools:
        return self.nodes

    def add_jobs(self, acts, out, jobs):
        unit, t = self.unit, acts.x.shape[0]

        def share(p: LocalLinear, n_rows: int, acts_p, out_p, offset: int = 0) -> None:
            # out_p[:, offset + a:offset + b] = acts_p.x @ p's rows [a, b).T on p's node threads
            tids = self.nodes.tids(p.group)
            for j, (a, b) in enumerate(threads.split_rows(n_rows, len(tids), unit.row_multiple)):
                jobs[tids[j]].append(ops.task(unit, p.w, acts_p, out_p, offset + a, offset + b))

        if self.axis == 1:          # partial sums over column blocks: each part reads its x columns
            outs = []
            for p in self.parts:
                if t == 1:          # views of the one encoding ops made (whole blocks)
                    xp = acts.columns(p.a, p.b)
                else:
                    xp = Activations(np.ascontiguousarray(acts.x[:, p.a:p.b]))   # (T, cols_i)
                    unit.prepare_x(xp)
                o = np.empty((t, self.shape[0]), dtype=np.float32)          # (T, N) partial
                share(p, self.shape[0], xp, o)
                outs.append(o)

            def reduce():
                out[:] = self.exchange.allreduce(outs)
            return reduce
        gathered, outs = [], []
        for p in self.parts:
            if p.full:              # the node's own copy of every row: global rows, shared output
                if p.b > p.a:
                    share(p, p.b - p.a, acts, out, p.a)
                continue
            o = out[:, p.a:p.b] if t == 1 else np.empty((t, p.b - p.a), dtype=np.float32)
            share(p, p.b - p.a, acts, o)
            if t > 1:
                gathered.append(p)
                outs.append(o)
        if not gathered:
            return None
        return lambda: self.exchange.gather_cols(outs, out, [(p.a, p.b) for p in gathered])

    def rows(self, ids: np.ndarray) -> np.ndarray:
        if self.axis != 0:
            raise ValueError(f"{self.name}: row lookup in a matrix split by columns")
        out = np.empty((len(ids), self.shape[1]), dtype=np.float32)     # (len(ids), K)
        for i, r in enumerate(ids):
            r = int(r)
            p = next(p for p in self.parts if p.a <= r < p.b)
            local = r if p.full else r - p.a
            self.unit.dequantize(p.w, out[i:i + 1], local, local + 1)
        return out


def _replicated(lin: ops.Linear, groups: list, nodes: threads.NodePools, exchange: Exchange,
                weights: list[int]) -> ShardedLinear:
    """A whole copy of `lin` in every node's memory (each node computes its share of the rows
    from its copy, cut at the kernel's row groups; a node may get none but keeps its copy for
    its own half-layer runs)."""
    lin.w = None
    step = lin.unit.row_multiple
    parts = []
    for i, (a, b) in enumerate(split_units(-(-lin.shape[0] // step), weights)):
        a, b = min(a * step, lin.shape[0]), min(b * step, lin.shape[0])
        w, arrays = _localize(lin.unit, lin.raw, groups[i].mem_node)
        parts.append(LocalLinear(lin, i, 0, a, b, w, arrays, full=True))
    numa_mem.release_file_pages(lin.raw)
    return ShardedLinear(lin, parts, nodes, exchange, 0)


# -- sharded blocks ----------------------------------------------------------------------------------

class NodeCaches(ops.HostCache):
    """The KV cache of one sharded layer: parts[i] holds node i's KV heads heads[i] (None: it
    has none). `attend` is ops.attention's step for it: each node's heads on its own threads.
    A batch of sequences (ops.BatchCaches of these) goes to ShardedBlock.attn's per-node views,
    node i attending over its parts of every sequence's cache."""

    def __init__(self, parts: list[ops.KVCache | None], heads: list[tuple[int, int]],
                 nodes: threads.NodePools, shared: bool = False):
        # shared (an MLA latent): heads[i] are node i's query heads and every node keeps a
        # whole copy of the one KV row per token, written on each
        self.parts, self.heads, self.nodes, self.shared = parts, heads, nodes, shared
        self._table = self._spans = self._q = self._out = None   # see _encode

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.parts if c is not None)

    def attend(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, pos0: int) -> np.ndarray:
        """ops.attention over every node's part: q (T, n_head, hd), k/v (T, n_head_kv, hd) ->
        (T, n_head * hd). The caller writes each node's new keys and values into that node's
        cache (a few KB per token); each node's threads then read only their own cache, in a
        flat dispatch of native attention tasks (each thread a share of its node's KV heads),
        encoded once (`_encode`). One token only (the decode step of ShardedBlock)."""
        t, n_head, hd = q.shape
        if t > 1 or not _native.available():   # ShardedBlock runs those on per-node views
            raise ValueError(f"per-node attention of {t} tokens as native tasks: one token only, "
                             f"on a CPU with native tasks")
        if self._table is None or self._q.shape != q.shape:
            self._encode(n_head, hd)
        np.copyto(self._q, q)
        for c, (h0, h1) in zip(self.parts, self.heads):
            if c is not None:
                k0, k1 = (0, k.shape[1]) if self.shared else (h0, h1)
                c.store(k[:, k0:k1], v[:, k0:k1], pos0)
        self._table[:, _native.ATTN_POS0] = pos0
        self.nodes.run_encoded(self._table, self._spans)
        return self._out.copy()

    def _encode(self, n_head: int, hd: int) -> None:
        """The one-token attention tasks of every node's threads, encoded once: q, out and the
        score rows are buffers of this object (their addresses are in the table), a token only
        writes the position into it."""
        n_kv = sum(h1 - h0 for h0, h1 in self.heads)
        group = 1 if self.shared else n_head // n_kv
        n_ctx = next(c.n_ctx for c in self.parts if c is not None)
        self._q = np.empty((1, n_head, hd), dtype=np.float32)             # (1, n_head, hd)
        self._out = np.empty((1, n_head * hd), dtype=np.float32)          # (1, n_head * hd)
        self._scores = []                                                 # (heads, n_ctx) per task
        shares: list[list] = [[] for _ in range(self.nodes.n_threads)]
        for i, (c, (h0, h1)) in enumerate(zip(self.parts, self.heads)):
            if c is None:
                continue
            tids = self.nodes.tids(i)
            for j, (g0, g1) in enumerate(split_units(h1 - h0, [1.0] * len(tids))):
                if g1 == g0:
                    continue
                a, b = (h0 + g0) * group, (h0 + g1) * group                 # its query heads
                k0, k1 = (0, c.k.a.shape[0]) if self.shared else (g0, g1)  # its KV heads
                scores = np.empty((b - a, n_ctx), dtype=np.float32)
                self._scores.append(scores)
                shares[tids[j]].append(_native.attention_task(
                    self._q[:, a:b], *c.k.part(k0, k1), *c.v.part(k0, k1),
                    self._out[:, a * hd:b * hd], scores, 0, 1.0 / np.sqrt(hd)))
        self._table, self._spans = self.nodes.encode(shares)


class ShardedBlock:
    """The per-node execution of one decoder block (the module docstring's layer flow).

    views[i] is a shallow copy of the block whose matrices are node i's slices, whose row-split
    biases are sliced alike, and whose args count node i's heads and ff rows, so the block's own
    `attn` / `ffn` code computes node i's partial. This object takes the block's place in
    model.blk: calling it runs the block class's own __call__ with this object's `attn` / `ffn`
    (the sums of the partials), and it holds ShardedLinear records of the slices under the
    matrices' attribute names (what Transformer.linears and the report walk)."""

    def __init__(self, block, splits: dict, groups: list, nodes: threads.NodePools,
                 exchange: Exchange, layer: int):
        from .experts import shard_experts, shard_whole_experts
        from .heads import shard_heads
        from .moe_split import EXPERTS

        a = block.a
        # attention splits by KV heads, or by MLA heads (every head reads the one latent cache)
        # where the block declares those
        self.mla = any(t.split is not None and t.split[1] == MLA_HEADS for t in type(block).TENSORS)
        heads, ff = splits[MLA_HEADS if self.mla else HEADS], splits[FF]
        group, hd = a.n_head // a.n_head_kv, a.head_dim
        self.layer, self.heads, self.ff = layer, heads, ff
        self.head_dim, self.nodes, self.exchange = hd, nodes, exchange
        self.mem_nodes = [g.mem_node for g in groups]
        views = [copy.copy(block) for _ in groups]
        for i, v in enumerate(views):
            (h0, h1), (f0, f1) = heads[i], ff[i]
            v.a = dataclasses.replace(a, n_head=h1 - h0, n_ff=f1 - f0) if self.mla else \
                dataclasses.replace(a, n_head=(h1 - h0) * group, n_head_kv=h1 - h0, n_ff=f1 - f0)
        # the block's own declaration says how each tensor splits (models.base.T)
        per_unit = {HEADS: lambda n: [(h0 * n // a.n_head_kv, h1 * n // a.n_head_kv) for h0, h1 in heads],
                    MLA_HEADS: lambda n: [(h0 * n // a.n_head, h1 * n // a.n_head) for h0, h1 in heads],
                    FF: lambda n: ff, FF_EXP: lambda n: splits.get(FF_EXP),
                    FF_SHEXP: lambda n: splits.get(FF_SHEXP)}
        self.records: dict[str, ShardedLinear] = {}
        weights = [g.n_threads for g in groups]
        for spec in type(block).TENSORS:
            value = getattr(block, spec.attr)
            if value is None:
                continue
            if spec.split is None:
                if isinstance(value, ops.Linear):      # a router: a copy per node (small)
                    rec = _replicated(value, groups, nodes, exchange, weights)
                    for p in rec.parts:
                        setattr(views[p.group], spec.attr, p)
                    self.records[spec.attr] = rec
                continue                               # a vector: kept whole by every node
            axis, unit = spec.split
            per = per_unit[unit](a.dims(spec.shape)[axis]) if unit in per_unit else None
            if per is None:
                raise UnsupportedError(f"blk.{layer}.{spec.name}: --numa shard cannot split by "
                                       f"{unit!r}; use --numa replicate or off")
            if spec.kind == "experts":                 # every expert's rows / columns per node
                rec = (shard_whole_experts(value, splits[EXPERTS], groups, nodes, exchange)
                       if EXPERTS in splits else
                       shard_experts(value, axis, per, groups, nodes, exchange))
                for v in views:
                    setattr(v, spec.attr, None)
                for p in rec.parts:
                    setattr(views[p.group], spec.attr, p)
                self.records[spec.attr] = rec
                continue
            if spec.kind != "matrix":                  # a vector follows its matrix's rows
                for i, v in enumerate(views):
                    s, e = per[i]
                    setattr(v, spec.attr, value[s:e] if axis == 0 else value if i == 0
                            else np.zeros_like(value))
                continue
            lin = value
            lin.w = None                  # the build's prepared copy: the node slices replace it
            parts = [_slice(lin, i, axis, s, e, g.mem_node) for i, (g, (s, e)) in enumerate(zip(groups, per))
                     if e > s]
            numa_mem.release_file_pages(lin.raw)      # copied to the nodes: drop the file's pages
            for v in views:
                setattr(v, spec.attr, None)            # a node without a slice never calls it
            for p in parts:
                setattr(views[p.group], spec.attr, p)
            self.records[spec.attr] = ShardedLinear(lin, parts, nodes, exchange, axis)
        for k, value in list(vars(block).items()):   # per-head operands (MLA's absorbed products)
            if isinstance(value, ops.HeadLinear):
                rec = shard_heads(value, heads, groups, nodes)
                for v in views:
                    setattr(v, k, None)
                for p in rec.parts:
                    setattr(views[p.group], k, p)
                self.records[k] = rec
        unknown = [k for k, v in vars(block).items() if isinstance(v, ops.Linear) and k not in self.records]
        if unknown:
            raise UnsupportedError(f"blk.{layer}: {', '.join(unknown)} not declared with a split; "
                                   f"--numa shard cannot place it; use --numa replicate or off")
        self.views = views
        # nodes with feed-forward work of their own (a router copy alone is none)
        self.ff_nodes = [any(p.group == i and not getattr(p, "full", False)
                             for name, r in self.records.items() if name.startswith("ffn_")
                             for p in r.parts) for i in range(len(groups))]
        self._last_cache: Callable[[], NodeCaches | None] = lambda: None
        # the whole layer over the records: a decode step runs the block's own code on it
        self.flat = copy.copy(block)
        for name, rec in self.records.items():
            setattr(self.flat, name, rec)
            setattr(self, name, rec)          # what Transformer.linears() and reports walk
        self.block_class = type(block)

    def __call__(self, x: np.ndarray, cache: NodeCaches, pos0: int) -> np.ndarray:
        """The block class's own forward, run on this object: its `attn` and `ffn` calls reach
        the per-node halves below (a layer is x + attn(x), then + ffn(x))."""
        return self.block_class.__call__(self, x, cache, pos0)

    # Decode (one token) runs the block's own attn / ffn on `flat`, whose matrices are the
    # ShardedLinear records: every product is one flat dispatch of native tasks over all nodes'
    # threads (each node its own slices) and attention runs each node's heads on its threads
    # (NodeCaches.attend), so only the caller runs Python: 5 joins per layer (q/k/v, attention,
    # attn_output partials, gate/up, ffn_down partials), each a few microseconds. With Python
    # callables in the work (no native tasks on this CPU) and for prefill, each node's leader
    # runs the half-layer on its view instead: 2 joins per layer, but the leaders' Python takes
    # turns on the GIL at every op, which cost a 1B model's decode ~20% on 2 virtual nodes.
    def attn(self, x: np.ndarray, cache: NodeCaches, pos0: int) -> np.ndarray:
        """The attention update (T, n_embd): each node's heads with its own KV cache, summed."""
        if x.shape[0] == 1 and _native.available():
            return self.flat.attn(x, cache, pos0)
        views, kv = self.views, cache.parts if isinstance(cache, NodeCaches) else \
            [ops.BatchCaches([c.parts[i] for c in cache.caches]) if h1 > h0 else None
             for i, (h0, h1) in enumerate(self.heads)]    # a batch: node i's part of each
        parts: list[np.ndarray | None] = [None] * len(views)

        def run(i: int) -> None:
            parts[i] = views[i].attn(x, kv[i], pos0)

        self.nodes.run_nodes([(lambda i=i: run(i)) if h1 > h0 else None
                              for i, (h0, h1) in enumerate(self.heads)])
        return self.exchange.allreduce(parts)

    def ffn(self, x: np.ndarray) -> np.ndarray:
        """The feed-forward update (T, n_embd): each node's ff rows, summed."""
        if x.shape[0] == 1 and _native.available():
            return self.flat.ffn(x)
        views = self.views
        parts: list[np.ndarray | None] = [None] * len(views)

        def run(i: int) -> None:
            parts[i] = views[i].ffn(x)

        self.nodes.run_nodes([(lambda i=i: run(i)) if active else None
                              for i, active in enumerate(self.ff_nodes)])
        return self.exchange.allreduce(parts)

    def make_cache(self, host: ops.KVCache) -> NodeCaches:
        """Each node's KV heads (a shared cache: a whole copy) in that node's memory, shaped and
        typed after the layer's host cache `host` (never touched). Fresh anonymous pages read as zeros
        and take memory only when first written, as with np.zeros, so nothing is filled here."""
        parts = []
        for (h0, h1), node in zip(self.heads, self.mem_nodes):
            zeros = np.zeros if node is None else (lambda s, d, node=node: numa_mem.empty_on_node(s, d, node))
            parts.append(host.part(h0, h1, zeros) if h1 > h0 else None)
        cache = NodeCaches(parts, self.heads, self.nodes, host.shared)
        self._last_cache = weakref.ref(cache)
        return cache


