"""The library API: `load(path)` -> `LLM`, a loaded model with one session; `LoadedModel` for
several sessions over one copy of the weights.

    import numallm
    llm = numallm.load("model.gguf", n_ctx=2048, n_threads=2)
    for chunk in llm.stream("Once upon a time", max_tokens=50, temperature=0):
        print(chunk.text, end="", flush=True)

    loaded = numallm.LoadedModel("model.gguf", n_ctx=2048)
    a, b = loaded.session(), loaded.session()          # two conversations, one model

Loading goes: read the GGUF header -> plan (numallm.placement.make_plan: where every tensor goes,
bytes per node and GPU) -> refuse with the numbers when it does not fit -> build the model ->
GPU offload and NUMA placement apply the plan. Nothing large is allocated before the check.
"""
from __future__ import annotations

import threading
import time
import numpy as np
import psutil

from . import threads
from .errors import NumallmError
from .gguf_file import GGUFFile
from .cache_types import DEFAULT_CACHE_TYPE, check_cache_type
from .placement import DEFAULT_CTX, PREFILL_CHUNK, ModelSpec, Request, make_plan
from .session import GenerationChunk, GenerationResult, Session

__all__ = ["DEFAULT_CTX", "PREFILL_CHUNK", "GenerationChunk", "GenerationResult", "LoadedModel",
           "LLM", "Session", "load", "plan_model"]


def plan_model(path: str, req: Request | None = None, virtual_nodes: int | None = None,
               topology: str | None = None):
    """(GGUFFile, ModelSpec, Plan, topology) for loading `path` as `req` asks (placement.Request:
    the CLI flags): reads only the file's header and the machine (or, with `topology`, the machine
    a `topo --json` file describes, its free memory as the file says), carved into
    `virtual_nodes` if given. The plan `numallm plan`, `topo MODEL` and `info` print."""
    req = Request() if req is None else req
    f = GGUFFile(path)
    spec = ModelSpec.from_gguf(f)
    topo = None
    if req.numa != "off":
        from .topology import discover
        from .topology import virtual_nodes as carve

        if topology is not None:
            from .topology.virtual import load_topology_file

            topo = load_topology_file(topology)
        else:
            topo = discover()
        topo = carve(topo, virtual_nodes) if virtual_nodes else topo
    gpus, why = [], None
    if req.offload is not None:
        from .gpu import discover_gpus

        gpus, why = discover_gpus()
    plan = make_plan(spec, topo, req, gpus, why,
                     available=None if topology is not None else psutil.virtual_memory().available)
    return f, spec, plan, topo


class LoadedModel:
    """A model loaded once, placed as its plan says; sessions run over it (`session()`)."""

    def __init__(self, path: str, n_ctx: int | None = None, n_threads: int | None = None,
                 chat_template: str | None = None, numa: str = "off", virtual_nodes: int | None = None,
                 nodes: list[int] | None = None, threads_per_node: int | None = None,
                 offload=None, n_seq: int = 1, progress=None,
                 cache_type_k: str = DEFAULT_CACHE_TYPE, cache_type_v: str = DEFAULT_CACHE_TYPE, moe_split: str = "auto"):
        from .chat_template import ChatTemplate
        from .placement.runtime import apply_plan
        from .tokenizer import Tokenizer

        # options first, so a bad value fails before the file is read (ranges: numallm.sampling)
        n_threads, self.threads_note = threads.check_threads(n_threads, "n_threads")
        threads_per_node = threads.check_threads(threads_per_node, "threads_per_node")[0]
        check_cache_type(cache_type_k, "cache_type_k")
        check_cache_type(cache_type_v, "cache_type_v")
        self.path = str(path)
        if n_ctx is not None and n_ctx <= 0:
            raise NumallmError(f"context size {n_ctx} must be positive (-c N)")
        req = Request(numa=numa, n_ctx=n_ctx or 0, n_threads=n_threads,
                      nodes=None if nodes is None else tuple(nodes),
                      threads_per_node=threads_per_node, offload=offload, n_seq=n_seq,
                      cache_type_k=cache_type_k, cache_type_v=cache_type_v, moe_split=moe_split)
        self.file, self.spec, self.plan, topo = plan_model(path, req, virtual_nodes)
        self.plan.check_fits()                 # before the first large allocation
        self.n_ctx = self.plan.n_ctx
        self.tokenizer = Tokenizer.from_metadata(self.file.metadata)
        self.template = ChatTemplate.from_metadata(
            self.file.metadata, lambda i: self.tokenizer.token_to_piece(i).decode("utf-8", "replace"),
            name=None if chat_template is None else "--chat-template", source=chat_template)
        from .models import get_module

        self.model = get_module(self.file.architecture).Model(self.file, progress)
        self.args = self.model.args
        self.notices: list[str] = []           # one-line notices for the CLI to show
        self.offload = None
        gpu_layers = frozenset()
        if self.plan.gpu is not None and offload.wants_gpu:
            from .gpu import offload as gpu_offload

            self.offload = gpu_offload.apply_plan(self.model, self.plan.gpu, self.n_ctx, self.file)
            self.notices.append(self.offload.announcement())
            gpu_layers = frozenset(self.offload.gpu_layers())
        self.placement = apply_plan(self.model, self.plan, topo, gpu_layers,
                                    self.offload.host_experts() if self.offload is not None else [])
        if self.plan.reason:
            self.notices.append(self.plan.reason)
        self.pool = self.placement.pool
        self.lock = threading.RLock()          # one forward step at a time over the shared pool
        self.passes = 0                        # model forward passes run (a batch counts once)

    @property
    def weight_bytes(self) -> int:
        """Bytes of every weight matrix as stored, on the host or on a GPU."""
        gpu = self.offload.block_matrix_bytes() if self.offload is not None else 0
        return sum(m.nbytes for m in self.model.linears() + self.model.experts()) + gpu

    @property
    def active_bytes(self) -> int:
        """Weight bytes one decoded token reads: weight_bytes less the embedding table (one row
        of it is read, unless it is also the output matrix) and, of each routed expert tensor,
        only the expected share (n_expert_used of n_expert experts)."""
        a, m = self.args, self.model
        out = self.weight_bytes
        if m.output is not m.token_embd:
            out -= m.token_embd.nbytes
        if a.n_expert:
            exp = sum(e.nbytes for e in m.experts() + (self.offload.experts() if self.offload else []))
            out -= exp - exp * a.n_expert_used // a.n_expert
        return out

    def new_cache(self) -> list:
        """A fresh KV cache (one entry per layer) where the plan puts each layer's cache."""
        cache = self.model.new_cache(self.n_ctx, *self.plan.cache_types)
        if self.offload is not None:
            cache = self.offload.adopt_cache(cache)
        return self.placement.adopt_cache(cache)

    def session(self) -> Session:
        return Session(self)

    def forward(self, tokens: np.ndarray, cache: list, pos0: int, last_only: bool = True) -> np.ndarray:
        """One forward step of a session: the model's lock and thread activation held only here."""
        with self.lock, threads.activate(self.pool):
            self.passes += 1
            t0 = time.perf_counter()
            out = self.model(tokens, cache, pos0, last_only=last_only)
            if self.offload is not None:               # where layers ran: the host's share
                self.offload.host_pass(len(tokens), time.perf_counter() - t0)
            return out

    def forward_batch(self, tokens, caches: list[list], positions) -> np.ndarray:
        """One decode step of several sequences: token i at position positions[i] over the cache
        caches[i] (a session's per-layer list) -> logits float32 (B, n_vocab), row i that
        sequence's. Every weight matrix sees the B rows in one product (one pass over the
        weights); RoPE and attention run per row on its own position and cache (under NUMA
        shard each node's rows of each sequence's cache). With GPU offload each sequence runs
        its own forward instead, with the same result."""
        tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)             # (B,)
        positions = np.asarray(positions, dtype=np.int64).reshape(-1)       # (B,)
        if not len(tokens) == len(positions) == len(caches) or not len(tokens):
            raise NumallmError(f"a batch needs one token, position and cache per sequence; got "
                               f"{len(tokens)} tokens, {len(positions)} positions, {len(caches)} caches")
        if positions.min() < 0 or positions.max() >= self.n_ctx:
            raise NumallmError(f"batch positions {positions.tolist()} outside the context 0..{self.n_ctx - 1}")
        if not self.batchable(caches):
            return np.concatenate([self.forward(tokens[i:i + 1], caches[i], int(positions[i]))
                                   for i in range(len(tokens))])
        from . import ops     # here: importing numallm (topo, info) must not load Numba

        per_layer = [ops.BatchCaches([c[layer] for c in caches]) for layer in range(len(caches[0]))]
        with self.lock, threads.activate(self.pool), ops.batch_step():
            self.passes += 1
            return self.model(tokens, per_layer, positions, last_only=False)

    def decode(self, gens: list) -> None:
        """One decode step of several generations (Session.start, each on its own session) as
        one forward_batch: each gets its next logits (Generation.fed)."""
        if len({id(g.session) for g in gens}) != len(gens):
            raise NumallmError("a batch holds one generation per session (each has one KV cache)")
        logits = self.forward_batch([g.token for g in gens], [g.session.cache for g in gens],
                                    [g.position for g in gens])                      # (B, n_vocab)
        for g, row in zip(gens, logits):
            g.fed(row)

    def batchable(self, caches: list[list]) -> bool:
        """Whether forward_batch runs these sequences as one pass (host caches, including NUMA
        shard's per-node ones; no GPU offload)."""
        from . import ops

        return (self.offload is None and len(caches) > 1
                and all(isinstance(c, ops.HostCache) for cache in caches for c in cache))

    def chat_tokens(self, messages: list[dict]) -> list[int]:
        """The prompt tokens for `messages` with the model's chat template."""
        text = self.template.render(messages, add_generation_prompt=True)
        toks = self.tokenizer.encode(text, add_special=False, parse_special=True)
        bos = self.tokenizer.bos_id
        if self.tokenizer.add_bos and bos is not None and (not toks or toks[0] != bos):
            toks = [bos] + toks
        return toks

    def close(self) -> None:
        self.pool.close()


class LLM(Session):
    """A loaded model with one session: today's single-conversation API, a thin layer over
    LoadedModel + Session (`llm.loaded.session()` opens more conversations on the same weights)."""

    # read through to the loaded model, which owns them (not copied: one owner per fact)
    _LOADED = frozenset({"path", "file", "model", "args", "template", "offload", "placement",
                         "pool", "plan", "notices", "threads_note", "weight_bytes",
                         "active_bytes"})

    def __init__(self, path: str, **options):
        super().__init__(LoadedModel(path, **options))

    def __getattr__(self, name: str):
        if name in LLM._LOADED:
            return getattr(self.loaded, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def session(self) -> Session:
        """Another conversation on this model's weights."""
        return self.loaded.session()

    def close(self) -> None:
        self.loaded.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def load(path: str, **options) -> LLM:
    """Load a GGUF model. options: n_ctx, n_threads, chat_template (a Jinja source override),
    numa ("off" by default, "auto", "shard", "replicate", "isolate"), virtual_nodes (carve this
    machine into N nodes), nodes, threads_per_node (see numallm.placement); offload: a
    numallm.gpu.OffloadRequest (blocks to run on GPUs; see numallm.gpu.offload); n_seq: KV caches
    to plan memory for; cache_type_k, cache_type_v: the KV cache's element types on the CPU
    ("f16" by default, "f32", "q8_0"; llama.cpp's -ctk / -ctv); progress: a callable(done, total)
    called as the blocks are built. Raises placement.OutOfMemoryError (with the numbers) before
    loading when the plan does not fit. `llm.loaded.notices` holds one-line notices (GPU
    offload, numa auto)."""
    return LLM(path, **options)

