"""Numba kernels for the element-wise steps of Multi-head Latent Attention (DeepSeek's MLA,
numallm.heads.mla_queries): the query and latent rows around the per-head products, one pass
each instead of a dozen numpy steps (copies, RoPE, the latent's norm, the score scale, the
concatenations) per layer and token.

The arithmetic is the separate steps' (fused.rms_norm's float64 mean, fused.rope's rotation,
then one float32 product for the score scale).
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit

from .attention import _FM


@njit(nogil=True, cache=True, fastmath=_FM)
def _norm_scale(x, eps):
    # 1 / sqrt(mean(x^2) + eps) of one row, accumulated in float64 (fused.rms_norm's)
    ss = 0.0
    for j in range(x.shape[0]):
        v = np.float64(x[j])
        ss += v * v
    return np.float32(1.0 / math.sqrt(ss / x.shape[0] + eps))


@njit(nogil=True, cache=True)
def mla_prep(q, kva, norm_w, eps, cos, sin, scale, qn, qc, latent):
    """Split and rotate one chunk's MLA projections.

    q: float32 (T, H, nope + rope), each head's query (nope part, then the RoPE part);
    kva: float32 (T, lat + rope), the compressed KV (latent c, then the shared RoPE key k_pe);
    norm_w: float32 (lat,) the latent's RMS-norm weight; cos, sin: float32 (T, rope / 2) the
    positions' tables (adjacent pairs rotate, llama.cpp's "normal" RoPE); scale: float32.
    Writes qn float32 (H, T, nope) = the nope parts per head (the absorbed key product's input),
    qc[t, h, lat:] = rope(q_pe[t, h]) * scale (qc float32 (T, H, lat + rope); its first lat
    columns are mla_scores_q's), latent float32 (T, lat + rope) = [rms_norm(c) * w, rope(k_pe)]."""
    n_t, n_h, hd = q.shape
    lat = norm_w.shape[0]
    rope = kva.shape[1] - lat
    nope = hd - rope
    for t in range(n_t):
        s = _norm_scale(kva[t, :lat], eps)
        for j in range(lat):
            latent[t, j] = kva[t, j] * s * norm_w[j]
        for i in range(rope // 2):
            a, b = kva[t, lat + 2 * i], kva[t, lat + 2 * i + 1]
            c, sn = cos[t, i], sin[t, i]
            latent[t, lat + 2 * i] = a * c - b * sn
            latent[t, lat + 2 * i + 1] = a * sn + b * c
        for h in range(n_h):
            for j in range(nope):
                qn[h, t, j] = q[t, h, j]
            for i in range(rope // 2):
                a, b = q[t, h, nope + 2 * i], q[t, h, nope + 2 * i + 1]
                c, sn = cos[t, i], sin[t, i]
                qc[t, h, lat + 2 * i] = (a * c - b * sn) * scale
                qc[t, h, lat + 2 * i + 1] = (a * sn + b * c) * scale


@njit(nogil=True, cache=True)
def mla_scores_q(q_lat, scale, qc):
    """qc[t, h, :lat] = q_lat[h, t] * scale: each head's query in the latent space (the absorbed
    key product's output, float32 (H, T, lat)) into the attention query qc (T, H, lat + rope)."""
    n_h, n_t, lat = q_lat.shape
    for t in range(n_t):
        for h in range(n_h):
            for j in range(lat):
                qc[t, h, j] = q_lat[h, t, j] * scale
