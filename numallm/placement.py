"""NUMA placement of a built model: the one module that knows about nodes.

    placement = apply(model, topo, strategy="shard")   # the model's layers now run per node
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
from __future__ import annotations

import copy
import dataclasses
import time
import weakref
from dataclasses import dataclass
from typing import Callable

import numpy as np
from numallm_kernels import _native
from numallm_kernels.base import Activations

from . import numa_mem, ops, threads
from .errors import NumallmError, UnsupportedError
from .placement_check import pct
from .models.base import FF, HEADS, Block
from .topology import Topology
from .topology.plan import assumed_bandwidth

STRATEGIES = ("auto", "off", "shard", "replicate", "isolate")
# A sharded decode step joins all nodes' threads DECODE_JOINS_PER_LAYER times per layer (+1 for
# the output matrix), each a flat native dispatch (NodePools.run_encoded). What one join costs
# beyond the work, measured with `numallm bench -n 64 --numa shard --virtual-nodes 2` on the
# 2-vCPU Intel Xeon development VM (2 virtual nodes of one vCPU): sync 0.55 ms over 111 joins
# per token (5 us, TinyLlama-1.1B shape), 1.15 ms over 141 (8 us, Llama-3.2-3B shape); rounded
# up for machines whose threads are further apart. auto counts it to tell when a model is too
# small to gain from more nodes. (The earlier design, a Python leader per node, cost 74-96 us
# per join and 2 joins per layer on the AMD VM.)
DECODE_JOINS_PER_LAYER = 5
JOIN_COST_S = 10e-6
# auto picks replicate over shard when shard would give a node at least this multiple of its
# thread share of the attention (its KV heads), and a full copy takes at most REPLICA_FREE_SHARE
# of every node's free memory.
ATTN_IMBALANCE = 1.5
REPLICA_FREE_SHARE = 0.5
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


# -- sharded blocks ----------------------------------------------------------------------------------

def heads_per_unit(n_head: int, n_head_kv: int, head_dim: int, block_size: int) -> int:
    """KV heads a node must take together so its attn_output columns are whole quant blocks
    (all of them when no smaller group works)."""
    group = n_head // n_head_kv
    return next((g for g in range(1, n_head_kv + 1)
                 if n_head_kv % g == 0 and g * group * head_dim % block_size == 0), n_head_kv)


class NodeCaches:
    """The KV cache of one sharded layer: parts[i] holds node i's KV heads heads[i] (None: it
    has none). `attend` is ops.attention's step for it: each node's heads on its own threads."""

    def __init__(self, parts: list[ops.KVCache | None], heads: list[tuple[int, int]],
                 nodes: threads.NodePools):
        self.parts, self.heads, self.nodes = parts, heads, nodes
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
                c.k[:, pos0] = k[0, h0:h1]
                c.v[:, pos0] = v[0, h0:h1]
                c.n = pos0 + 1
        self._table[:, _native.ATTN_POS0] = pos0
        self.nodes.run_encoded(self._table, self._spans)
        return self._out.copy()

    def _encode(self, n_head: int, hd: int) -> None:
        """The one-token attention tasks of every node's threads, encoded once: q, out and the
        score rows are buffers of this object (their addresses are in the table), a token only
        writes the position into it."""
        n_kv = sum(h1 - h0 for h0, h1 in self.heads)
        group = n_head // n_kv
        n_ctx = next(c.k.shape[1] for c in self.parts if c is not None)
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
                scores = np.empty((b - a, n_ctx), dtype=np.float32)
                self._scores.append(scores)
                shares[tids[j]].append(_native.attention_task(
                    self._q[:, a:b], c.k[g0:g1], c.v[g0:g1], self._out[:, a * hd:b * hd], scores,
                    0, 1.0 / np.sqrt(hd)))
        self._table, self._spans = self.nodes.encode(shares)


class ShardedBlock:
    """The per-node execution of one decoder block (the module docstring's layer flow).

    views[i] is a shallow copy of the block whose matrices are node i's slices, whose row-split
    biases are sliced alike, and whose args count node i's heads and ff rows, so the block's own
    `attn` / `ffn` code computes node i's partial. `attach` makes the block use this object's
    `attn` / `ffn` (the sums of the partials) in place of its own, and puts ShardedLinear records
    of the slices where its matrices were (what Transformer.linears and the report walk): the
    block stays the object the model (and the GPU offload's bookkeeping) holds, and its own
    __call__ still adds the two halves to the residual stream."""

    def __init__(self, block, heads: list[tuple[int, int]], ff: list[tuple[int, int]],
                 groups: list[NodeGroup], nodes: threads.NodePools, exchange: Exchange, layer: int):
        a = block.a
        group, hd = a.n_head // a.n_head_kv, a.head_dim
        self.layer, self.heads, self.ff = layer, heads, ff
        self.head_dim, self.nodes, self.exchange = hd, nodes, exchange
        self.mem_nodes = [g.mem_node for g in groups]
        views = [copy.copy(block) for _ in groups]
        for i, v in enumerate(views):
            (h0, h1), (f0, f1) = heads[i], ff[i]
            v.a = dataclasses.replace(a, n_head=(h1 - h0) * group, n_head_kv=h1 - h0, n_ff=f1 - f0)
        # the block's own declaration says how each tensor splits (models.base.T)
        per_unit = {HEADS: lambda n: [(h0 * n // a.n_head_kv, h1 * n // a.n_head_kv) for h0, h1 in heads],
                    FF: lambda n: ff}
        self.records: dict[str, ShardedLinear] = {}
        for spec in type(block).TENSORS:
            value = getattr(block, spec.attr)
            if value is None or spec.split is None:
                continue                               # absent, or kept whole by every node
            axis, unit = spec.split
            if unit not in per_unit:
                raise UnsupportedError(f"blk.{layer}.{spec.name}: --numa shard cannot split by "
                                       f"{unit!r}; use --numa replicate or off")
            per = per_unit[unit](a.dims(spec.shape)[axis])
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
        unknown = [k for k, v in vars(block).items() if isinstance(v, ops.Linear) and k not in self.records]
        if unknown:
            raise UnsupportedError(f"blk.{layer}: {', '.join(unknown)} not declared with a split; "
                                   f"--numa shard cannot place it; use --numa replicate or off")
        self.views = views
        self._last_cache: Callable[[], NodeCaches | None] = lambda: None

    def attach(self, block) -> None:
        """Make `block` run through this object (see the class docstring)."""
        for name, rec in self.records.items():
            setattr(block, name, rec)
        # the whole layer over the records: a decode step runs the block's own code on it
        self.flat = copy.copy(block)
        # instance attributes shadow the class's methods: Block.__call__ now calls these
        block.attn, block.ffn = self.attn, self.ffn

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
        views, kv = self.views, cache.parts
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

        self.nodes.run_nodes([(lambda i=i: run(i)) if f1 > f0 else None
                              for i, (f0, f1) in enumerate(self.ff)])
        return self.exchange.allreduce(parts)

    def make_cache(self, n_ctx: int) -> NodeCaches:
        """Each node's KV heads in that node's memory. Fresh anonymous pages read as zeros and
        take memory only when first written, as with np.zeros, so nothing is filled here."""
        parts = []
        for (h0, h1), node in zip(self.heads, self.mem_nodes):
            zeros = np.zeros if node is None else (lambda s, d, node=node: numa_mem.empty_on_node(s, d, node))
            parts.append(ops.KVCache(n_ctx, h1 - h0, self.head_dim, zeros) if h1 > h0 else None)
        cache = NodeCaches(parts, self.heads, self.nodes)
        self._last_cache = weakref.ref(cache)
        return cache


# -- choosing nodes and a strategy ---------------------------------------------------------------

def _node_threads(topo: Topology, nodes: list[int] | None, threads_per_node: int | None,
                  n_threads: int | None) -> list[tuple[int, tuple[int, ...], int]]:
    """(node, CPUs, threads) for each node to use: one CPU per physical core the process may use
    (hyperthreads add no decode bandwidth). -t N without --threads-per-node spreads N threads over
    the nodes in proportion to their cores (a node that gets none is left out)."""
    cpu_nodes = {n.id: n for n in topo.cpu_nodes}
    allowed = set(topo.process.allowed_cpus)
    cores = {nid: tuple(sorted(next(t for t in c.threads if t in allowed) for c in nd.cores
                               if any(t in allowed for t in c.threads)))
             for nid, nd in cpu_nodes.items()}
    chosen = nodes if nodes is not None else [n for n in sorted(cores) if cores[n]]
    bad = [n for n in chosen if not cores.get(n)]
    if bad or not chosen:
        raise NumallmError(f"--nodes {','.join(map(str, chosen))}: node(s) {','.join(map(str, bad))} "
                           f"have no CPUs this process may use (CPU nodes: "
                           f"{','.join(str(n) for n in sorted(cores) if cores[n])}); see `numallm topo`")
    if threads_per_node:
        return [(n, cores[n], threads_per_node) for n in chosen]
    if n_threads:
        split = split_units(n_threads, [len(cores[n]) for n in chosen])
        return [(n, cores[n], b - a) for n, (a, b) in zip(chosen, split) if b > a]
    return [(n, cores[n], len(cores[n])) for n in chosen]


@dataclass(frozen=True)
class Needs:
    """What `decide` weighs about a model."""

    weight_bytes: int
    kv_bytes_per_token: int
    n_layer: int
    n_head_kv: int
    heads_per_unit: int       # KV heads a shard must keep together (heads_per_unit())

    @classmethod
    def of(cls, model) -> "Needs":
        a = model.args
        blk = next((b for _, b in _host_blocks(model)), None)
        per = 1 if blk is None else heads_per_unit(a.n_head, a.n_head_kv, a.head_dim,
                                                   blk.attn_output.unit.block_size)
        return cls(sum(m.nbytes for m in model.linears()), a.kv_bytes_per_token(), a.n_layer,
                   a.n_head_kv, per)


def decide(needs: Needs, topo: Topology, n_ctx: int, nodes: list[int] | None = None,
           threads_per_node: int | None = None, n_threads: int | None = None) -> tuple[str, str]:
    """`--numa auto`: (strategy, the one-line reason). Pure: reads only `topo` and `needs`.

    one CPU node -> off (one chosen node of several -> isolate); a model so small that one node
    reads it faster than N nodes synchronise (a decode step's joins) -> isolate; KV heads that cannot
    be spread in proportion to the nodes' threads -> replicate when a full copy takes at most half
    of every node's free memory; otherwise shard."""
    use = _node_threads(topo, nodes, threads_per_node, n_threads)
    n = len(use)
    gib = needs.weight_bytes / GiB
    if n == 1:
        if len(topo.cpu_nodes) == 1:
            return "off", "numa auto: off (one NUMA node)"
        return "isolate", f"numa auto: isolate (node {use[0][0]} only)"
    by_id = {nd.id: nd for nd in topo.nodes}
    one_node_s = needs.weight_bytes / (assumed_bandwidth(by_id[use[0][0]]) * 1e9)
    joins = DECODE_JOINS_PER_LAYER * needs.n_layer + 1
    join_s = joins * JOIN_COST_S
    if one_node_s * (1 - 1 / n) < join_s:
        return "isolate", (f"numa auto: isolate (a {gib:.2g} GiB model: one node reads it in "
                           f"~{1e3 * one_node_s:.2f} ms per token, {n} nodes would save less than the "
                           f"~{1e3 * join_s:.2f} ms per token their {joins} joins cost)")
    weights = [t for _, _, t in use]
    units = needs.n_head_kv // needs.heads_per_unit
    split = split_units(units, weights)
    over = [((b - a) / units) / (w / sum(weights)) for (a, b), w in zip(split, weights)]
    worst = max(range(n), key=lambda i: over[i])
    if over[worst] >= ATTN_IMBALANCE:
        kv = needs.kv_bytes_per_token * n_ctx
        need = [needs.weight_bytes + (kv if i == 0 else 0) for i in range(n)]
        free = [by_id[nid].mem_free_bytes for nid, _, _ in use]
        uneven = (f"{needs.n_head_kv} KV heads in groups of {needs.heads_per_unit} cannot be spread "
                  f"evenly: node {use[worst][0]} would do "
                  f"{100 * (split[worst][1] - split[worst][0]) / units:.0f}% "
                  f"of the attention with {100 * weights[worst] / sum(weights):.0f}% of the threads")
        if all(x <= REPLICA_FREE_SHARE * f for x, f in zip(need, free)):
            return "replicate", (f"numa auto: replicate ({n} nodes; {uneven}; a {gib:.2g} GiB copy "
                                 f"per node fits in half of each node's free memory)")
        return "shard", (f"numa auto: shard ({n} nodes; {uneven}, but a {gib:.2g} GiB copy per node "
                         f"does not fit in half of every node's free memory)")
    return "shard", (f"numa auto: shard ({n} nodes, a {gib:.2g} GiB model: ~{gib / n:.2g} GiB and "
                     f"its heads' KV cache per node)")


def _groups(use: list[tuple[int, tuple[int, ...], int]], topo: Topology) -> list[NodeGroup]:
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
                 notes: list[str], reason: str | None = None):
        self.strategy, self.groups, self.pool, self.virtual = strategy, groups, pool, virtual
        self.notes, self.reason = notes, reason
        self.linears: list[ShardedLinear] = []
        self.blocks: list[ShardedBlock] = []
        self.exchange = Exchange()

    def adopt_cache(self, cache: list) -> list:
        """The engine's per-layer cache list with each sharded layer's entry replaced by its
        per-node caches (NodeCaches; the host arrays it replaces were never touched)."""
        by_layer = {b.layer: b for b in self.blocks}
        return [by_layer[i].make_cache(c.k.shape[1]) if i in by_layer and isinstance(c, ops.KVCache)
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
                rows, cols = ((p.a, p.b), None) if p.axis == 0 else ((0, lin.shape[0]), (p.a, p.b))
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
                    counts = [numa_mem.where(c.k), numa_mem.where(c.v)]
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
                else "decode 5 per layer + 1 per token, flat; prefill 2 per layer + 1 per forward")

    def close(self) -> None:
        self.pool.close()


def _host_blocks(model):
    """(layer, block) for each layer that runs on the host (layers the GPU offload moved are
    other objects, and stay as they are)."""
    return [(i, b) for i, b in enumerate(model.blk) if isinstance(b, Block)]


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


def _check_copies_fit(model, topo: Topology, groups: list[NodeGroup], n_ctx: int) -> None:
    need = sum(m.nbytes for m in model.linears())
    kv = model.args.kv_bytes(n_ctx)
    by_id = {nd.id: nd for nd in topo.nodes}
    for i, g in enumerate(groups):
        free = by_id[g.node].mem_free_bytes
        mine = need + (kv if i == 0 else 0)
        if mine > free:
            raise NumallmError(f"--numa replicate: node {g.node} needs {mine / GiB:.1f} GiB for its copy "
                               f"of the weights{' and the KV cache' if i == 0 else ''} but has "
                               f"{free / GiB:.1f} GiB free; use --numa shard (one copy split over "
                               f"the nodes)")


def apply(model, topo: Topology | None, strategy: str = "shard", nodes: list[int] | None = None,
          threads_per_node: int | None = None, n_threads: int | None = None,
          n_ctx: int = 0) -> Placement:
    """Place `model`'s weight matrices on `topo`'s nodes and return the pool to run it with.
    strategy "off" needs no topology and leaves the model as built (n_threads: its pool size);
    "auto" decides with `decide` (n_ctx: the KV cache it must leave room for)."""
    with numa_mem.packed():        # slices share per-node blocks (huge pages)
        return _apply(model, topo, strategy, nodes, threads_per_node, n_threads, n_ctx)


def _apply(model, topo: Topology | None, strategy: str, nodes: list[int] | None,
           threads_per_node: int | None, n_threads: int | None, n_ctx: int) -> Placement:
    if strategy not in STRATEGIES:
        raise NumallmError(f"--numa {strategy}: unknown strategy; use one of {', '.join(STRATEGIES)}")
    reason = None
    if strategy == "auto":
        if topo is None:
            strategy, reason = "off", "numa auto: off (no topology)"
        else:
            strategy, reason = decide(Needs.of(model), topo, n_ctx, nodes, threads_per_node, n_threads)
    if strategy == "off":
        for lin in model.linears():     # huge pages for the repacked copies (numa_mem.pack)
            if isinstance(lin, ops.Linear) and lin.unit.repacks:   # (not a GPU's matrices)
                lin.w = numa_mem.pack(lin.w)
        return Placement("off", [], threads.RowPool(n_threads or threads.physical_cores()), False, [],
                         reason)
    use = _node_threads(topo, nodes, threads_per_node, n_threads if strategy != "isolate" else None)
    if strategy == "isolate":
        nid, cpus, n = use[0]
        use = [(nid, cpus, threads_per_node or n_threads or len(cpus))]
    groups = _groups(use, topo)
    if strategy == "replicate":
        _check_copies_fit(model, topo, groups, n_ctx)
    pool = threads.NodePools([g.cpus for g in groups], [g.n_threads for g in groups])
    notes = []
    if topo.virtual:
        notes.append("virtual nodes: slices are allocated on the real node each was carved from")
    if any(g.mem_node is None for g in groups):
        notes.append(numa_mem.status().note)
    placement = Placement(strategy, groups, pool, topo.virtual, notes, reason)
    exchange = placement.exchange
    weights = [g.n_threads for g in groups]
    done: dict[int, ShardedLinear] = {}

    def rows(lin: ops.Linear) -> ops.Linear:
        if id(lin) not in done:                  # a tied output matrix is placed once
            done[id(lin)] = _row_split(lin, groups, pool, exchange, weights, strategy == "replicate")
            placement.linears.append(done[id(lin)])
        return done[id(lin)]

    _replace_linears(model, rows)                # token_embd, output
    if strategy == "replicate":
        for _, blk in _host_blocks(model):
            _replace_linears(blk, rows)
        return placement
    a = model.args
    for i, blk in _host_blocks(model):
        per = heads_per_unit(a.n_head, a.n_head_kv, a.head_dim, blk.attn_output.unit.block_size)
        heads = [(s * per, e * per) for s, e in split_units(a.n_head_kv // per, weights)]
        bs = blk.ffn_down.unit.block_size
        ff = [(s * bs, e * bs) for s, e in split_units(a.n_ff // bs, weights)]
        sb = ShardedBlock(blk, heads, ff, groups, pool, exchange, i)
        sb.attach(blk)
        placement.blocks.append(sb)
        placement.linears.extend(sb.records.values())
    return placement
