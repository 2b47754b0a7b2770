"""KV cache element types: storing float32 keys/values into a cache, and reading one cached row
back as float32, for the attention kernels (attention.py) to call per row.

A cache array holds (n_kv, n_ctx, hd) values of one type, as llama.cpp's cache types:
    f32:  float32 (n_kv, n_ctx, hd); its scale array is unused (any float32 array)
    f16:  uint16 (n_kv, n_ctx, hd), IEEE half bits (round to nearest even, as F16C's vcvtps2ph
          and numpy's astype(float16)); scale unused
    q8_0: int8 (n_kv, n_ctx, hd) codes plus uint16 (n_kv, n_ctx, hd // 32) half scales: a block of
          32 values is d * code, d = amax / 127 stored as half, code = round-half-even(x * 127 /
          amax) (ggml's x86 quantize_row_q8_0; 34 bytes per 32 values as GGML's block_q8_0)
The row loader `kv_row` is resolved at compile time by the array's dtype, so each kernel using it
is specialized per cache type and reads the cache as stored (no float32 copy of the cache).
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload

from ._simd import host_features

QK8_0 = 32


@intrinsic
def _hw_f16_to_f32(typingctx, h):
    """float32 of the half whose bits are the uint16 h (fpext: vcvtph2ps with F16C)."""
    sig = types.float32(types.uint16)

    def codegen(context, builder, sig, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return sig, codegen


@intrinsic
def _hw_f32_to_f16(typingctx, x):
    """The half bits (uint16) of float32 x, rounded to nearest even (fptrunc: vcvtps2ph)."""
    sig = types.uint16(types.float32)

    def codegen(context, builder, sig, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))

    return sig, codegen


@intrinsic
def _bits_f32(typingctx, b):
    """The float32 whose bits are the uint32 b."""
    sig = types.float32(types.uint32)

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen


@intrinsic
def _f32_bits(typingctx, x):
    """The bits (uint32) of float32 x."""
    sig = types.uint32(types.float32)

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return sig, codegen


@njit(nogil=True, cache=True)
def _sw_f16_to_f32(h):
    """_hw_f16_to_f32 in integer arithmetic: without F16C, LLVM lowers fpext from half to a
    runtime-library call that Numba's JIT does not link (a crash)."""
    b = np.uint32(h)
    sign = (b & np.uint32(0x8000)) << np.uint32(16)
    e = (b >> np.uint32(10)) & np.uint32(0x1F)
    m = b & np.uint32(0x3FF)
    if e == 0:
        if m == 0:
            return _bits_f32(sign)
        e2 = np.uint32(113)                  # subnormal: normalise, one exponent step per shift
        while (m & np.uint32(0x400)) == 0:
            m <<= np.uint32(1)
            e2 -= np.uint32(1)
        return _bits_f32(sign | (e2 << np.uint32(23)) | ((m & np.uint32(0x3FF)) << np.uint32(13)))
    if e == 31:
        return _bits_f32(sign | np.uint32(0x7F800000) | (m << np.uint32(13)))
    return _bits_f32(sign | ((e + np.uint32(112)) << np.uint32(23)) | (m << np.uint32(13)))


@njit(nogil=True, cache=True)
def _sw_f32_to_f16(x):
    """_hw_f32_to_f16 in integer arithmetic (round to nearest even, as vcvtps2ph)."""
    u = _f32_bits(x)
    sign = (u >> np.uint32(16)) & np.uint32(0x8000)
    u &= np.uint32(0x7FFFFFFF)
    if u >= np.uint32(0x7F800000):                       # inf, nan (kept quiet)
        nan = np.uint32(0x200) if u > np.uint32(0x7F800000) else np.uint32(0)
        return np.uint16(sign | np.uint32(0x7C00) | nan)
    if u >= np.uint32(0x477FF000):                       # >= 65520 rounds to inf
        return np.uint16(sign | np.uint32(0x7C00))
    if u < np.uint32(0x38800000):                        # below 2**-14: a subnormal half or 0
        if u <= np.uint32(0x33000000):                   # <= 2**-25: 0 (a tie goes to even 0)
            return np.uint16(sign)
        shift = np.uint32(126) - (u >> np.uint32(23))
        m = (u & np.uint32(0x7FFFFF)) | np.uint32(0x800000)
        r = m >> shift
        rem = m & ((np.uint32(1) << shift) - np.uint32(1))
        half = np.uint32(1) << (shift - np.uint32(1))
        if rem > half or (rem == half and (r & np.uint32(1))):
            r += np.uint32(1)
        return np.uint16(sign | r)
    r = (u >> np.uint32(13)) - np.uint32(112 << 10)      # rebias the exponent 127 -> 15
    rem = u & np.uint32(0x1FFF)
    if rem > np.uint32(0x1000) or (rem == np.uint32(0x1000) and (r & np.uint32(1))):
        r += np.uint32(1)                                # a carry rounds up into the exponent
    return np.uint16(sign | r)


# F16C (vcvtph2ps / vcvtps2ph) where Numba compiles for it; integer code for a generic target
# (NUMBA_CPU_NAME=generic, e.g. a cache shared with other machines)
_F16C = "f16c" in host_features()
f16_to_f32 = _hw_f16_to_f32 if _F16C else _sw_f16_to_f32
f32_to_f16 = _hw_f32_to_f16 if _F16C else _sw_f32_to_f16


def kv_row(a, d, g, s, tmp):
    """Row (g, s) of cache array `a` (with its scale array `d`; f32 and f16 pass `a` again) as
    float32 (hd,): a view for f32, else decoded into `tmp` (float32 (hd,)) and returned."""
    raise NotImplementedError("kv_row is called from Numba code only")


@overload(kv_row, inline="always")
def _kv_row(a, d, g, s, tmp):
    if a.dtype == types.float32:
        def impl(a, d, g, s, tmp):
            return a[g, s]
    elif a.dtype == types.uint16:
        def impl(a, d, g, s, tmp):
            r = a[g, s]
            for j in range(r.shape[0]):
                tmp[j] = f16_to_f32(r[j])
            return tmp
    elif a.dtype == types.int8:
        def impl(a, d, g, s, tmp):
            r, dr = a[g, s], d[g, s]
            for j in range(r.shape[0]):          # codes to float32 first: one vectorized loop
                tmp[j] = r[j]
            for b in range(dr.shape[0]):
                sc = f16_to_f32(dr[b])
                blk = tmp[b * QK8_0:(b + 1) * QK8_0]
                for j in range(QK8_0):
                    blk[j] *= sc
            return tmp
    else:
        return None
    return impl


def kv_block(a, d, g, s0, n, rows, buf):
    """Rows s0..s0+n-1 (n <= rows) of KV head g of cache array `a` (scale array `d`) as a
    block of `rows` x hd values: (a flat array, the block's offset in it), float32 or f16 bits
    (the attention blocks convert those as they load them). A whole f32 or f16 block is the
    cache itself; otherwise the rows copied (f16) or decoded (q8_0) into buf (float32,
    >= rows * hd) and rows n.. zeroed (a zero row times a zero weight stays 0, where the cache's
    unwritten memory could hold NaN bits)."""
    raise NotImplementedError("kv_block is called from Numba code only")


@overload(kv_block, inline="always")
def _kv_block(a, d, g, s0, n, rows, buf):
    if a.dtype in (types.float32, types.uint16):
        as_cache = np.float32 if a.dtype == types.float32 else np.uint16   # f16 bits: +0.0 pads

        def impl(a, d, g, s0, n, rows, buf):
            hd = a.shape[2]
            if n == rows:
                return a.reshape(a.size), (g * a.shape[1] + s0) * hd
            b = buf.view(as_cache)
            for i in range(n):
                b[i * hd:(i + 1) * hd] = a[g, s0 + i]
            b[n * hd:rows * hd] = 0
            return b, 0
    elif a.dtype == types.int8:
        def impl(a, d, g, s0, n, rows, buf):
            hd = a.shape[2]
            for i in range(n):                   # decoded in place (kv_row writes its tmp)
                kv_row(a, d, g, s0 + i, buf[i * hd:(i + 1) * hd])
            buf[n * hd:rows * hd] = 0.0
            return buf, 0
    else:
        return None
    return impl


@njit(nogil=True, cache=True)
def store_f16(x, dst, pos0):
    """dst[:, pos0 + t] = half(x[t]) for x float32 (T, n_kv, hd), dst uint16 (n_kv, n_ctx, hd)."""
    for t in range(x.shape[0]):
        for g in range(x.shape[1]):
            for j in range(x.shape[2]):
                dst[g, pos0 + t, j] = f32_to_f16(x[t, g, j])


@njit(nogil=True, cache=True)
def store_q8_0(x, qs, d, pos0):
    """qs/d[:, pos0 + t] = q8_0 blocks of x[t]: x float32 (T, n_kv, hd), qs int8 (n_kv, n_ctx,
    hd), d uint16 (n_kv, n_ctx, hd // 32). hd must be a multiple of 32."""
    for t in range(x.shape[0]):
        for g in range(x.shape[1]):
            for b in range(x.shape[2] // QK8_0):
                amax = np.float32(0.0)
                for j in range(b * QK8_0, (b + 1) * QK8_0):
                    amax = max(amax, abs(x[t, g, j]))
                d[g, pos0 + t, b] = f32_to_f16(amax / np.float32(127.0))
                inv = np.float32(127.0) / amax if amax != np.float32(0.0) else np.float32(0.0)
                for j in range(b * QK8_0, (b + 1) * QK8_0):
                    qs[g, pos0 + t, j] = np.int8(np.rint(x[t, g, j] * inv))


@njit(nogil=True, cache=True)
def load_rows(a, d, end, out):
    """out[g, s] = kv_row(a, d, g, s) for s < end: the prefix of a cache as float32, out
    (n_kv, >= end, hd) (prefill converts it once per call, then multiplies with BLAS)."""
    tmp = np.empty(a.shape[2], dtype=np.float32)
    for g in range(a.shape[0]):
        for s in range(end):
            r = kv_row(a, d, g, s, tmp)
            for j in range(r.shape[0]):
                out[g, s, j] = r[j]
