"""The placement planner: one pure function from (model declaration, topology, GPUs, request) to
the one Plan that `load` applies and `topo MODEL`, `plan`, `info` and chat `/stats` print.

    spec = ModelSpec.from_gguf(GGUFFile(path))            # header only: nothing is loaded
    plan = make_plan(spec, topo, Request(numa="auto", n_ctx=4096), gpus=[])
    plan.strategy, plan.reason                             # "shard", "numa auto: shard (...)"
    plan.nodes[i].weights / .kv / .scratch                 # bytes each node will hold
    plan.check_fits(avail)                                 # raises OutOfMemoryError with the numbers

Strategies (one vocabulary, everywhere): off (one unpinned pool, no node placement), shard (one
copy of the weights split over the nodes by the model's declared splits: heads, ff rows, rows),
replicate (a full copy per node, rows split), isolate (one node). "auto" is resolved here, before
the GPU planner runs, and the reason is kept in one line.

The KV cache size is the model config's formula (BaseArgs.kv_bytes_per_token); weights are the
tensors as stored in the GGUF. Nothing here allocates, imports Numba or touches the model's data.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..cache_types import DEFAULT_CACHE_TYPE, check_cache_type
from ..errors import NumallmError
from ..models.decl import FF, FF_EXP, FF_SHEXP, HEADS, MLA_HEADS, ROWS
from . import moe_split
from .moe_split import EXPERTS, MOE_SPLITS
from ..topology.plan import assumed_bandwidth
from .spec import ModelSpec
from .units import heads_per_unit, mla_heads, mla_unit, split_units  # noqa: F401 (re-exported)

STRATEGIES = ("auto", "off", "shard", "replicate", "isolate")
GiB = 2 ** 30
MiB = 2 ** 20
PREFILL_CHUNK = 512        # prompt tokens per forward pass: bounds the activation scratch
DEFAULT_CTX = 4096         # -c default: the model's trained context, at most this
ATTENTION_ROWS = 64        # query positions per block of prefill attention (ops.ATTENTION_BLOCK)
# A sharded decode step joins all nodes' threads DECODE_JOINS_PER_LAYER times per layer (+1 for
# the output matrix). JOIN_COST_S: what one join costs beyond the work (measured on the
# development VMs, benchmarks/results/; rounded up for threads further apart). auto counts it to
# tell when a model is too small to gain from more nodes.
DECODE_JOINS_PER_LAYER = 5
JOIN_COST_S = 10e-6
# auto picks replicate over shard when shard would give a node at least this multiple of its
# thread share of the attention, and a full copy takes at most REPLICA_FREE_SHARE of every node's
# free memory.
ATTN_IMBALANCE = 1.5
REPLICA_FREE_SHARE = 0.5


class OutOfMemoryError(NumallmError):
    """The plan does not fit in the memory the machine has for it."""


def default_ctx(context_length: int) -> int:
    return max(1, min(int(context_length or DEFAULT_CTX), DEFAULT_CTX))


# -- the request and the plan ----------------------------------------------------------------------

@dataclass(frozen=True)
class Request:
    """What the user asked for (the CLI flags map 1:1)."""

    numa: str = "auto"
    n_ctx: int = 0                       # 0: the model's context, at most DEFAULT_CTX
    n_threads: int | None = None
    nodes: tuple[int, ...] | None = None
    threads_per_node: int | None = None
    offload: object = None               # gpu.OffloadRequest, or None for CPU only
    n_seq: int = 1                       # KV caches planned (sessions / server slots)
    cache_type_k: str = DEFAULT_CACHE_TYPE   # KV cache element types on the CPU (-ctk / -ctv)
    cache_type_v: str = DEFAULT_CACHE_TYPE
    moe_split: str = "auto"              # MoE experts under shard: ff, experts (moe_split.py)

    def __post_init__(self):
        check_cache_type(self.cache_type_k, "--cache-type-k")
        check_cache_type(self.cache_type_v, "--cache-type-v")
        if self.moe_split not in MOE_SPLITS:
            raise NumallmError(f"--moe-split {self.moe_split}: unknown split; use one of "
                               f"{', '.join(MOE_SPLITS)}")
        if self.numa not in STRATEGIES:
            raise NumallmError(f"--numa {self.numa}: unknown strategy; use one of {', '.join(STRATEGIES)}")
        if self.n_ctx < 0:
            raise NumallmError(f"context size {self.n_ctx}: give a positive number of tokens (-c N)")


@dataclass(frozen=True)
class NodePlan:
    node: int                  # topology node (virtual or real); -1: not placed (off)
    cpus: tuple[int, ...]      # CPUs its threads run on
    n_threads: int
    weights: int               # bytes of weights it holds
    kv: int                    # bytes of KV cache it holds (all planned sequences)
    scratch: int               # activations of one prefill chunk
    free: int | None = None    # what the machine reports usable on it (None: unknown)

    @property
    def total(self) -> int:
        return self.weights + self.kv + self.scratch


@dataclass(frozen=True)
class Plan:
    strategy: str                            # off, shard, replicate, isolate
    reason: str | None                       # one line for auto's choice (None: asked for)
    n_ctx: int
    n_seq: int
    nodes: tuple[NodePlan, ...]
    splits: dict = field(default_factory=dict)   # unit -> [(a, b) per node] in unit counts
    heads_per_unit: int = 1
    weight_bytes: int = 0                    # every tensor as stored
    kv_bytes: int = 0                        # the whole KV cache (host types), n_seq sequences
    gpu: object = None                       # gpu.OffloadPlan when GPUs were asked for
    virtual: bool = False
    notes: tuple[str, ...] = ()
    active_bytes: int = 0                    # weight bytes a decoded token reads (MoE: k experts)
    experts: tuple[int, int] = (0, 0)        # (used per token, per layer); (0, 0): dense
    cache_types: tuple[str, str] = (DEFAULT_CACHE_TYPE, DEFAULT_CACHE_TYPE)   # K, V on the CPU

    @property
    def cache_label(self) -> str:
        """"f16", or "K q8_0, V f16" when they differ (the lines print it)."""
        k, v = self.cache_types
        return k if k == v else f"K {k}, V {v}"

    @property
    def host_weights(self) -> int:
        return sum(n.weights for n in self.nodes)

    @property
    def host_kv(self) -> int:
        return sum(n.kv for n in self.nodes)

    def check_fits(self) -> None:
        """Raise OutOfMemoryError (what, where, what to do) when a node's part exceeds what it
        has usable. Called before the first large allocation of a load."""
        for n in self.nodes:
            if n.free is None or n.total <= n.free:
                continue
            if self.strategy == "replicate":
                raise OutOfMemoryError(
                    f"--numa replicate: node {n.node} needs {n.total / GiB:.1f} GiB for its copy of "
                    f"the weights{' and the KV cache' if n.kv else ''} but has {n.free / GiB:.1f} GiB "
                    f"free; use --numa shard (one copy split over the nodes)")
            where = "this machine" if n.node < 0 or len(self.nodes) == 1 else f"node {n.node}"
            todo = ["use a smaller quantization"]
            if n.kv + n.scratch > n.total // 4:
                todo.insert(0, f"lower the context size (-c {self.n_ctx} needs a {_size(n.kv)} KV cache)")
            if self.strategy in ("isolate", "replicate"):
                todo.insert(0, "use --numa shard (one copy split over the nodes)")
            if self.gpu is not None or len(self.nodes) == 1:
                todo.append("put more layers on a GPU (-ngl)")
            raise OutOfMemoryError(
                f"the model needs {_size(n.total)} on {where} (weights {_size(n.weights)}, KV cache "
                f"{_size(n.kv)} for {self.n_ctx} tokens, scratch {_size(n.scratch)}) but "
                f"{_size(n.free)} is available; {' or '.join(todo)}")

    def lines(self) -> list[str]:
        """The plan in a few lines (topo MODEL, plan, /stats)."""
        head = [self.reason] if self.reason else []
        out = head + [f"numa: {self.strategy}" + (f" over {len(self.nodes)} "
                                                  f"{'virtual ' if self.virtual else ''}node(s)"
                                                  if self.strategy != "off" else "")]
        out.append(f"  weights {_size(self.weight_bytes)}, KV cache {_size(self.kv_bytes)} "
                   f"({self.n_ctx} tokens x {self.n_seq} sequence(s), {self.cache_label})")
        if self.experts[1]:
            out.append(f"  experts: {self.experts[0]} of {self.experts[1]} per token; a decoded "
                       f"token reads {_size(self.active_bytes)} of the weights")
        for n in self.nodes:
            where = "unplaced" if n.node < 0 else f"node {n.node}"
            free = f" of {_size(n.free)} available" if n.free is not None else ""
            out.append(f"  {where}: {n.n_threads} threads, weights {_size(n.weights)} + KV "
                       f"{_size(n.kv)} + scratch {_size(n.scratch)} = {_size(n.total)}{free}")
        return out + [f"  note: {x}" for x in self.notes]

    def to_dict(self) -> dict:
        return {"strategy": self.strategy, "reason": self.reason, "n_ctx": self.n_ctx,
                "n_seq": self.n_seq, "weight_bytes": self.weight_bytes, "kv_bytes": self.kv_bytes,
                "cache_type_k": self.cache_types[0], "cache_type_v": self.cache_types[1],
                "virtual": self.virtual, "notes": list(self.notes),
                "active_bytes": self.active_bytes, "experts": list(self.experts),
                "nodes": [{"node": n.node, "cpus": list(n.cpus), "threads": n.n_threads,
                           "weights": n.weights, "kv": n.kv, "scratch": n.scratch, "total": n.total,
                           "free": n.free} for n in self.nodes],
                "gpu": None if self.gpu is None else self.gpu.to_json()}


def _size(n: int) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / MiB:.1f} MiB"


def scratch_bytes(a, n_ctx: int) -> int:
    """Float32 activations of one prefill chunk: the residual stream and its norm, q/k/v, the
    attention output and the scores of one block of query rows, gate and up, the logits of the
    last token."""
    t = min(PREFILL_CHUNK, n_ctx)
    per_tok = 3 * a.n_embd + a.q_dim + 2 * a.kv_dim + a.q_dim + 2 * a.n_ff
    scores = a.n_head * min(t, ATTENTION_ROWS) * n_ctx
    return 4 * (t * per_tok + scores + a.n_vocab)


# -- choosing nodes and a strategy ----------------------------------------------------------------

def node_threads(topo, nodes, threads_per_node: int | None,
                 n_threads: int | None) -> list[tuple[int, tuple[int, ...], int]]:
    """(node, CPUs, threads) for each node to use: one CPU per physical core the process may use
    (hyperthreads add no decode bandwidth). -t N without --threads-per-node spreads N threads over
    the nodes in proportion to their cores (a node that gets none is left out)."""
    cpu_nodes = {n.id: n for n in topo.cpu_nodes}
    allowed = set(topo.process.allowed_cpus)
    cores = {nid: tuple(sorted(next(t for t in c.threads if t in allowed) for c in nd.cores
                               if any(t in allowed for t in c.threads)))
             for nid, nd in cpu_nodes.items()}
    chosen = list(nodes) if nodes is not None else [n for n in sorted(cores) if cores[n]]
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
    n_head_kv: int            # attention heads shard spreads: KV heads (MLA: its heads)
    heads_per_unit: int       # KV heads a shard must keep together (heads_per_unit())

    @classmethod
    def of(cls, spec: ModelSpec, cache_types: tuple[str, str] = (DEFAULT_CACHE_TYPE,) * 2) -> "Needs":
        a = spec.args
        mla = mla_unit(spec)          # MLA: attention spreads by its heads (one shared latent)
        if mla is not None:
            return cls(spec.weight_bytes, a.kv_bytes_per_token(), a.n_layer, a.n_head, mla)
        per = heads_per_unit(a.n_head, a.n_head_kv, a.head_dim, spec.block_size((1, HEADS)))
        return cls(spec.weight_bytes, a.kv_bytes_per_token(*cache_types), a.n_layer, a.n_head_kv, per)


def decide(needs: Needs, topo, n_ctx: int, nodes=None, threads_per_node: int | None = None,
           n_threads: int | None = None) -> tuple[str, str]:
    """`--numa auto`: (strategy, the one-line reason). Pure: reads only `topo` and `needs`.

    one CPU node -> off (one chosen node of several -> isolate); a model so small that one node
    reads it faster than N nodes synchronise (a decode step's joins) -> isolate; KV heads that cannot
    be spread in proportion to the nodes' threads -> replicate when a full copy takes at most half
    of every node's free memory; otherwise shard."""
    use = node_threads(topo, nodes, threads_per_node, n_threads)
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


# -- the planner -----------------------------------------------------------------------------------

def make_plan(spec: ModelSpec, topo, req: Request, gpus=None, gpu_why: str | None = None,
              available: int | None = None) -> Plan:
    """The one plan for `spec` on `topo` (None: no topology, strategy off) with GPU inventory
    `gpus` (gpu_why: why it is empty). available: usable host memory in bytes (psutil's
    available; None: not checked) spread over the nodes' free memory."""
    a = spec.args
    n_ctx = req.n_ctx or default_ctx(a.context_length)
    types = (req.cache_type_k, req.cache_type_v)
    a.check_cache_types(*types)
    strategy, reason = req.numa, None
    if strategy == "auto":
        if topo is None:
            strategy, reason = "off", "numa auto: off (no topology)"
        else:
            strategy, reason = decide(Needs.of(spec, types), topo, n_ctx, req.nodes, req.threads_per_node,
                                      req.n_threads)
    if strategy != "off" and topo is None:
        raise NumallmError(f"--numa {strategy} needs the machine's topology, which could not be read")

    gplan = None
    if req.offload is not None:            # (asking for no layers still gets the CPU-only plan)
        from ..gpu.plan import make_plan as gpu_make_plan

        host_bw = None
        if topo is not None:
            used = [n for n in topo.cpu_nodes if req.nodes is None or n.id in req.nodes]
            used = used[:1] if strategy == "isolate" else used
            if used:
                host_bw = (sum(assumed_bandwidth(n) for n in used), "assumed from its cores")
        gplan = gpu_make_plan(spec.source, n_ctx, req.offload, list(gpus or []), PREFILL_CHUNK,
                              host_bandwidth=host_bw, no_gpu=gpu_why, host_kv=types)
    on_gpu = set()
    gpu_layers = set()
    if gplan is not None:
        for u in (*gplan.layers, gplan.output):
            if u.device is not None:
                on_gpu.update(u.tensors)
                gpu_layers.add(u.index)
    tied_head_on_gpu = gplan is not None and gplan.output.device is not None and \
        "token_embd.weight" in gplan.output.tensors

    # nodes and their threads
    if strategy == "off":
        cores = [] if topo is None else [c for _, cpus, _ in node_threads(topo, None, None, None)
                                           for c in cpus]
        groups = [(-1, (), req.n_threads or len(cores))]   # 0: the pool's default
    else:
        use = node_threads(topo, req.nodes, req.threads_per_node,
                           req.n_threads if strategy != "isolate" else None)
        if strategy == "isolate":
            nid, cpus, n = use[0]
            use = [(nid, cpus, req.threads_per_node or req.n_threads or len(cpus))]
        groups = use
    weights_by = [float(t) or 1.0 for _, _, t in groups]
    n = len(groups)

    # the declared splits in units, per node
    per = heads_per_unit(a.n_head, a.n_head_kv, a.head_dim, spec.block_size((1, HEADS)))
    ff_bs = spec.block_size((1, FF))
    heads = [(s * per, e * per) for s, e in split_units(a.n_head_kv // per, weights_by)]
    ff = [(s * ff_bs, e * ff_bs) for s, e in split_units(a.n_ff // ff_bs, weights_by)] \
        if a.n_ff % ff_bs == 0 else [(0, a.n_ff)] + [(a.n_ff, a.n_ff)] * (n - 1)
    share = {HEADS: [(h1 - h0) / a.n_head_kv for h0, h1 in heads],
             FF: [(f1 - f0) / a.n_ff for f0, f1 in ff],
             ROWS: [w / sum(weights_by) for w in weights_by]}
    splits = {HEADS: heads, FF: ff}
    mla = mla_heads(spec, weights_by)
    if mla is not None:                        # whole heads, attn_output columns whole blocks
        splits[MLA_HEADS] = mla
        share[MLA_HEADS] = [(h1 - h0) / a.n_head for h0, h1 in mla]
    else:
        share[MLA_HEADS] = share[ROWS]
    # every expert's ff rows (and the shared expert's), cut where the down matrices' column
    # quant blocks allow, like the dense ff, and at whole quant blocks of gate/up too (a multiple
    # of their kernels' 8-row groups)
    for unit, width in ((FF_EXP, a.n_ff_exp), (FF_SHEXP, a.n_ff_shexp)):
        col = 2 if unit == FF_EXP else 1
        bs = max(spec.block_size((col, unit)), spec.block_size((col - 1, unit)))
        if not width:
            share[unit] = share[ROWS]
            continue
        cut = [(s * bs, e * bs) for s, e in split_units(width // bs, weights_by)] \
            if width % bs == 0 else [(0, width)] + [(width, width)] * (n - 1)
        splits[unit] = cut
        share[unit] = [(e - s) / width for s, e in cut]
    moe, moe_why = moe_split.choose(a, req.moe_split, strategy, n)
    if moe == "experts":                       # whole experts per node instead
        splits[EXPERTS] = split_units(a.n_expert, weights_by)
        share[FF_EXP] = [(e - s) / a.n_expert for s, e in splits[EXPERTS]]
    if moe_why:
        reason = f"{reason}; {moe_why}" if reason else moe_why

    w_node = [0.0] * n
    for t in spec.tensors:
        if t.name in on_gpu and not (t.name == "token_embd.weight" and tied_head_on_gpu):
            continue                           # (a tied head's lookup copy stays on the host)
        if strategy == "replicate":
            for i in range(n):
                w_node[i] += t.nbytes
        elif strategy == "shard" and t.decl.split is not None:
            for i in range(n):
                w_node[i] += t.nbytes * share[t.decl.split[1]][i]
        elif strategy == "shard" and t.decl.kind == "matrix" and t.layer is not None:
            for i in range(n):                 # a router: a copy per node (placement/sharded.py)
                w_node[i] += t.nbytes
        else:                                  # one node, or a small tensor held once
            w_node[0] += t.nbytes
    w_node[0] += spec.extra_bytes
    layer_kv = a.layer_kv_bytes(n_ctx, *types) * req.n_seq
    cpu_layers = a.n_layer - len([i for i in gpu_layers if i < a.n_layer])
    kv_host = layer_kv * cpu_layers
    # shard: each node its KV heads' share; MLA heads all read the one latent, so every node
    # with MLA heads keeps a whole copy of it
    kv_share = share[HEADS] if mla is None else [1.0 if h1 > h0 else 0.0 for h0, h1 in mla]
    kv_node = [kv_host * kv_share[i] for i in range(n)] if strategy == "shard" else \
        [kv_host] + [0] * (n - 1)
    scratch = scratch_bytes(a, n_ctx)
    # a copy per node is the costly strategy: it must fit in each node's free memory as it is
    free = _usable(topo, [g[0] for g in groups], None if strategy == "replicate" else available)
    nodes = tuple(NodePlan(g[0], tuple(g[1]), g[2], int(w_node[i]), int(kv_node[i]),
                           scratch * req.n_seq if i == 0 else scratch, free[i])
                  for i, g in enumerate(groups))
    notes = []
    if topo is not None and topo.virtual and strategy != "off":
        notes.append("virtual nodes: slices are allocated on the real node each was carved from")
    return Plan(strategy, reason, n_ctx, req.n_seq, nodes, splits, per,
                spec.weight_bytes, a.kv_bytes(n_ctx, *types) * req.n_seq, gplan,
                bool(topo is not None and topo.virtual), tuple(notes), spec.active_bytes,
                (a.n_expert_used, a.n_expert), types)


def _usable(topo, node_ids: list[int], available: int | None) -> list[int | None]:
    """Bytes usable per planned node: psutil's available memory (page cache counts as usable)
    shared out by the nodes' free memory; unknown without `available`."""
    by_id = {} if topo is None else {nd.id: nd for nd in topo.nodes}
    if available is None:        # the topology's free memory, where there is one
        if topo is None:
            return [None] * len(node_ids)
        if node_ids == [-1]:
            return [sum(nd.mem_free_bytes for nd in topo.nodes)]
        return [by_id[i].mem_free_bytes if i in by_id else None for i in node_ids]
    if topo is None or node_ids == [-1] or len(topo.nodes) == 1:
        return [available] + [None] * (len(node_ids) - 1)
    total_free = sum(nd.mem_free_bytes for nd in topo.nodes) or 1
    return [int(available * by_id[i].mem_free_bytes / total_free) if i in by_id else None
            for i in node_ids]
