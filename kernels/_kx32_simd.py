"""AVX-512 token-tile steps over four groups of rows (32 rows, two zmm registers) for the
32-weight block types, Q4_0 and Q8_0: the 4-token tiles of the avx512vnni-x16 variant.

A 16-row step (`_kx16_simd`) spends one broadcast load of activation bytes on every vpdpbusd
({1to16} from memory): with the weight loads that is more than one load per vpdpbusd, and a
loop of vpdpbusd fed so ran at ~5.3 G/s on AMD Zen 5 where the unit does ~8.6. Here each
broadcast feeds the same chunk of two zmm of weights (groups g, g + 1 and g + 2, g + 3): ~7.5 G/s
in the same loop (benchmarks/results). Four tokens keep 8 float and 8 integer accumulators
and the current chunk's 4 weight vectors within the 32 zmm registers (8 tokens would spill).

Each lane does what the 8-row VNNI step does for its row: the integer sums are exact whatever
the order of the vpdpbusd, then the same float ops in the same order, so results are
bit-identical to it (and to the 16-row steps).
"""
from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from ._kx16_simd import (_V64B, _at2, _bcast, _block32_token, _dpbusd, _less_xsum, _scaled16,
                         _splat, _step_fence, f32x16)
from ._simd import _V32B, _ptr, prefetch
from ._x8_simd import _need

TOKENS = 4


def _q4_0(builder, accs, wps, xps, dxs, xss):
    """_kx16_simd._q4_0 on two pairs of records (wps: four group addresses), each activation
    broadcast shared by both; accs[2i + v]: token i's rows of pair v."""
    low, four = _splat(_V64B, 0x0F), _splat(_V64B, 4)
    n = len(xps)
    sums = [None] * (2 * n)
    _step_fence(builder, [])
    for c in range(4):
        nib = []
        for v in range(2):
            q = _at2(builder, wps[2 * v:2 * v + 2], 16 + 32 * c, _V32B)
            nib.append((builder.and_(q, low), builder.and_(builder.lshr(q, four), low)))
        for i in range(n):
            lo, hi = _bcast(builder, xps[i], 4 * c), _bcast(builder, xps[i], 16 + 4 * c)
            for v in range(2):
                s = _dpbusd(builder, sums[2 * i + v], nib[v][0], lo)
                sums[2 * i + v] = _dpbusd(builder, s, nib[v][1], hi)
    return [_scaled16(builder, accs[2 * i + v], _less_xsum(builder, sums[2 * i + v], xss[i], 3),
                      wps[2 * v:2 * v + 2], dxs[i]) for i in range(n) for v in range(2)]


def _q8_0(builder, accs, wps, xps, dxs, xss):
    """_kx16_simd._q8_0 on two pairs of records, each broadcast shared by both."""
    bias = _splat(_V64B, 0x80)
    n = len(xps)
    sums = [None] * (2 * n)
    _step_fence(builder, [])
    for c in range(8):
        u = [builder.xor(_at2(builder, wps[2 * v:2 * v + 2], 16 + 32 * c, _V32B), bias)
             for v in range(2)]
        for i in range(n):
            x = _bcast(builder, xps[i], 4 * c)
            for v in range(2):
                sums[2 * i + v] = _dpbusd(builder, sums[2 * i + v], u[v], x)
    return [_scaled16(builder, accs[2 * i + v], _less_xsum(builder, sums[2 * i + v], xss[i], 7),
                      wps[2 * v:2 * v + 2], dxs[i]) for i in range(n) for v in range(2)]


def _quad(body, record_bytes, aux=types.int32, token=_block32_token):
    """The 4-token, four-group step of `body`: `f(accs, w, woff, rs, xq, xoff, xstride, dx, xb,
    b, bstride)` -> accs, a tuple of 8 f32x16 (token i's rows of groups at woff, woff + rs in
    accs[2i], of the groups at woff + 2 rs, woff + 3 rs in accs[2i + 1]); the token sides as in
    `_kx16_simd._wide`'s n-token steps."""

    def impl(typingctx, accs, w, woff, rs, xq, xoff, xstride, dx, xb, b, bstride):
        _need("w", w, types.uint8), _need("xq", xq, types.int8)
        _need("dx", dx, types.float32), _need("xb", xb, aux)
        tup = types.UniTuple(f32x16, 2 * TOKENS)
        sig = tup(tup, w, woff, rs, xq, xoff, xstride, dx, xb, b, bstride)

        def codegen(context, builder, sig, args):
            accs_v, w_v, o_v, rs_v, xq_v, xoff_v, xst_v, dx_v, xb_v, b_v, bst_v = args
            o_v, rs_v, xoff_v, xst_v, b_v, bst_v = (
                context.cast(builder, v, t, types.intp) for v, t in
                ((o_v, sig.args[2]), (rs_v, sig.args[3]), (xoff_v, sig.args[5]),
                 (xst_v, sig.args[6]), (b_v, sig.args[9]), (bst_v, sig.args[10])))
            offs = [builder.add(o_v, builder.mul(rs_v, ir.Constant(o_v.type, g))) for g in range(4)]
            wps = [_ptr(context, builder, sig.args[1], w_v, o) for o in offs]
            for wp in wps:      # 2 KB ahead, as the 16-row tiles (from DRAM: ~2x without)
                prefetch(builder, wp, record_bytes)
            toks = []
            for i in range(TOKENS):
                at = ir.Constant(xoff_v.type, i)
                toks.append(token(context, builder, (sig.args[4], sig.args[7], sig.args[8]),
                                  (xq_v, dx_v, xb_v), builder.add(xoff_v, builder.mul(xst_v, at)),
                                  builder.add(b_v, builder.mul(bst_v, at))))
            accs = [builder.extract_value(accs_v, i) for i in range(2 * TOKENS)]
            return context.make_tuple(builder, sig.return_type,
                                      body(builder, accs, wps, *zip(*toks)))

        return sig, codegen

    return intrinsic(impl)


kx32_q4_0 = _quad(_q4_0, 144)
kx32_q8_0 = _quad(_q8_0, 272)
