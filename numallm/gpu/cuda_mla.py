"""CUDA kernels for the per-head parts of DeepSeek's Multi-head Latent Attention (numba-cuda);
numallm.gpu.mla runs them (the matrices q, kv_a_mqa, q_a/q_b and attn_output go through the
ordinary GPU matmul, cuda_kernels.GpuMatrix; attention over the latent cache is cuda_ops'
attention with one KV head).

  latent:     kva (T, lat + rope) -> the cache rows at pos0..: [rms_norm(kva[:, :lat]) * w,
              RoPE(kva[:, lat:])], in the cache's type;
  query_rope: qc[t, h, lat:] = RoPE(q[t, h, nope:]) * scale (the query's rotated part);
  head products over the absorbed matrices kept in their GGUF encoding: head h's matrix is rows
              h * per_head + row0 .. + n of the stored (rows, K) tensor;
              `head_mm`:   out[t, h, i] = alpha * sum_j W_h[i, j] x[t, h, j]  (attn_k_b,
                           attn_v_b, and the value rows of attn_kv_b);
              `head_mm_t`: out[t, h, l] = alpha * sum_n W_h[n, l] x[t, h, n] (the key rows of
                           attn_kv_b, W_UK^T q: one thread per 32-value unit of l, decoding each
                           unit of the head's rows once).

Formulas and rounding follow the CPU path (numallm.models.deepseek2.MLABlock.attn): float32 sums,
RoPE angles in float64 from the same table as cuda_ops.rope, cos/sin times the YaRN magnitude.
One thread per output value (or 32): the per-head matrices are small next to the block's
matrices; these kernels are not tuned.
"""
from __future__ import annotations

import math

import numpy as np
from numba import cuda

from ..gguf_file import GGMLQuantizationType as T
from .cuda_kernels import (MAX_THREADS, UNIT, Launch, decode_q4_0, decode_q4_k, decode_q6_k,
                           decode_q8_0)


@cuda.jit
def _latent(kva, w, eps, kc, pos0, n_tok, lat, n_rope, inv_freq, neox, mscale):
    # kva: float32 (T, lat + rope); w: (lat,); kc: (1, n_ctx, lat + rope) f16/f32. One block per
    # token: RMS over the first lat values (tree in shared memory), then RoPE on the rest.
    red = cuda.shared.array(MAX_THREADS, np.float32)
    tx = cuda.threadIdx.x
    nt = cuda.blockDim.x
    half = n_rope // 2
    for t in range(cuda.blockIdx.x, n_tok, cuda.gridDim.x):
        s = np.float32(0.0)
        for c in range(tx, lat, nt):
            v = kva[t, c]
            s += v * v
        red[tx] = s
        cuda.syncthreads()
        step = nt // 2
        while step > 0:
            if tx < step:
                red[tx] += red[tx + step]
            cuda.syncthreads()
            step //= 2
        inv = np.float32(1.0) / math.sqrt(red[0] / np.float32(lat) + np.float32(eps))
        cuda.syncthreads()
        p = pos0 + t
        for c in range(tx, lat, nt):
            kc[0, p, c] = kva[t, c] * inv * w[c]
        for i in range(tx, half, nt):
            ang = np.float64(p) * inv_freq[i]
            co = np.float32(math.cos(ang) * mscale)
            si = np.float32(math.sin(ang) * mscale)
            ia = lat + (i if neox else 2 * i)
            ib = ia + (half if neox else 1)
            a = kva[t, ia]
            b = kva[t, ib]
            kc[0, p, ia] = a * co - b * si
            kc[0, p, ib] = a * si + b * co


@cuda.jit
def _query_rope(q, qc, n_tok, n_head, hd, nope, lat, n_rope, pos0, inv_freq, neox, mscale, scale):
    # q: float32 (T, H * hd), head h's rope part at h * hd + nope..; qc: (T, H * (lat + rope))
    half = n_rope // 2
    width = lat + n_rope
    n = n_tok * n_head * half
    for k in range(cuda.grid(1), n, cuda.gridsize(1)):
        i = k % half
        h = (k // half) % n_head
        t = k // (half * n_head)
        ang = np.float64(pos0 + t) * inv_freq[i]
        co = np.float32(math.cos(ang) * mscale)
        si = np.float32(math.sin(ang) * mscale)
        ia = i if neox else 2 * i
        ib = ia + (half if neox else 1)
        a = q[t, h * hd + nope + ia]
        b = q[t, h * hd + nope + ib]
        qc[t, h * width + lat + ia] = (a * co - b * si) * scale
        qc[t, h * width + lat + ib] = (a * si + b * co) * scale


def _make_head_mm(decode):
    """out[t, h * os + oo + i] = alpha * W_h[i, :] . x[t, h * xs + xo ..] for a block type."""

    @cuda.jit
    def kernel(w, x, out, n_tok, n_head, per_head, row0, n_out, n_units, xs, xo, os, oo, alpha):
        buf = cuda.local.array(UNIT, np.float32)
        n = n_tok * n_head * n_out
        for k in range(cuda.grid(1), n, cuda.gridsize(1)):
            i = k % n_out
            h = (k // n_out) % n_head
            t = k // (n_out * n_head)
            r = h * per_head + row0 + i
            s = np.float32(0.0)
            for u in range(n_units):
                decode(w, r, u, buf)
                base = h * xs + xo + u * UNIT
                for j in range(UNIT):
                    s += buf[j] * x[t, base + j]
            out[t, h * os + oo + i] = s * alpha

    return kernel


def _make_head_mm_t(decode):
    """out[t, h * os + oo + l] = alpha * sum_n W_h[n, l] x[t, h * xs + xo + n], one thread per
    32 values of l, for a block type."""

    @cuda.jit
    def kernel(w, x, out, n_tok, n_head, per_head, row0, n_in, n_units, xs, xo, os, oo, alpha):
        buf = cuda.local.array(UNIT, np.float32)
        acc = cuda.local.array(UNIT, np.float32)
        n = n_tok * n_head * n_units
        for k in range(cuda.grid(1), n, cuda.gridsize(1)):
            u = k % n_units
            h = (k // n_units) % n_head
            t = k // (n_units * n_head)
            for j in range(UNIT):
                acc[j] = np.float32(0.0)
            for r in range(n_in):
                decode(w, h * per_head + row0 + r, u, buf)
                xv = x[t, h * xs + xo + r]
                for j in range(UNIT):
                    acc[j] += xv * buf[j]
            for j in range(UNIT):
                out[t, h * os + oo + u * UNIT + j] = acc[j] * alpha

    return kernel


@cuda.jit
def _dense_head_mm(w, x, out, n_tok, n_head, per_head, row0, n_out, n_cols, xs, xo, os, oo, alpha):
    # w: float32 or float16 (rows, K)
    n = n_tok * n_head * n_out
    for k in range(cuda.grid(1), n, cuda.gridsize(1)):
        i = k % n_out
        h = (k // n_out) % n_head
        t = k // (n_out * n_head)
        r = h * per_head + row0 + i
        s = np.float32(0.0)
        for c in range(n_cols):
            s += np.float32(w[r, c]) * x[t, h * xs + xo + c]
        out[t, h * os + oo + i] = s * alpha


@cuda.jit
def _dense_head_mm_t(w, x, out, n_tok, n_head, per_head, row0, n_in, n_cols, xs, xo, os, oo, alpha):
    n = n_tok * n_head * n_cols
    for k in range(cuda.grid(1), n, cuda.gridsize(1)):
        c = k % n_cols
        h = (k // n_cols) % n_head
        t = k // (n_cols * n_head)
        s = np.float32(0.0)
        for r in range(n_in):
            s += np.float32(w[h * per_head + row0 + r, c]) * x[t, h * xs + xo + r]
        out[t, h * os + oo + c] = s * alpha


# GGML type -> (head_mm, head_mm_t, True for 32-value block types)
_HEAD = {T.F32: (_dense_head_mm, _dense_head_mm_t, False),
         T.F16: (_dense_head_mm, _dense_head_mm_t, False)}
for _t, _dec in ((T.Q4_0, decode_q4_0), (T.Q8_0, decode_q8_0), (T.Q4_K, decode_q4_k),
                 (T.Q6_K, decode_q6_k)):
    _HEAD[_t] = (_make_head_mm(_dec), _make_head_mm_t(_dec), True)


def _grid(n: int, launch: Launch) -> tuple[int, int]:
    return min(launch.max_blocks, max(1, -(-n // launch.ew_threads))), launch.ew_threads


class HeadMatrix:
    """Per-head matrices inside one stored tensor on the device (raw GGUF rows (rows, K)): head h
    is rows h * per_head + row0 .. + n, each of k values."""

    def __init__(self, qtype, dev, k: int, per_head: int, row0: int, n: int):
        self.qtype, self.dev = T(qtype), dev
        self.mm, self.mm_t, self.blocked = _HEAD[self.qtype]
        self.k, self.per_head, self.row0, self.n = k, per_head, row0, n
        if self.blocked and k % UNIT:
            raise ValueError(f"{self.qtype.name} rows of {k} values are not whole 32-value units")

    def apply(self, x, out, n_tok: int, n_head: int, xs: int, xo: int, os: int, oo: int,
              alpha: float, launch: Launch) -> None:
        """out[t, h*os + oo + i] = alpha * W_h[i] . x[t, h*xs + xo ..], i < n (x: k per head)."""
        inner = self.k // UNIT if self.blocked else self.k
        self.mm[_grid(n_tok * n_head * self.n, launch)](
            self.dev, x, out, n_tok, n_head, self.per_head, self.row0, self.n, inner, xs, xo, os, oo,
            np.float32(alpha))

    def apply_t(self, x, out, n_tok: int, n_head: int, xs: int, xo: int, os: int, oo: int,
                alpha: float, launch: Launch) -> None:
        """out[t, h*os + oo + l] = alpha * sum_n W_h[n, l] x[t, h*xs + xo + n], l < k."""
        cols = self.k // UNIT if self.blocked else self.k
        self.mm_t[_grid(n_tok * n_head * cols, launch)](
            self.dev, x, out, n_tok, n_head, self.per_head, self.row0, self.n, cols, xs, xo, os, oo,
            np.float32(alpha))


def latent(kva, w, eps: float, kc, pos0: int, n_tok: int, lat: int, n_rope: int, inv_freq,
           neox: bool, mscale: float, launch: Launch) -> None:
    """Cache rows pos0.. of kc (1, n_ctx, lat + rope) from kva (T, lat + rope)."""
    threads = min(launch.attn_threads, MAX_THREADS)
    _latent[min(launch.max_blocks, n_tok), threads](kva, w, float(eps), kc, pos0, n_tok, lat, n_rope,
                                                    inv_freq, neox, float(mscale))


def query_rope(q, qc, n_tok: int, n_head: int, hd: int, nope: int, lat: int, n_rope: int, pos0: int,
               inv_freq, neox: bool, mscale: float, scale: float, launch: Launch) -> None:
    """qc[t, h, lat:] = RoPE(q[t, h, nope:]) * scale (float32 multiply after the rotation)."""
    n = n_tok * n_head * (n_rope // 2)
    _query_rope[_grid(n, launch)](q, qc, n_tok, n_head, hd, nope, lat, n_rope, pos0, inv_freq, neox,
                                  float(mscale), np.float32(scale))

