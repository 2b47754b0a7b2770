"""The IQ types' token tiles (variant avx512vnni-t16 of `_iq_common.IQUnit`): prefill and batched
decode with 16 tokens in the lanes of one zmm register.

The record types' tiles put rows in the lanes and broadcast the activations; an IQ row would
first have to be decoded and transposed. Here the tokens go in the lanes instead: each call
lays its activations out once as `xt` (tokens in lanes, below), and each row's blocks are
decoded once per call (the avx2-iq sub-block decoder, `SUB`) into int8 scratch. Then every
4 weights of a row are one broadcast {1to16} operand of a vpdpbusd against 16 tokens' 4 bytes,
and ROWS rows share each activation load. Per 16 weights a vpmulld by the row's sub-block
scale, per block the correction below, one float conversion and one FMA per row.

vpdpbusd takes unsigned bytes on one side: the activations go in as x + 128 (u8), the weights
as themselves (|w| <= 62), and per block the row's 128 * sum(scale * w) is taken off, so each
lane's int32 block sum is sum(scale * w * x) exactly (|sum| < 2^27, as in avx2-iq). Then
acc += float(sum) * (f * dx): each token's lane does the same operations whatever the number of
tokens or its place in a tile, so T = 1 equals prefill row by row. The float order differs from
avx2-iq's (one exact block sum instead of 8 partial lanes), so this variant's bits are its own.

Layouts (u: a tile of 16 tokens, b: a block of 256 weights, q: 4 weights of a block):
  xt   uint8 (n_tiles, nb, 64, 16, 4): token 16u + i's bytes 4q..4q + 3 of block b, + 128;
       padding tokens 128 (x = 0)
  dxt  float32 (n_tiles, nb, 16): their scales (padding 0)
  wb   int8 (ROWS, K): the rows' decoded weights; sc int32 (ROWS, K / 16): their sub-block
       scales; cr int32 (ROWS, nb): 128 * sum(scale * w) per block; fr float32 (ROWS, nb): f
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from ._iq_simd import _half, _psign, i8x32, store_w
from ._kx16_simd import (_V16D, _V16F, _bcast, _dpbusd, _fma, _splat_f, _step_fence, f32x16,
                         vzero16)
from ._simd import _I32, _fn, _ptr
from ._x8_simd import _need, vector_store
from .base import specialize

FEATURES = ("avx512f", "avx512bw", "avx512vl", "avx512vnni")
LANES = 16
_V64B = ir.VectorType(ir.IntType(8), 64)


@njit(nogil=True, cache=True)
def tokens_in_lanes(xq, dx, xt, dxt):
    """xq int8 (T, K), dx float32 (T, K/256) -> xt, dxt (module docstring; flat 1-D)."""
    n_t, k = xq.shape
    nb = k // 256
    n_u = (n_t + LANES - 1) // LANES
    x32 = xt.view(np.int32)                     # (n_u, nb, 64, 16) 4-byte groups
    for u in range(n_u):
        for i in range(LANES):
            t = u * LANES + i
            if t < n_t:
                row = xq[t]
                for b in range(nb):
                    base = (u * nb + b) * 64 * LANES + i
                    for q in range(64):
                        o = 256 * b + 4 * q
                        v = (np.int32(np.uint8(row[o])) | (np.int32(np.uint8(row[o + 1])) << 8)
                             | (np.int32(np.uint8(row[o + 2])) << 16)
                             | (np.int32(np.uint8(row[o + 3])) << 24))
                        x32[base + q * LANES] = v ^ np.int32(-2139062144)   # 0x80808080: + 128
                    dxt[(u * nb + b) * LANES + i] = dx[t, b]
            else:
                for b in range(nb):
                    base = (u * nb + b) * 64 * LANES + i
                    for q in range(64):
                        x32[base + q * LANES] = np.int32(-2139062144)
                    dxt[(u * nb + b) * LANES + i] = 0.0


def _tile(rows: int, rec: bool = False):
    """The step of `rows` rows over one block b of one 16-token tile u:
    f(accs, wb, sc, cr, fr, xt, dxt, b, u, k, r0) -> accs (a tuple of `rows` f32x16: row
    r0 + r's 16 tokens in accs[r]). wb holds row i's weights 4q..4q + 3 of block b at
    i * K + 256 b + 4 q, or with `rec` (one 8-row group, quads side by side as in the record
    types) at 2048 b + 32 q + 4 i."""
    qs = 32 if rec else 4                       # bytes from one quad of a row to the next

    def impl(typingctx, accs, wb, sc, cr, fr, xt, dxt, b, u, k, r0):
        _need("wb", wb, types.int8), _need("sc", sc, types.int32), _need("cr", cr, types.int32)
        _need("fr", fr, types.float32), _need("xt", xt, types.uint8)
        _need("dxt", dxt, types.float32)
        tup = types.UniTuple(f32x16, rows)
        sig = tup(tup, wb, sc, cr, fr, xt, dxt, b, u, k, r0)

        def codegen(context, builder, sig, args):
            accs_v, wb_v, sc_v, cr_v, fr_v, xt_v, dxt_v = args[:7]
            b_v, u_v, k_v, r0_v = (context.cast(builder, v, t, types.intp)
                                   for v, t in zip(args[7:], sig.args[7:]))
            c = lambda n: ir.Constant(b_v.type, n)      # noqa: E731
            nb = builder.sdiv(k_v, c(256))
            ub = builder.add(builder.mul(u_v, nb), b_v)     # this tile's block
            xp = _ptr(context, builder, sig.args[5], xt_v, builder.mul(ub, c(64 * LANES * 4)))
            dx = builder.load(builder.bitcast(
                _ptr(context, builder, sig.args[6], dxt_v, builder.mul(ub, c(LANES))),
                _V16F.as_pointer()), align=4)
            i8p = ir.IntType(8).as_pointer()
            wps, sps, fo = [], [], []
            for r in range(rows):
                ri = builder.add(r0_v, c(r))
                wo = (builder.add(builder.mul(b_v, c(2048)), builder.mul(ri, c(4))) if rec else
                      builder.add(builder.mul(ri, k_v), builder.mul(b_v, c(256))))
                wps.append(builder.bitcast(_ptr(context, builder, sig.args[1], wb_v, wo), i8p))
                so = builder.add(builder.mul(ri, builder.sdiv(k_v, c(16))),
                                 builder.mul(b_v, c(16)))
                sps.append(builder.bitcast(_ptr(context, builder, sig.args[2], sc_v, so), i8p))
                fo.append(builder.add(builder.mul(ri, nb), b_v))
            isum = [None] * rows
            for s in range(16):                 # 16 weights: 4 vpdpbusd per row
                isum = _step_fence(builder, isum)   # else LLVM hoists all 16 and spills
                d = [None] * rows
                for q in range(4 * s, 4 * s + 4):
                    x = builder.load(builder.bitcast(builder.gep(xp, [ir.Constant(_I32, 64 * q)]),
                                                     _V64B.as_pointer()), align=1)
                    for r in range(rows):
                        d[r] = _dpbusd(builder, d[r], x, _bcast(builder, wps[r], qs * q))
                for r in range(rows):
                    part = builder.mul(d[r], _bcast(builder, sps[r], 4 * s))
                    isum[r] = part if isum[r] is None else builder.add(isum[r], part)
            out = []
            for r in range(rows):
                corr = builder.load(_ptr(context, builder, sig.args[3], cr_v, fo[r]))
                v = builder.insert_element(ir.Constant(_V16D, ir.Undefined), corr,
                                           ir.Constant(_I32, 0))
                v = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, 16), [0] * 16))
                total = builder.sub(isum[r], v)
                f = builder.load(_ptr(context, builder, sig.args[4], fr_v, fo[r]))
                scale = builder.fmul(_splat_f(builder, f), dx)
                out.append(_fma(builder, builder.sitofp(total, _V16F), scale,
                                builder.extract_value(accs_v, r)))
            return context.make_tuple(builder, sig.return_type, out)

        return sig, codegen

    return intrinsic(impl)


@intrinsic
def scaled_wsum(typingctx, w, s0, s1):
    """int32 s0 * sum(w[0:16]) + s1 * sum(w[16:32]) of the 32 signed weights of w."""
    sig = types.int32(i8x32, s0, s1)

    def codegen(context, builder, sig, args):
        v32 = ir.VectorType(_I32, 32)
        wv = builder.sext(_psign(builder, _half(builder, args[0], 0), _half(builder, args[0], 1)),
                          v32)
        sv = ir.Constant(v32, ir.Undefined)
        for i, (a, t) in enumerate(zip(args[1:], sig.args[1:])):
            sv = builder.insert_element(sv, builder.trunc(context.cast(builder, a, t, types.int64),
                                                          _I32), ir.Constant(_I32, i))
        sv = builder.shuffle_vector(sv, sv, ir.Constant(v32, [0] * 16 + [1] * 16))
        red = _fn(builder, "llvm.vector.reduce.add.v32i32", _I32, [v32])
        return builder.call(red, [builder.mul(wv, sv)])

    return sig, codegen


ROWS = 4


def _four_rows_t(wb, sc, cr, fr, xt, dxt, k, n_t, ri, out, r, a0, e0, lanes):
    # scratch rows ri..ri + 3 against every token, one 16-token tile at a time (two tiles
    # sharing each weight broadcast keep more values live than there are registers); row
    # ri + i's results to out[:, r + i] where a0 <= r + i < e0; template constant TILE: the
    # 4-row step of one scratch layout
    nb = k // 256
    for u in range((n_t + LANES - 1) // LANES):
        a = (vzero16(), vzero16(), vzero16(), vzero16())
        for b in range(nb):
            a = TILE(a, wb, sc, cr, fr, xt, dxt, b, u, k, ri)  # noqa: F821
        for i in range(ROWS):
            put16(a[i], lanes, out, u, r + i, a0, e0)


store16 = vector_store(f32x16, types.float32, _V16F, align=4)


@njit(nogil=True, cache=True, inline="always")
def put16(acc, lanes, out, u, r, a0, e0):
    """out[t, r] = token t's lane of acc for the tokens of tile u, if a0 <= r < e0."""
    if a0 <= r < e0:
        store16(acc, lanes, 0)
        for t in range(u * LANES, min(out.shape[0], u * LANES + LANES)):
            out[t, r] = lanes[t - u * LANES]


four_rows = specialize(_four_rows_t, "t16_four_rows", TILE=_tile(ROWS))
four_rows_rec = specialize(_four_rows_t, "t16_four_rows_rec", TILE=_tile(ROWS, rec=True))
tile1 = _tile(1)


# Templates, specialized per type by `_iq_common.IQUnit` (TS, QK, SUB, PREP, SCALE as there).

def _decode_rows_t(qf, o, rb, nb, ib, wb, sc, cr, fr, n):
    # rows at byte o, o + rb, ... (n of them) of the flat GGUF rows qf -> row i of wb, sc, cr, fr
    k = nb * QK  # noqa: F821 (template constant)
    for i in range(n):
        for b in range(nb):
            ob = o + i * rb + b * TS  # noqa: F821
            PREP(qf, ob, ib)  # noqa: F821
            so = i * nb * 16 + b * 16
            corr = np.int32(0)
            for j in range(8):
                w, s0, s1 = SUB(qf, ob, j, ib)  # noqa: F821
                store_w(w, wb, i * k + b * QK + 32 * j)  # noqa: F821
                sc[so + 2 * j] = s0
                sc[so + 2 * j + 1] = s1
                corr += scaled_wsum(w, s0, s1)
            cr[i * nb + b] = corr * np.int32(128)
            fr[i * nb + b] = SCALE(qf, ob)  # noqa: F821


def _matmul_t16_t(q, xq, dx, xb, out, r0, r1, pf=0):
    # arrays as _iq_common._matmul_t's; template constants also DECODE (_decode_rows_t)
    n_t, nb = dx.shape
    k = nb * QK  # noqa: F821 (template constant)
    qf = q.reshape(-1)
    rb = q.shape[1]
    n_u = (n_t + LANES - 1) // LANES
    xt = np.empty(n_u * nb * 64 * LANES * 4, np.uint8)     # tokens in lanes (module docstring)
    dxt = np.empty(n_u * nb * LANES, np.float32)
    tokens_in_lanes(xq, dx, xt, dxt)
    ib = np.empty(64, np.int32)                # (64,) one block's grid indices (PREP)
    wb = np.empty(ROWS * k, np.int8)           # (ROWS, K) decoded weights
    sc = np.empty(ROWS * nb * 16, np.int32)    # (ROWS, K/16) their scales
    cr = np.empty(ROWS * nb, np.int32)         # (ROWS, nb) 128 * sum(scale * w) per block
    fr = np.empty(ROWS * nb, np.float32)       # (ROWS, nb) block factors
    lanes = np.empty(LANES, np.float32)        # (16,) one row's tokens of a tile
    r = r0
    while r + ROWS <= r1:
        DECODE(qf, r * rb, rb, nb, ib, wb, sc, cr, fr, ROWS)  # noqa: F821
        four_rows(wb, sc, cr, fr, xt, dxt, k, n_t, 0, out, r, r, r + ROWS, lanes)
        r += ROWS
    while r < r1:
        DECODE(qf, r * rb, rb, nb, ib, wb, sc, cr, fr, 1)  # noqa: F821
        for u in range(n_u):
            a1 = (vzero16(),)
            for b in range(nb):
                a1 = tile1(a1, wb, sc, cr, fr, xt, dxt, b, u, k, 0)
            put16(a1[0], lanes, out, u, r, r, r + 1)
        r += 1
