"""Q6_K's token tiles (variant avx512-t16 of `kquant_x8.Q6_K`): the IQ types' tiles
(`_iq_tile`: 16 tokens in a zmm's lanes, each 4 weights of a row one broadcast operand of a
vpdpbusd) on Q6_K's 8-row records.

A record step (16 weights of 8 rows, `kquant_x8._pack_q6_k`) already holds each row's codes 4
at a time side by side: decoding one group's records is the decode step's unpacking
(`_kx8_simd.q6_codes`) minus 32, stored as it comes, so the tile reads the weights in the
record order (`_iq_tile._tile(rows, rec=True)`). Per block the row's 128 * sum(scale * w) comes
from the same registers (one vpdpbusd against ones per chunk), the scales and d from the record.
w = d * scale * (u - 32) exactly as the decode kernels take it; the float order is the tile's
own (one exact int32 sum per block and row), so calibration picks it per size by time alone.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from ._iq_simd import i32x8, izero
from ._iq_tile import LANES, four_rows_rec, tokens_in_lanes
from ._kx8_simd import q6_codes
from ._simd import _I32, _V8D, _V32B, _ptr, dpbusd
from ._x8_simd import _at, _need, vector_store
from .interleaved import GROUP, f16_at

FEATURES = ("avx512f", "avx512bw", "avx512vl", "avx512vnni")
REC = GROUP * 210


@intrinsic
def q6_step(typingctx, acc, q, o, t, wb, wo):
    """Step t of the Q6_K record at q[o:]: its 4 chunks of weights u - 32 (8 rows x 4 each) to
    wb[wo + 128 t:], and acc + per row scale_t * (the sum of its 16 weights)."""
    _need("q", q, types.uint8), _need("wb", wb, types.int8)
    sig = i32x8(i32x8, q, o, t, wb, wo)

    def codegen(context, builder, sig, args):
        acc_v, q_v, o_v, t_v, wb_v, wo_v = args
        o_v, t_v, wo_v = (context.cast(builder, v, ty, types.intp) for v, ty in
                          ((o_v, sig.args[2]), (t_v, sig.args[3]), (wo_v, sig.args[5])))
        c = lambda n: ir.Constant(o_v.type, n)      # noqa: E731
        step = _ptr(context, builder, sig.args[1], q_v,
                    builder.add(o_v, builder.add(c(144), builder.mul(t_v, c(96)))))
        dst = _ptr(context, builder, sig.args[4], wb_v,
                   builder.add(wo_v, builder.mul(t_v, c(128))))
        ones = ir.Constant(_V32B, [1] * 32)
        sums = None
        for j, u in enumerate(q6_codes(builder, lambda off: _at(builder, step, off, _V32B), 32)):
            w = builder.sub(u, ir.Constant(_V32B, [32] * 32))
            p = builder.gep(dst, [ir.Constant(_I32, 32 * j)])
            builder.store(w, builder.bitcast(p, _V32B.as_pointer()), align=1)
            sums = dpbusd(builder, sums, ones, w)
        # the rows' scales of sub-block t: byte 16 + 16 (t // 2) + 2 i + t % 2 of the record
        pairs = _ptr(context, builder, sig.args[1], q_v,
                     builder.add(o_v, builder.add(c(16), builder.mul(builder.sdiv(t_v, c(2)),
                                                                     c(16)))))
        v16 = builder.load(builder.bitcast(pairs, ir.VectorType(ir.IntType(8), 16).as_pointer()),
                           align=1)
        odd = builder.icmp_signed("!=", builder.srem(t_v, c(2)), c(0))
        even_sc = builder.shuffle_vector(v16, v16, ir.Constant(ir.VectorType(_I32, 8),
                                                               list(range(0, 16, 2))))
        odd_sc = builder.shuffle_vector(v16, v16, ir.Constant(ir.VectorType(_I32, 8),
                                                              list(range(1, 16, 2))))
        sc = builder.sext(builder.select(odd, odd_sc, even_sc), _V8D)
        return builder.add(acc_v, builder.mul(sums, sc))

    return sig, codegen


store_i32x8 = vector_store(i32x8, types.int32, _V8D)


@njit(nogil=True, cache=True)
def decode_group(qf, o, nb, wb, sc, cr, fr, sums):
    """One group's records (nb of them at qf[o:]) -> the tile's scratch: wb int8 (nb, 64, 8, 4),
    sc int32 (8, K/16) scales, cr int32 (8, nb) 128 * sum(scale * w), fr float32 (8, nb) d."""
    for b in range(nb):
        ob = o + b * REC
        acc = izero()
        for t in range(16):
            acc = q6_step(acc, qf, ob, t, wb, b * 2048)
        store_i32x8(acc, sums, 0)
        for i in range(GROUP):
            cr[i * nb + b] = sums[i] * np.int32(128)
            fr[i * nb + b] = f16_at(qf, ob + 2 * i)
            for t in range(16):
                v = np.int32(qf[ob + 16 + 16 * (t // 2) + 2 * i + t % 2])
                sc[i * nb * 16 + b * 16 + t] = v - 256 if v > 127 else v


@njit(nogil=True, cache=True)
def matmul_t16(q, xq, dx, xb, out, r0, r1, pf=0):
    """Rows [r0, r1) of out (T, N) = x (xq int8 (T, K) codes, dx float32 (T, K/256) scales; xb
    unused) times the Q6_K records q uint8 (G, nb * REC)."""
    n_t, nb = dx.shape
    k = nb * 256
    qf = q.reshape(-1)
    rs = q.shape[1]
    n_u = (n_t + LANES - 1) // LANES
    xt = np.empty(n_u * nb * 64 * LANES * 4, np.uint8)     # tokens in lanes (`_iq_tile`)
    dxt = np.empty(n_u * nb * LANES, np.float32)
    tokens_in_lanes(xq, dx, xt, dxt)
    wb = np.empty(nb * 2048, np.int8)          # (nb, 64, 8, 4) one group's weights
    sc = np.empty(GROUP * nb * 16, np.int32)   # (8, K/16) their scales
    cr = np.empty(GROUP * nb, np.int32)        # (8, nb) 128 * sum(scale * w) per block
    fr = np.empty(GROUP * nb, np.float32)      # (8, nb) d
    sums = np.empty(GROUP, np.int32)
    lanes = np.empty(LANES, np.float32)        # (16,) one row's tokens of a tile
    for g in range(r0 // GROUP, (r1 + GROUP - 1) // GROUP):
        decode_group(qf, g * rs, nb, wb, sc, cr, fr, sums)
        for h in range(0, GROUP, 4):
            if max(r0, g * GROUP + h) < min(r1, g * GROUP + h + 4):
                four_rows_rec(wb, sc, cr, fr, xt, dxt, k, n_t, h, out, g * GROUP + h, r0, r1,
                              lanes)
