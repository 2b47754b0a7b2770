"""Numba kernels for the small per-token ops of ops.py (norm, RoPE, SwiGLU; decode attention
lives in numallm_kernels.attention, where the thread pools' native executor can run it too).

A decode step of a 1B model does ~20 such ops per layer on vectors of a few thousand floats;
as numpy expressions each is several array passes and temporaries (~3-5 us each in call
overhead alone), which added up to several ms per token next to ~30 ms of weight streaming. Each
kernel here is one pass, writes into an array the caller allocates, and releases the GIL.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit
from .attention import _FM, attend, exp  # noqa: F401 (attend, exp: re-exported)


@njit(nogil=True, cache=True, fastmath=_FM)
def rms_norm(x, w, eps, out):
    """out[r] = x[r] / sqrt(mean(x[r]^2) + eps) * w; x, out: float32 (R, D), w: (D,). The mean
    is accumulated in float64."""
    n, d = x.shape
    for r in range(n):
        ss = 0.0
        for j in range(d):
            v = np.float64(x[r, j])
            ss += v * v
        s = np.float32(1.0 / math.sqrt(ss / d + eps))
        for j in range(d):
            out[r, j] = x[r, j] * s * w[j]


@njit(nogil=True, cache=True)
def rope(x, cos, sin, dim, neox):
    """Rotate x float32 (T, H, hd) in place; cos/sin float32 (T, dim/2) for its positions.
    neox: pairs (i, i + dim/2), else adjacent pairs (2i, 2i + 1)."""
    n_t, n_h, _ = x.shape
    half = dim // 2
    for t in range(n_t):
        for h in range(n_h):
            for i in range(half):
                ia, ib = (i, i + half) if neox else (2 * i, 2 * i + 1)
                a = x[t, h, ia]
                b = x[t, h, ib]
                c = cos[t, i]
                s = sin[t, i]
                x[t, h, ia] = a * c - b * s
                x[t, h, ib] = a * s + b * c


@njit(nogil=True, cache=True, fastmath=_FM, error_model="numpy")
def swiglu(gate, up, out):
    """out = silu(gate) * up = gate / (1 + e^-gate) * up; all float32 (T, F). Three passes over
    a row, each a vector loop. error_model="numpy": Numba's default checks every float division
    for a zero divisor (1 + e^-g never is), a branch that kept the division loop scalar (most
    of the op's time)."""
    n, f = gate.shape
    e = np.empty(f, np.float32)        # (F,) scratch: e^-gate, then the sigmoid
    for r in range(n):
        for j in range(f):
            e[j] = exp(-gate[r, j])
        for j in range(f):
            e[j] = np.float32(1.0) / (np.float32(1.0) + e[j])
        for j in range(f):
            out[r, j] = gate[r, j] * e[j] * up[r, j]


@njit(nogil=True, cache=True)
def moe_topk(logits, k, renorm, min_sum, ids, w):
    """Per row of logits float32 (T, E): softmax over the E experts, then the k most probable
    (best first; equal probabilities by lower index) into ids int64 (T, k) and their
    probabilities into w float32 (T, k), divided by max(their sum, min_sum) when renorm. One
    pass per row: a decode step's routing is a few microseconds, not a dozen numpy calls."""
    n_t, n_e = logits.shape
    p = np.empty(n_e, np.float32)
    taken = np.zeros(n_e, np.bool_)
    for t in range(n_t):
        m = logits[t, 0]
        for e in range(1, n_e):
            m = max(m, logits[t, e])
        s = np.float32(0.0)
        for e in range(n_e):
            p[e] = np.exp(logits[t, e] - m)
            s += p[e]
        for e in range(n_e):
            p[e] /= s
            taken[e] = False
        tot = np.float32(0.0)
        for j in range(k):
            best = -1
            for e in range(n_e):
                if not taken[e] and (best < 0 or p[e] > p[best]):
                    best = e
            taken[best] = True
            ids[t, j] = best
            w[t, j] = p[best]
            tot += p[best]
        if renorm:
            d = max(tot, min_sum)
            for j in range(k):
                w[t, j] /= d


@njit(nogil=True, cache=True)
def moe_combine(d, pos, w, out, t0, t1):
    """out[t] = sum_j w[t, j] * d[pos[t, j]] for tokens t in [t0, t1): the weighted sum of a
    token's k expert outputs, read from d float32 (R, D) (rows grouped by expert) at pos int64
    (T, k); w float32 (T, k); out float32 (T, D). Slot order j = 0..k-1, as a decode step sums."""
    k = pos.shape[1]
    n = d.shape[1]
    for t in range(t0, t1):
        for c in range(n):
            out[t, c] = np.float32(0.0)
        for j in range(k):
            wj = w[t, j]
            r = pos[t, j]
            for c in range(n):
                out[t, c] += wj * d[r, c]
