"""Mixture-of-Experts ops (re-exported by ops): expert weights, routing, the routed feed-forward.

A GGUF expert tensor (E, N, K) is E*N rows of K, each expert's N rows quantized like a 2-D
matrix; each expert's rows are prepared for the kernels on their own, so an expert is an ordinary
kernel operand and a product over it is a row range of its own output. A routed feed-forward is
two pool dispatches per layer whatever the batch: gate and up of every selected expert, then down
of every selected expert, each cut over the threads by (expert x row range) in equal shares of
work. Tokens are grouped by expert first (llama.cpp's mul_mat_id idea), so in a prefill chunk each
selected expert's rows are read once with the batched kernels.
"""
from __future__ import annotations

import numpy as np
import numallm_kernels
from numallm_kernels.base import Activations
from numallm_kernels import fused

from . import numa_mem, threads
from .errors import UnsupportedError
from .gguf_file import QTensor

# llama.cpp's floor for the sum of the renormalised top-k weights
_MIN_WEIGHT_SUM = 6.103515625e-5


class ExpertLinear:
    """E matrices (N, K) of one GGUF tensor (E, N, K); `ws[e]` is expert e prepared for the
    kernels. Called only through `moe_ffn`."""

    def __init__(self, qt: QTensor):
        try:
            self.unit = numallm_kernels.get(qt.qtype)
        except KeyError:
            raise UnsupportedError(
                f"tensor {qt.name} uses quantization type {qt.qtype.name}, which numallm cannot "
                f"compute yet; use a model quantized to one of "
                f"{', '.join(t.name for t in numallm_kernels.registered_types())}") from None
        n_exp, n, _ = qt.shape
        if n % self.unit.row_multiple:
            raise UnsupportedError(f"tensor {qt.name}: {n} rows per expert is not a multiple of the "
                                   f"{qt.qtype.name} kernels' row group ({self.unit.row_multiple})")
        self.name, self.qtype, self.shape = qt.name, qt.qtype, qt.shape     # (E, N, K)
        self.nbytes = qt.nbytes
        self.raw = qt.data               # (E * N, row_bytes) uint8 GGUF view
        self.ws = [self.unit.prepare(qt.data[e * n:(e + 1) * n]) for e in range(n_exp)]
        if self.unit.repacks:            # as Linear: the prepared copies hold the weights now
            numa_mem.release_file_pages(qt.data)

    @property
    def expert_nbytes(self) -> int:
        """Bytes of one expert as stored (what a token reads per selected expert)."""
        return self.nbytes // self.shape[0]


def moe_route(logits: np.ndarray, k: int, renorm: bool, sigmoid: bool = False,
              bias: np.ndarray | None = None, groups: tuple[int, int] = (0, 0),
              scale: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Softmax (or `sigmoid`, DeepSeek-V3) over the experts, then the k best: ids int64 (T, k)
    and their weights float32 (T, k), renormalised to sum 1 when `renorm` (llama.cpp's norm_w),
    times `scale` when non-zero. logits: float32 (T, E).

    As llama.cpp's build_moe_ffn: `bias` (E,) is added for the choice only (V3's exp_probs_b),
    the weights stay the unbiased probabilities; groups = (n_group, n_group_used) keeps, per
    token, the n_group_used groups of E / n_group experts whose two best scores sum highest."""
    x = logits.astype(np.float32)
    if sigmoid:
        p = 1.0 / (1.0 + np.exp(-x))
    else:
        p = np.exp(x - x.max(axis=-1, keepdims=True))
        p /= p.sum(axis=-1, keepdims=True)
    sel = p if bias is None else p + bias.astype(np.float32)
    n_group, n_used = groups
    if n_group > 1 and n_used < n_group:
        t = sel.shape[0]
        g = sel.reshape(t, n_group, -1)                                     # (T, groups, E/groups)
        score = np.sort(g, axis=-1)[..., -2:].sum(axis=-1)                  # (T, groups)
        keep = np.argsort(-score, axis=-1, kind="stable")[:, :n_used]
        mask = np.full(score.shape, -np.inf, dtype=np.float32)
        np.put_along_axis(mask, keep, 0.0, axis=-1)
        sel = (g + mask[..., None]).reshape(t, -1)
    ids = np.argpartition(-sel, k - 1, axis=-1)[:, :k]
    best = np.argsort(-np.take_along_axis(sel, ids, -1), axis=-1, kind="stable")
    ids = np.take_along_axis(ids, best, -1)
    w = np.take_along_axis(p, ids, axis=-1)
    if renorm:
        w /= np.maximum(w.sum(axis=-1, keepdims=True), np.float32(_MIN_WEIGHT_SUM))
    if scale:
        w *= np.float32(scale)
    return ids.astype(np.int64), w.astype(np.float32)


def balance(items: list[tuple[int, float]], n_threads: int, multiple: int) -> list[list]:
    """Cut items (rows, cost per row) into per-thread lists of (item, r0, r1) of near-equal cost,
    at row multiples of `multiple`, each thread's pieces contiguous in item order."""
    total = sum(r * c for r, c in items)
    bounds = [total * j / n_threads for j in range(1, n_threads)]
    shares: list[list] = [[] for _ in range(n_threads)]
    base = 0.0
    for i, (rows, cost) in enumerate(items):
        span = rows * cost
        cuts = [0]
        for b in bounds:
            if base < b < base + span:
                r = int(round((b - base) / cost / multiple)) * multiple
                cuts.append(min(max(r, cuts[-1]), rows))
        cuts.append(rows)
        for r0, r1 in zip(cuts, cuts[1:]):
            if r1 > r0:
                mid = base + (r0 + r1) / 2 * cost
                shares[sum(1 for b in bounds if b <= mid)].append((i, r0, r1))
        base += span
    return shares


def _dispatch(pool, ops_: list[tuple], cost: list[float]) -> None:
    """Run products ops_[i] = (lin, expert, acts, out) (out float32 (T_i, N) C-contiguous = acts.x
    @ W_e.T) as one pool dispatch, cut by (product x row range)."""
    from .ops import task

    mult = max(lin.unit.row_multiple for lin, *_ in ops_)
    items = [(lin.shape[1], c) for (lin, *_), c in zip(ops_, cost)]
    jobs = [[task(ops_[i][0].unit, ops_[i][0].ws[ops_[i][1]], ops_[i][2], ops_[i][3], r0, r1)
             for i, r0, r1 in share] for share in balance(items, pool.n_threads, mult)]
    pool.run_tasks(jobs)


def moe_ffn(x: np.ndarray, ids: np.ndarray, weights: np.ndarray, gate: ExpertLinear,
            up: ExpertLinear, down: ExpertLinear) -> np.ndarray:
    """sum_j weights[t, j] * down_e(silu(gate_e(x_t)) * up_e(x_t)), e = ids[t, j]: the routed
    SwiGLU feed-forward. x float32 (T, K); ids int (T, k); weights float32 (T, k) -> (T, K)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    t, k = ids.shape
    flat = ids.reshape(-1)
    order = np.argsort(flat, kind="stable")          # assignments grouped by expert
    experts, starts = np.unique(flat[order], return_index=True)
    ends = np.append(starts[1:], len(flat))
    tok = order // k                                  # the token of each grouped assignment
    n_ff = gate.shape[1]
    pool = threads.current()

    # gate and up of every selected expert over its tokens: one dispatch
    shared = None
    if t == 1:                                        # decode: every expert reads the one token
        shared = Activations(x)
        gate.unit.prepare_x(shared)
        if up.unit is not gate.unit:
            up.unit.prepare_x(shared)
    g = np.empty((len(flat), n_ff), dtype=np.float32)    # (T*k, n_ff) grouped by expert
    u = np.empty((len(flat), n_ff), dtype=np.float32)
    prods, cost = [], []
    for e, a, b in zip(experts.tolist(), starts.tolist(), ends.tolist()):
        acts = shared
        if acts is None:
            acts = Activations(np.ascontiguousarray(x[tok[a:b]]))     # (n_e, K)
            gate.unit.prepare_x(acts)
            if up.unit is not gate.unit:
                up.unit.prepare_x(acts)
        prods += [(gate, e, acts, g[a:b]), (up, e, acts, u[a:b])]
        cost += [b - a, b - a]
    _dispatch(pool, prods, cost)

    h = np.empty_like(g)                                  # (T*k, n_ff)
    fused.swiglu(g, u, h)

    # down of every selected expert over its own inputs: one dispatch
    d = np.empty((len(flat), down.shape[1]), dtype=np.float32)   # (T*k, K) grouped by expert
    prods, cost = [], []
    for e, a, b in zip(experts.tolist(), starts.tolist(), ends.tolist()):
        acts = Activations(h[a:b])
        down.unit.prepare_x(acts)
        prods.append((down, e, acts, d[a:b]))
        cost.append(b - a)
    _dispatch(pool, prods, cost)

    # back to (token, slot) order, weighted sum over the k slots
    per = np.empty_like(d)
    per[order] = d
    return np.einsum("tk,tkd->td", weights, per.reshape(t, k, -1)).astype(np.float32, copy=False)
