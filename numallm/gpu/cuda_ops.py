"""CUDA kernels for the rest of a transformer block: RMS norm, RoPE, the KV cache and attention,
SwiGLU's silu(gate) * up, residual and bias adds (numba-cuda).

Each function mirrors the CPU op in numallm/ops.py (same float32 formulas; RoPE angles in float64
as ops.Rope computes them) and takes device arrays, C-contiguous, preallocated by the caller.
Launch shapes come from cuda_kernels.Launch (small under the simulator).

Attention keeps no (heads x tokens x context) score matrix: one thread block per (query head,
token) walks the cached positions in chunks of blockDim.x, one position per thread, with an
online softmax (running max and sum, rescaled per chunk); thread i accumulates output dims
i, i + blockDim.x, ... so V rows are read coalesced. Memory is therefore independent of the
context length apart from the cache itself.
"""
from __future__ import annotations

import math

import numpy as np
from numba import cuda

from .cuda_kernels import MAX_THREADS, Launch

MAX_HEAD_DIM = 576      # shared query vector per block (DeepSeek's latent rows: 512 + 64)
DIMS_PER_THREAD = 8     # output dims one attention thread accumulates: threads >= head_dim / 8


@cuda.jit
def _rms_norm(x, w, out, n_rows, dim, eps):
    # x, out: float32 (R, D) (out may be x); w: float32 (D,). One block per row (grid-stride).
    red = cuda.shared.array(MAX_THREADS, np.float32)
    tx = cuda.threadIdx.x
    nt = cuda.blockDim.x
    for r in range(cuda.blockIdx.x, n_rows, cuda.gridDim.x):
        s = np.float32(0.0)
        for c in range(tx, dim, nt):
            v = x[r, c]
            s += v * v
        red[tx] = s
        cuda.syncthreads()
        half = nt // 2
        while half > 0:
            if tx < half:
                red[tx] += red[tx + half]
            cuda.syncthreads()
            half //= 2
        inv = np.float32(1.0) / math.sqrt(red[0] / np.float32(dim) + np.float32(eps))
        cuda.syncthreads()          # everyone has read red[0] before the next row rewrites it
        for c in range(tx, dim, nt):
            out[r, c] = x[r, c] * inv * w[c]


@cuda.jit
def _rope(x, pos0, n_tok, n_head, inv_freq, freq_scale, dim, neox, mscale):
    # x: float32 (T, n_head, head_dim) rotated in place; inv_freq: float64 (dim/2,) per pair
    # (YaRN: with its per-pair position scale folded in); cos/sin times mscale (YaRN's magnitude)
    half = dim // 2
    n = n_tok * n_head * half
    for i in range(cuda.grid(1), n, cuda.gridsize(1)):
        p = i % half
        h = (i // half) % n_head
        t = i // (half * n_head)
        ang = np.float64(pos0 + t) * freq_scale * inv_freq[p]
        c = np.float32(math.cos(ang) * mscale)
        s = np.float32(math.sin(ang) * mscale)
        if neox:
            ia = p
            ib = p + half
        else:
            ia = 2 * p
            ib = 2 * p + 1
        a = x[t, h, ia]
        b = x[t, h, ib]
        x[t, h, ia] = a * c - b * s
        x[t, h, ib] = a * s + b * c


@cuda.jit
def _kv_store(k, v, kc, vc, pos0, n_tok):
    # k, v: float32 (T, n_kv, hd) -> kc, vc: (n_kv, n_ctx, hd) at positions pos0.. (f16 or f32)
    n_kv = k.shape[1]
    hd = k.shape[2]
    n = n_tok * n_kv * hd
    for i in range(cuda.grid(1), n, cuda.gridsize(1)):
        d = i % hd
        g = (i // hd) % n_kv
        t = i // (hd * n_kv)
        kc[g, pos0 + t, d] = k[t, g, d]
        vc[g, pos0 + t, d] = v[t, g, d]


@cuda.jit
def _attention(q, kc, vc, out, pos0, n_tok, group, scale):
    # q: float32 (T, n_head, hd); kc, vc: (n_kv, n_ctx, hd); out: float32 (T, n_head * hd).
    # Query t sits at position pos0 + t and sees positions 0..pos0 + t (causal).
    n_head = q.shape[1]
    hd = q.shape[2]
    tx = cuda.threadIdx.x
    nt = cuda.blockDim.x
    sq = cuda.shared.array(MAX_HEAD_DIM, np.float32)    # this head's query
    sw = cuda.shared.array(MAX_THREADS, np.float32)     # a chunk's scores, then weights
    red = cuda.shared.array(MAX_THREADS, np.float32)
    acc = cuda.local.array(DIMS_PER_THREAD, np.float32)  # output dims tx, tx + nt, ...
    for item in range(cuda.blockIdx.x, n_head * n_tok, cuda.gridDim.x):
        h = item % n_head
        t = item // n_head
        g = h // group
        end = pos0 + t + 1
        for d in range(tx, hd, nt):
            sq[d] = q[t, h, d]
        for i in range(DIMS_PER_THREAD):
            acc[i] = np.float32(0.0)
        m = np.float32(-math.inf)
        l = np.float32(0.0)
        cuda.syncthreads()
        for c0 in range(0, end, nt):
            p = c0 + tx
            s = np.float32(-math.inf)
            if p < end:
                dot = np.float32(0.0)
                for d in range(hd):
                    dot += sq[d] * np.float32(kc[g, p, d])
                s = dot * scale
            sw[tx] = s
            red[tx] = s
            cuda.syncthreads()
            half = nt // 2
            while half > 0:
                if tx < half:
                    red[tx] = max(red[tx], red[tx + half])
                cuda.syncthreads()
                half //= 2
            m_new = max(m, red[0])
            cuda.syncthreads()
            e = np.float32(math.exp(s - m_new)) if p < end else np.float32(0.0)
            sw[tx] = e
            red[tx] = e
            cuda.syncthreads()
            half = nt // 2
            while half > 0:
                if tx < half:
                    red[tx] += red[tx + half]
                cuda.syncthreads()
                half //= 2
            corr = np.float32(math.exp(m - m_new))
            l = l * corr + red[0]
            n_pos = min(nt, end - c0)
            for i in range(DIMS_PER_THREAD):
                d = tx + i * nt
                if d < hd:
                    a = np.float32(0.0)
                    for j in range(n_pos):
                        a += sw[j] * np.float32(vc[g, c0 + j, d])
                    acc[i] = acc[i] * corr + a
            m = m_new
            cuda.syncthreads()      # sw/red are rewritten by the next chunk
        for i in range(DIMS_PER_THREAD):
            d = tx + i * nt
            if d < hd:
                out[t, h * hd + d] = acc[i] / l
        cuda.syncthreads()


@cuda.jit
def _swiglu(g, u, out, n_tok):
    # g, u, out: float32 (T, n_ff) (out may be g); out = silu(g) * u on the first n_tok rows
    cols = g.shape[1]
    for i in range(cuda.grid(1), n_tok * cols, cuda.gridsize(1)):
        t = i // cols
        c = i % cols
        a = g[t, c]
        out[t, c] = a / (np.float32(1.0) + np.float32(math.exp(-a))) * u[t, c]


@cuda.jit
def _add(x, y, out, n_rows):
    # x, out: float32 (R, C) (out may be x); y: (R, C) or (1, C), a row added to every row (a
    # bias); out = x + y on the first n_rows rows (the residual add, a bias add)
    cols = x.shape[1]
    y_rows = y.shape[0]
    for i in range(cuda.grid(1), n_rows * cols, cuda.gridsize(1)):
        r = i // cols
        c = i % cols
        out[r, c] = x[r, c] + y[r % y_rows, c]


@cuda.jit
def _sigmoid_gate(x, h, w, out, n_tok):
    # x, out: float32 (T, N); h: (T, K); w: (K,). out[t] = x[t] * sigmoid(h[t] . w): one block
    # per row, its threads share the dot product through a tree in shared memory
    red = cuda.shared.array(MAX_THREADS, np.float32)
    tx, nt = cuda.threadIdx.x, cuda.blockDim.x
    k, n = h.shape[1], x.shape[1]
    for t in range(cuda.blockIdx.x, n_tok, cuda.gridDim.x):
        a = np.float32(0.0)
        for c in range(tx, k, nt):
            a += h[t, c] * w[c]
        red[tx] = a
        cuda.syncthreads()
        s = nt // 2
        while s > 0:
            if tx < s:
                red[tx] += red[tx + s]
            cuda.syncthreads()
            s //= 2
        g = np.float32(1.0) / (np.float32(1.0) + np.float32(math.exp(-red[0])))
        for c in range(tx, n, nt):
            out[t, c] = x[t, c] * g
        cuda.syncthreads()


@cuda.jit
def _axpy_row(out, y, alpha, row):
    # out: float32 (T, N); y: (>= 1, N). out[row] += alpha * y[0] (one routed expert's share)
    n = out.shape[1]
    for c in range(cuda.grid(1), n, cuda.gridsize(1)):
        out[row, c] += alpha * y[0, c]


@cuda.jit
def _zero(out, n_rows):
    cols = out.shape[1]
    for i in range(cuda.grid(1), n_rows * cols, cuda.gridsize(1)):
        out[i // cols, i % cols] = np.float32(0.0)


# -- host-side launchers ----------------------------------------------------------------------

def _grid(n: int, launch: Launch) -> tuple[int, int]:
    return min(launch.max_blocks, max(1, -(-n // launch.ew_threads))), launch.ew_threads


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def rms_norm(x, w, out, n_rows: int, eps: float, launch: Launch) -> None:
    """out[:n_rows] = x * rsqrt(mean(x^2) + eps) * w over the last axis; x, out: (R, D)."""
    threads = min(launch.attn_threads, MAX_THREADS)
    _rms_norm[min(launch.max_blocks, n_rows), threads](x, w, out, n_rows, x.shape[1], eps)


def rope(x, pos0: int, n_tok: int, inv_freq, freq_scale: float, dim: int, neox: bool,
         launch: Launch, mscale: float = 1.0) -> None:
    """Rotate the first `dim` features of each head of x (T, n_head, hd) in place: pair p by
    position * freq_scale * inv_freq[p], cos and sin times mscale."""
    n = n_tok * x.shape[1] * (dim // 2)
    _rope[_grid(n, launch)](x, pos0, n_tok, x.shape[1], inv_freq, freq_scale, dim, neox,
                            float(mscale))


def kv_store(k, v, kc, vc, pos0: int, n_tok: int, launch: Launch) -> None:
    n = n_tok * k.shape[1] * k.shape[2]
    _kv_store[_grid(n, launch)](k, v, kc, vc, pos0, n_tok)


def attention(q, kc, vc, out, pos0: int, n_tok: int, launch: Launch) -> None:
    """Causal GQA attention of queries q (T, n_head, hd) at positions pos0.. over the cache."""
    n_head, hd = q.shape[1], q.shape[2]
    if hd > MAX_HEAD_DIM:
        raise ValueError(f"head size {hd} > {MAX_HEAD_DIM}")
    threads = min(MAX_THREADS, max(launch.attn_threads, _pow2_at_least(-(-hd // DIMS_PER_THREAD))))
    group = n_head // kc.shape[0]
    scale = np.float32(1.0 / math.sqrt(hd))
    _attention[min(n_head * n_tok, launch.max_blocks), threads](q, kc, vc, out, pos0, n_tok, group, scale)


def swiglu(g, u, out, n_tok: int, launch: Launch) -> None:
    """out[:n_tok] = silu(g) * u; g, u, out: (T, n_ff)."""
    _swiglu[_grid(n_tok * g.shape[1], launch)](g, u, out, n_tok)


def add(x, y, out, n_rows: int, launch: Launch) -> None:
    """out[:n_rows] = x + y; x, out: (R, C), y: (R, C) or one row (1, C) added to each."""
    _add[_grid(n_rows * x.shape[1], launch)](x, y, out, n_rows)


def sigmoid_gate(x, h, w, out, n_tok: int, launch: Launch) -> None:
    """out[:n_tok] = x * sigmoid(h @ w) per row; x, out: (T, N), h: (T, K), w: (K,)."""
    threads = min(launch.attn_threads, MAX_THREADS)
    _sigmoid_gate[min(launch.max_blocks, n_tok), threads](x, h, w, out, n_tok)


def axpy_row(out, y, alpha: float, row: int, launch: Launch) -> None:
    """out[row] += alpha * y[0]; out: (T, N), y: (>= 1, N)."""
    _axpy_row[_grid(out.shape[1], launch)](out, y, np.float32(alpha), row)


def zero(out, n_rows: int, launch: Launch) -> None:
    """out[:n_rows] = 0."""
    _zero[_grid(n_rows * out.shape[1], launch)](out, n_rows)
