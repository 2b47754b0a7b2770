"""The ops interface model files call: linear layers over quantized weights, norms, RoPE,
attention. Model files never call kernels, threads or devices directly, so the kernels, the
thread pools, NUMA placement and GPU offload can change without touching them: an executor below
the model registers its tensor types (`register_executor`; numallm.gpu.device does) and the ops
given those run there, so each architecture keeps one forward.
"""
from __future__ import annotations

import contextlib
import math
import threading
import time
from typing import Callable

import numpy as np
import numallm_kernels
from numallm_kernels.base import Activations

from numallm_kernels import _decode_timing, fused

from . import numa_mem, threads
from .errors import UnsupportedError
from .gguf_file import QTensor

# Executors below the model (numallm.gpu) register their tensor and matrix types here: an op
# whose weight (matmuls: its first matrix; swiglu and RoPE: their input) is of a registered type
# runs that executor's version of the op, so a model's one forward runs unchanged wherever its
# tensors are. The CPU path pays one dict lookup per op.
_EXECUTORS: dict[type, object] = {}


# kernel calibration times decode as it runs here: each product one dispatch to a RowPool, at
# 1 thread and at the physical cores (the default thread count)
_decode_timing.register_dispatch(threads.RowPool, lambda: (1, threads.physical_cores()))


def register_executor(cls: type, impl) -> None:
    """Ops given a `cls` run `impl.matmuls / rms_norm / swiglu / rope` (numallm.gpu.device)."""
    _EXECUTORS[cls] = impl


def kernel_unit(qt: QTensor):
    """The kernel unit for `qt`'s quantization type, or a one-line UnsupportedError."""
    try:
        return numallm_kernels.get(qt.qtype)
    except KeyError:
        raise UnsupportedError(
            f"tensor {qt.name} uses quantization type {qt.qtype.name}, which numallm cannot "
            f"compute yet; use a model quantized to one of "
            f"{', '.join(t.name for t in numallm_kernels.registered_types())}") from None


class Linear:
    """A weight matrix W of shape (N, K) kept in its GGUF encoding; `lin(x)` = x @ W.T.

    x: float32 (T, K) -> float32 (T, N). The rows of W are split over the current thread pool.
    Several matrices that read the same input go through `matmuls` together: one encoding of x
    and one dispatch to the pool for all of them.
    """

    # its jobs are kernel tasks over its own rows (add_jobs below): a decode dispatch of it can
    # be encoded once and replayed (see _Replay); subclasses that add steps set this False
    replayable = True
    _replays: dict | None = None

    def __init__(self, qt: QTensor):
        self.unit = kernel_unit(qt)
        if len(qt.shape) != 2:
            raise UnsupportedError(f"tensor {qt.name} has shape {qt.shape}; a 2-D matrix was expected")
        self.name = qt.name
        self.qtype = qt.qtype
        self.shape = qt.shape            # (N, K)
        self.nbytes = qt.nbytes
        self.raw = qt.data               # (N, row_bytes) uint8 GGUF view: placement slices it
        self.w = self.unit.prepare(qt.data)
        if self.unit.repacks:
            # the prepared copy holds the weights now: drop the file pages read while copying,
            # or they would stay in our RSS next to it (placement re-reads them if it needs to)
            numa_mem.release_file_pages(qt.data)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return matmuls(x, self)[0]

    def pool(self) -> threads.RowPool:
        """The pool this matrix's rows run on."""
        return threads.current()

    def add_jobs(self, acts: Activations, out: np.ndarray, jobs: list[list]) -> Callable[[], None] | None:
        """Append to jobs[i] what thread i of `pool()` computes of out = acts.x @ W.T, out float32
        (T, N) (see `task`). Returns a step to run once every thread is done, or None."""
        for i, (a, b) in enumerate(threads.split_rows(self.shape[0], len(jobs), self.unit.row_multiple)):
            jobs[i].append(task(self.unit, self.w, acts, out, a, b))
        return None

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """Dequantized rows `ids` (an embedding lookup): float32 (len(ids), K)."""
        out = np.empty((len(ids), self.shape[1]), dtype=np.float32)
        for i, r in enumerate(ids):
            self.unit.dequantize(self.w, out[i:i + 1], int(r), int(r) + 1)
        return out


def _timed(fn, spans: list):
    def run():
        t0 = time.perf_counter()
        try:
            return fn()
        finally:
            spans.append((t0, time.perf_counter()))     # list.append is atomic
    return run


def task(unit, w, acts: Activations, out: np.ndarray, r0: int, r1: int):
    """out[:, r0:r1] = acts.x @ W[r0:r1].T as something a pool share holds: the unit's native
    kernel task where it has one (run without the GIL), else a call of unit.matmul_x."""
    if _spans is not None:       # timing (see `timing`): a Python call a timer can see
        return _timed(lambda: unit.matmul_x(w, acts, out, r0, r1), _spans)
    return unit.native_task(w, acts, out, r0, r1) or (lambda: unit.matmul_x(w, acts, out, r0, r1))


class _Replay:
    """One decode dispatch of matmuls(x, *lins) on one pool, encoded once: the activation forms,
    the outputs and the pool's task table stay allocated, so a token costs one fill of the forms
    (a Numba call per form), one run of the table, the matrices' steps (placement's sums of
    partial products, over buffers made here) and a copy of each output. Python work per
    dispatch was most of the decode time outside the kernels (~60-100 us per dispatch, two
    thirds of it encoding tasks) and grows with the thread count."""

    def __init__(self, x: np.ndarray, lins: tuple[Linear, ...], pool: threads.RowPool):
        self.ws = tuple(lin.w for lin in lins)          # what the table's addresses point into
        self.epoch = REPLAY_EPOCH
        self.acts = Activations(x.copy())
        # a RowPool of several threads claims the rows in smaller tasks (RowPool.bind_claimed)
        claim = pool.claim_shares() if isinstance(pool, threads.RowPool) else 0
        jobs: list[list] = [[] for _ in range(claim or pool.n_threads)]
        self.outs, self.steps = [], []
        for lin in lins:
            lin.unit.prepare_x(self.acts)
            out = np.empty((x.shape[0], lin.shape[0]), dtype=np.float32)   # (T, N)
            step = lin.add_jobs(self.acts, out, jobs)
            if step is not None:
                self.steps.append(step)
            self.outs.append(out)
        # per token: copy x in, refill each form, run the table (a call bound once, so the
        # per-token Python is a few calls, not the pool's general path)
        self.fills = [(make.fill, self.acts._forms[key]) for key, make in self.acts.makers.items()]
        if claim:
            self.run = pool.bind_claimed(jobs) if self.acts.refillable else None
            self.ok = self.run is not None
            return
        enc = pool.encode(jobs) if self.acts.refillable else None
        self.ok = enc is not None
        self.table, self.spans = enc if self.ok else (None, None)
        self.run = pool.bind_encoded(self.table, self.spans) if self.ok else None

    def __call__(self, x: np.ndarray, norm: np.ndarray | None = None, eps: float = 0.0) -> list[np.ndarray]:
        """The outputs for input x (1, K); with `norm`, for rms_norm(x, norm, eps) written
        straight into the activation buffer (no array of its own, no second pass)."""
        t0 = time.perf_counter()
        xa = self.acts.x
        if norm is None:
            np.copyto(xa, x)
        else:
            fused.rms_norm(x, norm, eps, xa)
        for fill, arrays in self.fills:
            fill(xa, *arrays)
        self.run()
        if _spans is not None:      # one span: encoding the input to the last thread's end
            _spans.append((t0, time.perf_counter()))
        for step in self.steps:
            step()
        return [o.copy() for o in self.outs]


# decode dispatches replayed per first matrix (keyed by the matrices, the pool and x's shape):
# one row, or, inside `batch_step` (a batched decode step of B sequences), up to REPLAY_BATCH_T
# rows when every matrix is a plain Linear on a RowPool. Not prefill chunks: each would keep its
# own buffers for every prompt length. Multi-row replays of node views and column-split products
# gave wrong results (their multi-row jobs hold buffers and copies of x made when encoded), so
# those replay one row only. A replay of B rows keeps B rows of its inputs and outputs, so the
# B = 2..8 replays of a server with 8 slots hold ~50 rows of activations per layer, within the
# plan's scratch (one prefill chunk per sequence) for models up to ~80 layers.
REPLAY_MAX_T = 1
REPLAY_BATCH_T = 8
_REPLAYS_PER_MATRIX = 2 * REPLAY_BATCH_T


class _StepFlag(threading.local):
    on = False                # inside batch_step, on this thread


_step = _StepFlag()


@contextlib.contextmanager
def batch_step():
    """The products inside are a batched decode step's (LoadedModel.forward_batch): those of up
    to REPLAY_BATCH_T rows replay their encoded dispatches as one token's do."""
    prev, _step.on = _step.on, True
    try:
        yield
    finally:
        _step.on = prev


def in_batch_step() -> bool:
    """Whether this thread is inside `batch_step`."""
    return _step.on


# bumped to drop every replay
REPLAY_EPOCH = 0
# (start, end) spans of kernel calls while `timing` is on, else None
_spans: list | None = None


@contextlib.contextmanager
def timing(spans: list):
    """While on, every matrix kernel call of `matmuls` (products and the encoding of their input)
    appends its wall-clock (start, end) to `spans`, from any thread. Products then run as Python
    calls of the units' matmul_x rather than native tasks (those run inside Numba, out of reach
    of a timer), except the decode dispatches replayed from tables encoded before: each counts
    as one span. No replay is made while on (it would encode the timed calls)."""
    global _spans
    prev, _spans = _spans, spans
    try:
        yield spans
    finally:
        _spans = prev


def _replay(x: np.ndarray, lins: tuple[Linear, ...], pool) -> _Replay | None:
    first = lins[0]
    key = (lins, pool, x.shape)          # matrices and pools hash by identity
    r = first._replays.get(key) if first._replays is not None else None
    if r is not None and r.epoch == REPLAY_EPOCH and all(a is lin.w for a, lin in zip(r.ws, lins)):
        return r if r.ok else None       # made under the checks below (same pool, same shape)
    if not isinstance(pool, (threads.RowPool, threads.NodePools)) or \
            not all(lin.replayable for lin in lins) or _spans is not None:
        return None
    if x.shape[0] > REPLAY_MAX_T and (x.shape[0] > REPLAY_BATCH_T or not in_batch_step()
                                      or type(pool) is not threads.RowPool
                                      or any(type(lin) is not Linear for lin in lins)):
        return None
    if first._replays is None:
        first._replays = {}
    if len(first._replays) >= _REPLAYS_PER_MATRIX:
        first._replays.clear()
    r = first._replays[key] = _Replay(x, lins, pool)
    return r if r.ok else None


def _host_dispatch(x: np.ndarray, lins: tuple[Linear, ...]) -> tuple[_Replay | None, object]:
    """(the replay of matmuls(x, *lins) or None, the pool it runs on; pool None: the matrices
    run on different pools). x: float32 C-contiguous (T, K)."""
    pool = lins[0].pool()
    for lin in lins[1:]:
        if lin.pool() is not pool:
            return None, None
    return _replay(x, lins, pool), pool


# a prefill's per-token ops with this many rows or more (the activation encoding of matmuls,
# SwiGLU) run on every thread of the pool, each its share of the rows: on one thread, with the
# others waiting, they were ~9% of a 2-thread prefill (benchmarks/results/2026-12-07-zen5-*)
SPLIT_ROWS_MIN = 32


def _splits_rows(pool, n: int) -> bool:
    return n >= SPLIT_ROWS_MIN and type(pool) is threads.RowPool and pool.n_threads > 1


def _on_rows(pool, n: int, fn: Callable[[int, int], None]) -> None:
    """fn(a, b) over row ranges covering [0, n), one per thread of `pool`, at once (fn is a
    nogil kernel call over rows a..b-1: the threads' ranges run concurrently)."""
    cuts = [n * i // pool.n_threads for i in range(pool.n_threads + 1)]
    pool.run_tasks([[lambda a=a, b=b: fn(a, b)] for a, b in zip(cuts, cuts[1:])])


def matmuls(x: np.ndarray, *lins: Linear) -> list[np.ndarray]:
    """[x @ W.T for each W in lins], x: float32 (T, K). x is encoded once per kernel form and all
    matrices go to the pool in one dispatch (each thread takes its rows of every matrix)."""
    ex = _EXECUTORS.get(type(lins[0]))
    if ex is not None:
        return ex.matmuls(x, *lins)
    x = np.ascontiguousarray(x, dtype=np.float32)
    replay, pool = _host_dispatch(x, lins)
    if replay is not None:
        return replay(x)
    if pool is None:
        return [matmuls(x, lin)[0] for lin in lins]
    acts = Activations(x)
    if _splits_rows(pool, x.shape[0]):
        acts.split = lambda fill, x, arrays: _on_rows(
            pool, x.shape[0], lambda a, b: fill(x[a:b], *(r[a:b] for r in arrays)))
    jobs: list[list] = [[] for _ in range(pool.n_threads)]
    outs, after = [], []
    for lin in lins:
        if _spans is None:
            lin.unit.prepare_x(acts)
        else:
            _timed(lambda: lin.unit.prepare_x(acts), _spans)()
        out = np.empty((acts.x.shape[0], lin.shape[0]), dtype=np.float32)   # (T, N)
        step = lin.add_jobs(acts, out, jobs)
        outs.append(out)
        if step is not None:
            after.append(step)
    pool.run_tasks(jobs)
    for step in after:
        step()
    return outs


def norm_matmuls(x: np.ndarray, weight: np.ndarray, eps: float, *lins: Linear) -> list[np.ndarray]:
    """matmuls(rms_norm(x, weight, eps), *lins). A replayed decode dispatch takes the norm into
    its input buffer: one kernel call, no array between the two."""
    if type(x) is np.ndarray and type(weight) is np.ndarray and x.dtype == np.float32 and \
            x.flags.c_contiguous and x.shape[0] <= REPLAY_MAX_T and \
            _EXECUTORS.get(type(lins[0])) is None:
        replay = _host_dispatch(x, lins)[0]
        if replay is not None:
            return replay(x, weight, float(eps))
    return matmuls(rms_norm(x, weight, eps), *lins)


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """x: (..., D) float32; normalise over the last axis, then scale by weight (D,)."""
    ex = _EXECUTORS.get(type(weight))
    if ex is not None:
        return ex.rms_norm(x, weight, eps)
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty_like(x)
    d = x.shape[-1]
    fused.rms_norm(x.reshape(-1, d), weight, float(eps), out.reshape(-1, d))
    return out


def sigmoid_gate(x: np.ndarray, h: np.ndarray, w: np.ndarray) -> np.ndarray:
    """x * sigmoid(h . w) per row: a gate vector w (K,) scales each row of x (T, N) by its input
    row h (T, K) (qwen2moe's shared expert)."""
    ex = _EXECUTORS.get(type(w))
    if ex is not None:
        return ex.sigmoid_gate(x, h, w)
    z = h @ w                                                             # (T,)
    return x * (1.0 / (1.0 + np.exp(-z)))[:, None].astype(np.float32)


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def swiglu(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """silu(gate) * up, one pass; gate, up float32 (T, F)."""
    ex = _EXECUTORS.get(type(gate))
    if ex is not None:
        return ex.swiglu(gate, up)
    out = np.empty_like(gate)
    pool = threads.current()
    if _splits_rows(pool, gate.shape[0]):
        _on_rows(pool, gate.shape[0], lambda a, b: fused.swiglu(gate[a:b], up[a:b], out[a:b]))
    else:
        fused.swiglu(gate, up, out)
    return out


class Rope:
    """Rotary position embedding over the first `dim` features of each head.

    neox=False: llama.cpp's "normal" mode, rotating adjacent pairs (x[2i], x[2i+1]);
    neox=True: rotating halves (x[i], x[i + dim/2]) as GPT-NeoX/Qwen do.
    inv_freq[i] = base^(-2i/dim) / freq_factors[i] (Llama 3.x long-context factors), and positions
    are multiplied by `freq_scale` (linear scaling).

    YaRN (ext_factor != 0, as ggml's rope_yarn): pair i's angle blends the interpolated
    (freq_scale * theta) and the original theta by ramp(i) * ext_factor, where ramp is 1 below
    corr_dims[0], 0 above corr_dims[1] and linear between (yarn_corr_dims); cos and sin are then
    multiplied by `mscale` (the magnitude the architecture asks for).
    """

    def __init__(self, dim: int, base: float, neox: bool, freq_scale: float = 1.0,
                 freq_factors: np.ndarray | None = None, ext_factor: float = 0.0,
                 corr_dims: tuple[float, float] = (0.0, 0.0), mscale: float = 1.0):
        self.dim, self.neox, self.freq_scale, self.mscale = dim, neox, freq_scale, mscale
        inv = base ** (-np.arange(0, dim, 2, dtype=np.float64) / dim)   # (dim/2,)
        if freq_factors is not None:
            inv = inv / freq_factors.astype(np.float64)
        self.inv_freq = inv
        # per pair: the factor positions are multiplied by (freq_scale, or YaRN's blend)
        self.pos_scale = np.full(dim // 2, freq_scale, dtype=np.float64)  # (dim/2,)
        if ext_factor:
            lo, hi = corr_dims
            y = (np.arange(dim // 2, dtype=np.float64) - lo) / max(0.001, hi - lo)
            mix = (1.0 - np.clip(y, 0.0, 1.0)) * ext_factor
            self.pos_scale = freq_scale * (1.0 - mix) + mix
        empty = np.empty((0, dim // 2), np.float32)                     # (positions, dim/2)
        self._tables = (empty, empty)   # cos, sin: one attribute, swapped whole (see tables)

    def tables(self, end: int) -> tuple[np.ndarray, np.ndarray]:
        """cos and sin float32 (>= end, dim/2) of positions 0.. (angles in float64), grown by
        doubling so a decode step only slices them."""
        tables = self._tables     # node leaders call this at once: read and replace one tuple,
        if end > tables[0].shape[0]:  # never a new cos beside an old, shorter sin
            n = max(end, 2 * tables[0].shape[0], 256)
            ang = np.arange(n, dtype=np.float64)[:, None] * (self.inv_freq * self.pos_scale)[None, :]
            tables = ((np.cos(ang) * self.mscale).astype(np.float32),
                      (np.sin(ang) * self.mscale).astype(np.float32))
            self._tables = tables
        return tables

    def __call__(self, x: np.ndarray, pos0) -> np.ndarray:
        """x: (T, H, head_dim) float32 for positions pos0..pos0+T-1, or row i at position pos0[i]
        when pos0 is an int array (T,) (a batch of sequences, see BatchCaches); rotated in place."""
        ex = _EXECUTORS.get(type(x))
        if ex is not None:
            return ex.rope(self, x, pos0)
        t = x.shape[0]
        if isinstance(pos0, np.ndarray):
            cos, sin = self.tables(int(pos0.max()) + 1)
            fused.rope(x, cos[pos0], sin[pos0], self.dim, self.neox)    # gathered: (T, dim/2)
            return x
        cos, sin = self.tables(pos0 + t)
        fused.rope(x, cos[pos0:pos0 + t], sin[pos0:pos0 + t], self.dim, self.neox)
        return x


def yarn_corr_dims(n_dims: int, n_ctx_orig: int, base: float, beta_fast: float,
                   beta_slow: float) -> tuple[float, float]:
    """The pair range YaRN ramps over (ggml_rope_yarn_corr_dims): the dims whose wavelength
    turns beta_fast resp. beta_slow times over the original context, floored / ceiled."""
    def dim(n_rot: float) -> float:
        return n_dims * math.log(n_ctx_orig / (n_rot * 2 * math.pi)) / (2 * math.log(base))
    return max(0.0, math.floor(dim(beta_fast))), min(n_dims - 1.0, math.ceil(dim(beta_slow)))


def rope_attention(rope: Rope, q: np.ndarray, k: np.ndarray, v: np.ndarray, cache, pos0) -> np.ndarray:
    """rope(q, pos0), rope(k, pos0), then attention(q, k, v, cache, pos0) (shapes as there; q
    and k are rotated in place). A decode step's host KVCache runs the three as one native call
    (kvcache.rope_attend): RoPE, the KV store and attention between two products, without a
    Python dispatch for each."""
    if type(cache) is KVCache and type(q) is np.ndarray and type(pos0) is int \
            and q.shape[0] <= FUSED_ATTENTION_MAX_T:
        return _rope_attend(rope, q, k, v, cache, pos0)
    if type(cache) is BatchCaches and type(q) is np.ndarray:
        return cache.rope_attend(rope, q, k, v, pos0)
    rope(q, pos0)
    rope(k, pos0)
    return attention(q, k, v, cache, pos0)


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, cache, pos0) -> np.ndarray:
    """Causal grouped-query attention with the KV cache: `cache.attend` (a KVCache here; NUMA
    placement's per-node caches run each node's heads on its own threads; BatchCaches, with pos0
    an array of positions, one row per sequence of a batch).

    q: (T, n_head, hd), k/v: (T, n_head_kv, hd) for positions pos0..pos0+T-1 -> (T, n_head * hd).
    """
    return cache.attend(q, k, v, pos0)


# the KV cache, per-head products (MLA) and Mixture-of-Experts ops (their own files; model files
# reach them here)
from .kvcache import (ATTENTION_BLOCK, FUSED_ATTENTION_MAX_T, BatchCaches, HostCache,  # noqa: E402,F401
                      KVCache, attend)
from .kvcache import rope_attend as _rope_attend  # noqa: E402
from .heads import (HeadLinear, attend_latent, head_matmul, mla_scores_q, mla_split,  # noqa: E402,F401
                    split_heads)
from . import experts as _experts  # noqa: E402
from .experts import ExpertLinear, moe_route  # noqa: E402,F401


def moe_ffn(x: np.ndarray, ids: np.ndarray, weights: np.ndarray, gate: ExpertLinear,
            up: ExpertLinear, down: ExpertLinear) -> np.ndarray:
    """The routed SwiGLU feed-forward (numallm.experts.moe_ffn) where x is: an input on a GPU
    goes to its executor (experts on that GPU, or on the host with the result brought back)."""
    ex = _EXECUTORS.get(type(x))
    if ex is not None:
        return ex.moe_ffn(x, ids, weights, gate, up, down)
    return _experts.moe_ffn(x, ids, weights, gate, up, down)
