"""Per-head products (re-exported by ops): H matrices (N, K), one per attention head, each a
kernel operand in its stored encoding; `head_matmul(x, w)` multiplies head h's input rows by its
own matrix, all heads in one pool dispatch.

DeepSeek's Multi-head Latent Attention uses it for the absorbed matrices (each head's query
mapped into the latent space, each head's latent output mapped to its values), so those run on
the quantized kernels instead of being kept as float32 copies (a real V3 would need GBs).
"""
from __future__ import annotations

import numpy as np
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
    """A one-token head_matmul on one pool, encoded once (as ops' decode replays): per token,
    each head's input is refilled into its forms and the task table runs again; encoding the
    tasks was most of a decode step's time outside the kernels of an MLA layer."""

    def __init__(self, w: HeadLinear, pool, x: np.ndarray):
        from . import ops

        self.epoch, self.ws = ops.REPLAY_EPOCH, list(w.ws)
        self.out = np.empty((x.shape[0], 1, w.shape[1]), dtype=np.float32)   # (H, 1, N)
        jobs, self.acts = _jobs(x, w, pool, self.out)
        ok = all(a.makers and a.refillable for a in self.acts)
        enc = pool.encode(jobs) if ok else None
        self.table, self.spans = enc if enc is not None else (None, None)

    def __call__(self, pool, x: np.ndarray) -> np.ndarray:
        for h, acts in enumerate(self.acts):
            acts.refill(x[h])
        pool.run_encoded(self.table, self.spans)
        return self.out.copy()


def _replay(x: np.ndarray, w: HeadLinear, pool) -> _Replay | None:
    from . import ops, threads as th

    if x.shape[1] != 1 or ops._spans is not None or not isinstance(pool, (th.RowPool, th.NodePools)):
        return None
    cache = w.__dict__.setdefault("_replays", {})
    r = cache.get(pool)
    if r is None or r.epoch != ops.REPLAY_EPOCH or len(r.ws) != len(w.ws) or \
            any(a is not b for a, b in zip(r.ws, w.ws)):       # the weights it points into
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
        return replay(pool, x)
    out = np.empty((n_head, t, w.shape[1]), dtype=np.float32)                 # (H, T, N)
    jobs, _ = _jobs(x, w, pool, out)
    pool.run_tasks(jobs)
    return out
