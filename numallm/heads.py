"""Per-head products (re-exported by ops): H matrices (N, K), one per attention head, each a
kernel operand in its stored encoding; `head_matmul(x, w)` multiplies head h's input rows by its
own matrix, all heads in one pool dispatch.

DeepSeek's Multi-head Latent Attention uses it for the absorbed matrices (each head's query
mapped into the latent space, each head's latent output mapped to its values), so those run on
the quantized kernels instead of being kept as float32 copies (a real V3 would need GBs).
"""
from __future__ import annotations

import operator
import time

import numpy as np
from numallm_kernels import mla
from numallm_kernels.base import Activations

from . import numa_mem, threads
from .errors import UnsupportedError
from .gguf_file import (GGMLQuantizationType as QT, QTensor, quant_sizes, reference_dequantize,
                        reference_quantize)

# a transposed half keeps a float type (exact); quantized ones become Q8_0 (no coarser than any
# of them; re-quantized once at load)
_EXACT = (QT.F32, QT.F16, QT.BF16)


class HeadLinear:
    """H matrices (N, K) from one tensor (H, N, K) in a kernel type: `ws[h]` is head h prepared
    for the kernels. `heads(h0, h1)` is a view of a range of heads (placement's node shares)."""

    def __init__(self, qt: QTensor | None):
        if qt is None:                    # heads(): filled in by the caller
            return
        from .ops import kernel_unit

        self.unit = kernel_unit(qt)
        n_head, n, _ = qt.shape
        if n % self.unit.row_multiple:
            raise UnsupportedError(f"tensor {qt.name}: {n} rows per head is not a multiple of the "
                                   f"{qt.qtype.name} kernels' row group ({self.unit.row_multiple})")
        self.name, self.qtype, self.shape = qt.name, qt.qtype, qt.shape     # (H, N, K)
        self.nbytes = qt.nbytes
        self.ws = []
        for h in range(n_head):
            self.ws.append(self.unit.prepare(qt.data[h * n:(h + 1) * n]))
            if self.unit.repacks:        # as Linear: the prepared copy holds the weights now
                numa_mem.release_file_pages(qt.data[h * n:(h + 1) * n])

    def heads(self, h0: int, h1: int) -> "HeadLinear":
        out = HeadLinear(None)
        out.unit, out.name, out.qtype = self.unit, self.name, self.qtype
        out.shape = (h1 - h0,) + tuple(self.shape[1:])
        out.nbytes = self.nbytes // self.shape[0] * (h1 - h0)
        out.ws = self.ws[h0:h1]
        return out

    def pool(self):
        return threads.current()

    def thread_groups(self, pool) -> list[tuple[range, int, int]]:
        """Which threads of `pool` compute which heads: (thread ids, h0, h1) per group. Here every
        thread, every head; placement's node records give each node's threads its own heads."""
        return [(range(pool.n_threads), 0, self.shape[0])]


def split_heads(qt: QTensor, n_head: int, first: int) -> tuple[HeadLinear, HeadLinear]:
    """A matrix (H * (a + b), K) whose head h is `first` = a rows then b rows, as two per-head
    operands: the first rows transposed, (H, K, a) (so x (a,) -> W^T x is an ordinary product),
    and the rest as stored, (H, b, K) (their own bytes). Temporaries and the file pages read are
    given back before returning."""
    rows = qt.data.reshape(n_head, -1, qt.data.shape[1])               # uint8 (H, a + b, bytes)
    a, k = first, qt.shape[1]
    b = rows.shape[1] - a
    second = HeadLinear(QTensor(qt.name + "[b]", qt.qtype, (n_head, b, k),
                                np.ascontiguousarray(rows[:, a:]).reshape(n_head * b, -1), qt.offset))
    kt = qt.qtype if qt.qtype in _EXACT else QT.Q8_0
    if a % quant_sizes(kt)[0]:
        kt = QT.F16
    block, size = quant_sizes(kt)
    raw = np.empty((n_head * k, a // block * size), dtype=np.uint8)       # (H * K, row bytes)
    for h in range(n_head):            # a head at a time: small temporaries, reused by the heap
        wt = reference_dequantize(np.ascontiguousarray(rows[h, :a]), qt.qtype).reshape(a, k)
        wt = np.ascontiguousarray(wt.T, dtype=np.float32)                            # (K, a)
        raw[h * k:(h + 1) * k] = wt.view(np.uint8) if kt == QT.F32 else \
            reference_quantize(wt, kt).view(np.uint8).reshape(k, -1)
    first_t = HeadLinear(QTensor(qt.name + "[a^T]", kt, (n_head, k, a), raw, qt.offset))
    del raw
    numa_mem.release_file_pages(qt.data)
    numa_mem.trim_heap()
    return first_t, second


def _jobs(x: np.ndarray, w: HeadLinear, pool, out: np.ndarray):
    """Every head's input encoded (Activations, one per head) and the pool's jobs computing
    out[h] = x[h] @ W_h.T: (jobs, [acts])."""
    from .experts import _add_jobs

    prods, cost, acts_all = [], [], []
    for h in range(x.shape[0]):
        acts = Activations(np.ascontiguousarray(x[h], dtype=np.float32))     # (T, K)
        w.unit.prepare_x(acts)
        acts_all.append(acts)
        prods.append((w, h, acts, out[h]))
        cost.append(x.shape[1])
    jobs: list[list] = [[] for _ in range(pool.n_threads)]
    for tids, h0, h1 in w.thread_groups(pool):
        _add_jobs(jobs, tids, prods[h0:h1], cost[h0:h1], 0, w.shape[1])
    return jobs, acts_all


class _Replay:
    """A one-token head_matmul on one pool, encoded once (as ops' decode replays): the heads'
    inputs are the rows of one (H, K) input, so a token is one copy, one fill of each of its
    forms and one run of the task table (head h's tasks read row h); encoding the tasks was most
    of a decode step's time outside the kernels of an MLA layer, then refilling each head's own
    input (H Python calls per product)."""

    def __init__(self, w: HeadLinear, pool, x: np.ndarray):
        from . import ops
        from .experts import _add_jobs

        self.epoch, self.ws = ops.REPLAY_EPOCH, list(w.ws)
        n_head, _, k = x.shape
        self.out = np.empty((n_head, 1, w.shape[1]), dtype=np.float32)       # (H, 1, N)
        self.acts = Activations(np.array(x.reshape(n_head, k), dtype=np.float32))   # (H, K)
        # the forms a one-token product reads (its variant's), made over all H rows: forms are
        # per-token encodings, so row h of each is head h's own
        probe = Activations(self.acts.x[:1].copy())
        w.unit.prepare_x(probe)
        for key, make in probe.makers.items():
            self.acts.form(key, make)
        rows = [self.acts.row(h) for h in range(n_head)]
        prods = [(w, h, rows[h], self.out[h]) for h in range(n_head)]
        jobs: list[list] = [[] for _ in range(pool.n_threads)]
        for tids, h0, h1 in w.thread_groups(pool):
            _add_jobs(jobs, tids, prods[h0:h1], [1.0] * (h1 - h0), 0, w.shape[1])
        # a row that had to make a form of its own would not see the refills: no replay then
        ok = bool(probe.makers) and self.acts.refillable and not any(r.makers for r in rows)
        enc = pool.encode(jobs) if ok else None
        self.table, self.spans = enc if enc is not None else (None, None)
        self.fills = [(make.fill, self.acts._forms[key]) for key, make in self.acts.makers.items()]
        self.run = pool.bind_encoded(self.table, self.spans) if enc is not None else None

    def __call__(self, x: np.ndarray) -> np.ndarray:
        from . import ops

        t0 = time.perf_counter()
        xa = self.acts.x
        np.copyto(xa, x.reshape(xa.shape))
        for fill, arrays in self.fills:
            fill(xa, *arrays)
        self.run()
        if ops._spans is not None:      # one span: the input's encoding to the last thread's end
            ops._spans.append((t0, time.perf_counter()))
        return self.out.copy()


def _replay(x: np.ndarray, w: HeadLinear, pool) -> _Replay | None:
    """The replay of w's one-token product on `pool`: made on first use (not while ops.timing
    is on: it would encode timed calls), used while the weights it points into are w's."""
    from . import ops, threads as th

    if x.shape[1] != 1 or not isinstance(pool, (th.RowPool, th.NodePools)):
        return None
    cache = w.__dict__.setdefault("_replays", {})
    r = cache.get(pool)
    if r is None or r.epoch != ops.REPLAY_EPOCH or len(r.ws) != len(w.ws) or \
            not all(map(operator.is_, r.ws, w.ws)):            # the weights it points into
        if ops._spans is not None:
            return None
        r = cache[pool] = _Replay(w, pool, x)
    return r if r.table is not None else None


def head_matmul(x: np.ndarray, w: HeadLinear) -> np.ndarray:
    """out[h] = x[h] @ W_h.T for every head: x float32 (H, T, K) -> (H, T, N), one dispatch,
    cut over the threads by (head x row range) in equal shares (one token: replayed)."""
    n_head, t, k = x.shape
    if (n_head, k) != (w.shape[0], w.shape[2]):
        raise ValueError(f"{w.name}: input {x.shape} for heads {w.shape}")
    pool = w.pool()
    replay = _replay(x, w, pool)
    if replay is not None:
        return replay(x)
    out = np.empty((n_head, t, w.shape[1]), dtype=np.float32)                 # (H, T, N)
    jobs, _ = _jobs(x, w, pool, out)
    pool.run_tasks(jobs)
    return out


def mla_split(q: np.ndarray, kva: np.ndarray, norm_w: np.ndarray, eps: float, rope, pos0,
              scale: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """MLA's element-wise steps before its per-head products: q float32 (T, H, nope + rope) and
    kva (T, lat + rope) (attn_kv_a_mqa's product) at positions pos0.. (or pos0 (T,) per row) ->
    qn (H, T, nope) the queries' nope parts, qc (T, H, lat + rope) with qc[..., lat:] =
    rope(q_pe) * scale (the caller fills the rest, `mla_scores_q`), latent (T, 1, lat + rope) =
    [rms_norm(c) * norm_w, rope(k_pe)]. One Numba pass on the CPU; an input an executor holds
    goes through the ops it registered."""
    from . import ops

    t, n_head, hd = q.shape
    lat = norm_w.shape[0]
    n_rope = kva.shape[1] - lat
    if type(q) is not np.ndarray or type(kva) is not np.ndarray:
        q_pe = rope(np.ascontiguousarray(q[..., hd - n_rope:]), pos0)       # (T, H, rope)
        k_pe = rope(np.ascontiguousarray(kva[:, None, lat:]), pos0)         # (T, 1, rope)
        c = ops.rms_norm(kva[:, :lat], norm_w, eps)                         # (T, lat)
        qc = np.empty((t, n_head, lat + n_rope), dtype=np.float32)
        qc[..., lat:] = q_pe * np.float32(scale)
        latent = np.concatenate([c, k_pe[:, 0]], axis=1)[:, None, :]
        return np.ascontiguousarray(q[..., :hd - n_rope].transpose(1, 0, 2)), qc, latent
    if isinstance(pos0, np.ndarray):
        cos, sin = rope.tables(int(pos0.max()) + 1)
        cos, sin = cos[pos0], sin[pos0]                                     # (T, rope / 2)
    else:
        cos, sin = rope.tables(pos0 + t)
        cos, sin = cos[pos0:pos0 + t], sin[pos0:pos0 + t]
    qn = np.empty((n_head, t, hd - n_rope), dtype=np.float32)               # (H, T, nope)
    qc = np.empty((t, n_head, lat + n_rope), dtype=np.float32)              # (T, H, lat + rope)
    latent = np.empty((t, 1, lat + n_rope), dtype=np.float32)               # (T, 1, lat + rope)
    mla.mla_prep(np.ascontiguousarray(q, dtype=np.float32), np.ascontiguousarray(kva),
                 norm_w, np.float64(eps), cos, sin, np.float32(scale), qn, qc, latent[:, 0])
    return qn, qc, latent


def mla_scores_q(q_lat: np.ndarray, scale: float, qc: np.ndarray) -> np.ndarray:
    """qc[t, h, :lat] = q_lat[h, t] * scale (q_lat float32 (H, T, lat), the absorbed key
    product's output); returns qc."""
    lat = q_lat.shape[2]
    if type(q_lat) is not np.ndarray:
        qc[..., :lat] = q_lat.transpose(1, 0, 2) * np.float32(scale)
        return qc
    mla.mla_scores_q(q_lat, np.float32(scale), qc)
    return qc


def attend_latent(q: np.ndarray, latent: np.ndarray, cache, pos0) -> np.ndarray:
    """LatentCache.attend: store `latent` (T, 1, width) at pos0.., then attention of q (T, H,
    width) over the latent rows (every head reads the one KV head). One query position on
    several threads: the heads are cut over the pool's threads, each range one native attention
    task (the shared kernel splits by KV heads, of which there is one here), encoded once per
    cache and pool (kvcache.AttendReplay); else kvcache.attend."""
    from . import kvcache

    t, n_head, width = q.shape
    pool = kvcache.replay_pool()
    if t != 1 or isinstance(pos0, np.ndarray) or pool is None:
        return kvcache.attend(q, latent, latent, cache, pos0)
    cache.store(latent, latent, pos0)

    def parts(n_threads):            # heads cut over the threads, every one reads the one KV head
        n = min(n_threads, n_head)
        cuts = [n_head * j // n for j in range(n + 1)]
        return [(a, b, 0, 1) for a, b in zip(cuts, cuts[1:])]
    r = kvcache.replayed_attend(cache, pool, q, cache.k, parts)
    return r(q, pos0)
