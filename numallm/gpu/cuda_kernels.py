"""CUDA matrix kernels over weights kept in their GGUF encoding (numba-cuda).

A weight matrix W (N rows of K values) is copied to the device byte for byte: F32 and F16 as
typed (N, K) arrays, the block types as their raw uint8 rows (N, row_bytes). Nothing is inflated:
a Q4_0 matrix costs its GGUF size on the GPU. `GpuMatrix.matmul` computes out = x @ W.T for a few
tokens x float32 (T, K) -> out float32 (T, N), decoding each weight once per token tile.

Thread layout (one kernel serves decode, T = 1, and prefill tiles of up to TILE tokens):
  block = (lanes, rows): threadIdx.y picks a row of the block's row group, the `lanes` threads of
  that row split its K columns (32-value units for the block types, single columns for F32/F16)
  and meet in a shared-memory tree reduction. blockIdx.x walks row groups (grid-stride, so a
  small grid covers any N), blockIdx.y walks token tiles.
On a GPU lanes = 32 (one warp per row: lane i reads unit i, i + 32, ..., so a warp streams
32 consecutive blocks of a row), rows = 4. Numba's CUDA simulator runs one Python thread per
CUDA thread, so under NUMBA_ENABLE_CUDASIM the same kernels launch with far fewer threads
(Launch.simulator, Launch.coverage).

Decoders reproduce the CPU units' float32 dequantization (`numallm_kernels`, gguf-py's order):
the block scale times the integer code, with K-quants' sub-block scale rounded to float32 first.
Products with x are summed in float32 per thread, then in the tree: the order differs from the
CPU kernels (which also quantize x to int8 for the block types), so results agree within float
rounding plus the CPU's activation-quantization error, not bit for bit.

Device functions here use no `cuda.*` attribute: the simulator swaps the `cuda` global of their
module on every call, which races between its threads.
"""
from __future__ import annotations

import math
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from ..gguf_file import GGMLQuantizationType as T
from numba import cuda

UNIT = 32            # values per decode unit: a Q4_0/Q8_0 block, a Q4_K sub-block, 2 Q6_K ones
TILE = 8             # tokens per matmul tile (accumulators per thread)
MAX_THREADS = 256    # threads per block any launch here may use (sizes the shared arrays)
RED_SIZE = MAX_THREADS * TILE   # shared partial sums (a literal for the compiler)
TWO_M24 = 2.0 ** -24
TWO_M25 = 2.0 ** -25


@dataclass(frozen=True)
class Launch:
    """Launch shape: threads per row (power of two), rows per block, cap on blocks per grid."""

    lanes: int = 32
    rows: int = 4
    max_blocks: int = 65535
    attn_threads: int = 128   # threads per (head, token) in attention, per row in RMS norm;
                              # a power of two
    ew_threads: int = 256     # threads per block of elementwise kernels

    @staticmethod
    def gpu() -> "Launch":
        return Launch()

    @staticmethod
    def simulator() -> "Launch":
        """Every simulated thread is a Python thread and every syncthreads a poll of all of them:
        one lane per row (no reduction rounds), 16 rows per block, one block. Measured on a 172 x
        64 F32 matvec: 0.14 s, against 0.57 s for 4 lanes x 2 rows x 2 blocks. The kernel tests
        launch with several lanes and blocks (Launch.coverage) so every reduction path runs."""
        return Launch(lanes=1, rows=16, max_blocks=1, attn_threads=8, ew_threads=8)

    @staticmethod
    def coverage() -> "Launch":
        """Small but complete: tree reductions over 4 lanes, grid-stride loops over 2 blocks."""
        return Launch(lanes=4, rows=2, max_blocks=2, attn_threads=8, ew_threads=8)


def simulated() -> bool:
    from numba.core import config

    return bool(config.ENABLE_CUDASIM)


def launch_config() -> Launch:
    return Launch.simulator() if simulated() else Launch.gpu()


@contextmanager
def simulator_pace():
    """Under the simulator, a 0.1 ms GIL switch interval while kernels run (restored after).

    The simulator's block manager busy-waits for its threads at every syncthreads; with Python's
    default 5 ms interval each barrier costs milliseconds, and attention runs ~8x slower. On a
    GPU this does nothing."""
    if not simulated():
        yield
        return
    _lock_simulator_shared_arrays()
    prev = sys.getswitchinterval()
    sys.setswitchinterval(1e-4)
    try:
        yield
    finally:
        sys.setswitchinterval(prev)


_SHARED_LOCK: threading.Lock | None = None


def _lock_simulator_shared_arrays() -> None:
    """Make the simulator's cuda.shared.array safe for the threads of a block (once).

    numba's simulator (FakeCUDAShared.array) gives a block's threads one array per call site:
    the first thread to ask allocates it, the others look it up, with no lock between the lookup
    and the store. Two threads that ask first, close together (likelier with the short switch
    interval above), get different arrays, and a reduction across the block (RMS norm,
    attention) is then wrong: measured about 1 launch in 1500 of a 4-row RMS norm, enough to
    flip a token in an end-to-end test now and then. The same logic under a lock."""
    global _SHARED_LOCK
    if _SHARED_LOCK is not None:
        return
    try:
        from numba.cuda.simulator.kernelapi import FakeCUDAShared
        from numba.np import numpy_support
        from numba.core import types
    except ImportError:             # another simulator layout: leave it as it is
        return
    lock = _SHARED_LOCK = threading.Lock()
    dynamic = FakeCUDAShared.array

    def array(self, shape, dtype):
        if shape == 0:              # dynamic shared memory: one preallocated buffer, no race
            return dynamic(self, shape, dtype)
        f = sys._getframe(1)        # the kernel line asking, as the simulator keys it
        key = (f.f_code.co_filename, f.f_lineno)
        with lock:
            res = self._allocations.get(key)
            if res is None:
                dt = numpy_support.as_dtype(dtype) if isinstance(dtype, types.Type) else dtype
                res = self._allocations[key] = np.empty(shape, dt)
        return res

    FakeCUDAShared.array = array


# -- decoders: 32 values of unit u of row r into buf[0:32] ------------------------------------

@cuda.jit(device=True)
def f16_at(w, r, o):
    """The IEEE half at bytes w[r, o], w[r, o + 1] as float32, exactly: every factor below is an
    integer of at most 31 bits or a power of two, so no product rounds (no half-type support
    needed, and the simulator runs it as plain Python)."""
    h = np.int32(w[r, o]) | (np.int32(w[r, o + 1]) << 8)
    e = (h >> 10) & 31
    m = h & 1023
    if e == 0:
        v = np.float32(m) * TWO_M24
    elif e == 31:
        v = math.inf if m == 0 else math.nan
    else:
        v = np.float32(m | 1024) * np.float32(np.int32(1) << e) * TWO_M25
    return np.float32(-v) if h & 0x8000 else np.float32(v)


@cuda.jit(device=True)
def decode_q4_0(w, r, u, buf):
    # 18-byte block: d f16 | 16 bytes, value j = lo nibble of byte j, value j+16 = hi nibble
    o = u * 18
    d = f16_at(w, r, o)
    for j in range(16):
        q = np.int32(w[r, o + 2 + j])
        buf[j] = d * np.float32((q & 15) - 8)
        buf[j + 16] = d * np.float32((q >> 4) - 8)


@cuda.jit(device=True)
def decode_q8_0(w, r, u, buf):
    # 34-byte block: d f16 | 32 x int8
    o = u * 34
    d = f16_at(w, r, o)
    for j in range(32):
        q = np.int32(w[r, o + 2 + j])
        buf[j] = d * np.float32(q - 256 if q > 127 else q)


@cuda.jit(device=True)
def decode_q4_k(w, r, u, buf):
    # 144-byte super-block of 8 units: d f16 | dmin f16 | 12 bytes of 6-bit scales/mins | 128 qs
    # unit j uses nibble j % 2 of bytes 16 + 32 * (j // 2) .. +31 (see kernels/kquant_x8.py)
    ob = (u // 8) * 144
    j = u % 8
    d = f16_at(w, r, ob)
    dmin = f16_at(w, r, ob + 2)
    s = ob + 4
    if j < 4:
        sc = np.int32(w[r, s + j]) & 63
        mn = np.int32(w[r, s + j + 4]) & 63
    else:
        sc = (np.int32(w[r, s + j + 4]) & 15) | ((np.int32(w[r, s + j - 4]) >> 6) << 4)
        mn = (np.int32(w[r, s + j + 4]) >> 4) | ((np.int32(w[r, s + j]) >> 6) << 4)
    dd = d * np.float32(sc)
    mm = dmin * np.float32(mn)
    qo = ob + 16 + (j // 2) * 32
    sh = 4 * (j % 2)
    for l in range(32):
        buf[l] = dd * np.float32((np.int32(w[r, qo + l]) >> sh) & 15) - mm


@cuda.jit(device=True)
def decode_q6_k(w, r, u, buf):
    # 210-byte super-block of 8 units (h, g): ql[128] | qh[64] | 16 int8 scales | d f16
    # value 128h + 32g + l = (4 bits of ql | 2 bits of qh) - 32 (see kernels/kquant_x8.py)
    ob = (u // 8) * 210
    h = (u % 8) // 4
    g = u % 4
    d = f16_at(w, r, ob + 208)
    lo_o = ob + 64 * h + 32 * (g % 2)
    hi_o = ob + 128 + 32 * h
    sl = 4 * (g // 2)
    for k in range(2):
        sc = np.int32(w[r, ob + 192 + 8 * h + 2 * g + k])
        dd = d * np.float32(sc - 256 if sc > 127 else sc)
        for l in range(16):
            i = 16 * k + l
            q = ((np.int32(w[r, lo_o + i]) >> sl) & 15) | (((np.int32(w[r, hi_o + i]) >> (2 * g)) & 3) << 4)
            buf[i] = dd * np.float32(q - 32)


# -- kernels ----------------------------------------------------------------------------------

def _make_blocked(decode):
    """matmul kernel for a 32-value block type decoded by `decode`."""

    @cuda.jit
    def kernel(w, x, out, n_rows, n_units, n_tok):
        # w: uint8 (N, row_bytes); x: float32 (T, K) with K = n_units * 32; out: float32 (T, N)
        lanes = cuda.blockDim.x
        tx = cuda.threadIdx.x
        ty = cuda.threadIdx.y
        red = cuda.shared.array(RED_SIZE, np.float32)   # (threads, TILE) partial sums
        buf = cuda.local.array(UNIT, np.float32)                   # one decoded unit
        acc = cuda.local.array(TILE, np.float32)
        tid = (ty * lanes + tx) * TILE
        t0 = cuda.blockIdx.y * TILE
        nt = min(TILE, n_tok - t0)
        for base in range(cuda.blockIdx.x * cuda.blockDim.y, n_rows, cuda.gridDim.x * cuda.blockDim.y):
            r = base + ty
            for t in range(TILE):
                acc[t] = np.float32(0.0)
            if r < n_rows:
                for u in range(tx, n_units, lanes):
                    decode(w, r, u, buf)
                    xo = u * UNIT
                    for t in range(nt):
                        s = np.float32(0.0)
                        for j in range(UNIT):
                            s += buf[j] * x[t0 + t, xo + j]
                        acc[t] += s
            for t in range(TILE):
                red[tid + t] = acc[t]
            cuda.syncthreads()
            half = lanes // 2
            while half > 0:
                if tx < half:
                    for t in range(nt):
                        red[tid + t] += red[tid + half * TILE + t]
                cuda.syncthreads()
                half //= 2
            if tx == 0 and r < n_rows:
                for t in range(nt):
                    out[t0 + t, r] = red[tid + t]
            cuda.syncthreads()   # red is rewritten by the next row group

    return kernel


@cuda.jit
def _dense_kernel(w, x, out, n_rows, n_cols, n_tok):
    # w: float32 or float16 (N, K); lanes read consecutive columns (coalesced); out: (T, N)
    lanes = cuda.blockDim.x
    tx = cuda.threadIdx.x
    ty = cuda.threadIdx.y
    red = cuda.shared.array(RED_SIZE, np.float32)
    acc = cuda.local.array(TILE, np.float32)
    tid = (ty * lanes + tx) * TILE
    t0 = cuda.blockIdx.y * TILE
    nt = min(TILE, n_tok - t0)
    for base in range(cuda.blockIdx.x * cuda.blockDim.y, n_rows, cuda.gridDim.x * cuda.blockDim.y):
        r = base + ty
        for t in range(TILE):
            acc[t] = np.float32(0.0)
        if r < n_rows:
            for c in range(tx, n_cols, lanes):
                wv = np.float32(w[r, c])
                for t in range(nt):
                    acc[t] += wv * x[t0 + t, c]
        for t in range(TILE):
            red[tid + t] = acc[t]
        cuda.syncthreads()
        half = lanes // 2
        while half > 0:
            if tx < half:
                for t in range(nt):
                    red[tid + t] += red[tid + half * TILE + t]
            cuda.syncthreads()
            half //= 2
        if tx == 0 and r < n_rows:
            for t in range(nt):
                out[t0 + t, r] = red[tid + t]
        cuda.syncthreads()


# GGML type -> (kernel, device dtype of the stored matrix, True for 32-value block types)
_KERNELS = {
    T.F32: (_dense_kernel, np.float32, False),
    T.F16: (_dense_kernel, np.float16, False),
    T.Q4_0: (_make_blocked(decode_q4_0), np.uint8, True),
    T.Q8_0: (_make_blocked(decode_q8_0), np.uint8, True),
    T.Q4_K: (_make_blocked(decode_q4_k), np.uint8, True),
    T.Q6_K: (_make_blocked(decode_q6_k), np.uint8, True),
}

# The types these kernels compute (numallm.gpu.plan.GPU_TYPES mirrors this set).
SUPPORTED = frozenset(_KERNELS)


def device_layout(qtype: T, raw: np.ndarray) -> np.ndarray:
    """The host array to copy to the device for raw GGUF rows uint8 (N, row_bytes): the same
    bytes, typed (N, K) for F32/F16 (a view, no copy), as-is for the block types."""
    dtype = _KERNELS[qtype][1]
    raw = np.ascontiguousarray(raw)
    return raw if dtype == np.uint8 else raw.view(dtype)


class GpuMatrix:
    """A weight matrix on the device in its GGUF encoding; `matmul` launches its type's kernel."""

    def __init__(self, qtype: T, shape: tuple[int, int], dev):
        self.qtype = T(qtype)
        self.shape = shape                 # (N, K)
        self.dev = dev                     # device array (N, row_bytes) uint8 or (N, K) typed
        self.kernel, _, self.blocked = _KERNELS[self.qtype]
        self.nbytes = int(dev.nbytes)
        if self.blocked and shape[1] % UNIT:
            raise ValueError(f"{qtype.name} rows of {shape[1]} values are not whole 32-value units")

    def matmul(self, x, out, n_tok: int, launch: Launch) -> None:
        """out[:n_tok] = x[:n_tok] @ W.T; x: device float32 (>= n_tok, K), out: (>= n_tok, N)."""
        n, k = self.shape
        grid = (min(launch.max_blocks, -(-n // launch.rows)), -(-n_tok // TILE))
        block = (launch.lanes, launch.rows)
        inner = k // UNIT if self.blocked else k
        self.kernel[grid, block](self.dev, x, out, n, inner, n_tok)

