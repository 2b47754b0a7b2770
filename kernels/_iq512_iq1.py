"""IQ1_S / IQ1_M steps of the avx512-iq variant: block state in registers, one gather per step.

The 2048-entry grid (8 bytes of 8g, g in -1, 0, 1; `_iq_grids.IQ1S_U64`) is too big for
registers, so each step gathers its 8 entries (vpgatherdq) with indices computed for the whole
block in vector registers (`iq1*_block`: the low 8 bits from qs, the high 3 shifted out of qh per
lane), never through memory. (Measured on AMD Zen 5: the gathers cost about half the step; the
same entries by scalar loads of stored indices, or their 16-bit codes by vpgatherdd 16 at a
time, were no faster.) The +-1 delta (per sub-block for IQ1_S, per group of 8 for IQ1_M)
is a byte vector of the block (0 or -1 per sub-block or group) that each step spreads over its
64 bytes (vpermb) and ORs with 1; the scales become word lanes once per block and one vpermw
per step. The step's weights w = 8g +- 1 then give the w64 pair (vpabsb, vpmovb2m).
"""
from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.extending import intrinsic, models, register_model

from ._iq512_lut import _c8, _c16, _permb, _permw, _splat8, _splat16
from ._iq512_simd import (_I64, _V16D, _V32W, _V64B, _gather, _i64, _idx, _load, _signed, i16x32,
                          w64)
from ._simd import _I8, _I16
from ._x8_simd import _need

_BLK1 = ir.LiteralStructType([_V16D, _V16D, _V64B, _V32W])   # indices 0..15, 16..31, delta, scales


class Blk1Type(types.Type):
    def __init__(self):
        super().__init__(name="iq1_blk")


blk1 = Blk1Type()


@register_model(Blk1Type)
class _Blk1Model(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _BLK1)


def _at(context, builder, aryty, ary, o, off, vty):
    return _load(context, builder, aryty, ary, builder.add(o, ir.Constant(_I64, off)), vty)


def _lanes(builder, v, picks, vty):
    """A vector of type vty whose lane i is lane picks[i] of v, zero-extended."""
    s = builder.shuffle_vector(v, v, _idx(picks))
    return builder.zext(s, vty)


def _indices(builder, qs, hi_src, hi_picks, hi_shifts):
    """Two <16 x i32>: qs[e] | ((hi_src[hi_picks[e]] >> hi_shifts[e]) & 7) << 8, e = 0..31."""
    out = []
    for h in range(2):
        e = range(16 * h, 16 * h + 16)
        lo = _lanes(builder, qs, list(e), _V16D)
        hi = _lanes(builder, hi_src, [hi_picks[i] for i in e], _V16D)
        hi = builder.lshr(hi, ir.Constant(_V16D, [hi_shifts[i] for i in e]))
        hi = builder.shl(builder.and_(hi, ir.Constant(_V16D, [7] * 16)),
                         ir.Constant(_V16D, [8] * 16))
        out.append(builder.or_(lo, hi))
    return out


def _pad64(builder, v):
    n = v.type.count
    return builder.shuffle_vector(v, ir.Constant(v.type, [0] * n),
                                  _idx(list(range(n)) + [n] * (64 - n)))


def _pad32w(builder, v):
    n = v.type.count
    return builder.shuffle_vector(v, ir.Constant(v.type, [0] * n),
                                  _idx(list(range(n)) + [n] * (32 - n)))


def _state(builder, vals):
    st = ir.Constant(_BLK1, ir.Undefined)
    for i, v in enumerate(vals):
        st = builder.insert_value(st, v, i)
    return st


@intrinsic
def iq1s_block(typingctx, q, o):
    """The block state of the IQ1_S block at byte o of q."""
    _need("q", q, types.uint8)
    sig = blk1(q, o)

    def codegen(context, builder, sig, args):
        o64 = _i64(context, builder, args[1], sig.args[1])
        qs = _at(context, builder, sig.args[0], args[0], o64, 2, ir.VectorType(_I8, 32))
        qh = _at(context, builder, sig.args[0], args[0], o64, 34, ir.VectorType(_I16, 8))
        idx = _indices(builder, qs, qh, [e // 4 for e in range(32)],
                       [3 * (e % 4) for e in range(32)])
        v8 = ir.VectorType(_I16, 8)
        neg = builder.ashr(qh, ir.Constant(v8, [15] * 8))        # sub-block j: words j = 0 / -1
        delta = _pad64(builder, builder.bitcast(neg, ir.VectorType(_I8, 16)))
        s = builder.and_(builder.lshr(qh, ir.Constant(v8, [12] * 8)), ir.Constant(v8, [7] * 8))
        s = builder.or_(builder.shl(s, ir.Constant(v8, [1] * 8)), ir.Constant(v8, [1] * 8))
        return _state(builder, idx + [delta, _pad32w(builder, s)])

    return sig, codegen


@intrinsic
def iq1m_block(typingctx, q, o):
    """The block state of the IQ1_M block at byte o of q."""
    _need("q", q, types.uint8)
    sig = blk1(q, o)

    def codegen(context, builder, sig, args):
        o64 = _i64(context, builder, args[1], sig.args[1])
        qs = _at(context, builder, sig.args[0], args[0], o64, 0, ir.VectorType(_I8, 32))
        qh = _at(context, builder, sig.args[0], args[0], o64, 32, ir.VectorType(_I8, 16))
        idx = _indices(builder, qs, qh, [e // 2 for e in range(32)],
                       [4 * (e % 2) for e in range(32)])
        v32 = ir.VectorType(_I8, 32)
        nib = builder.shuffle_vector(qh, qh, _idx([e // 2 for e in range(32)]))
        bit = builder.and_(nib, ir.Constant(v32, [8 << (4 * (e % 2)) for e in range(32)]))
        neg = builder.sext(builder.icmp_unsigned("!=", bit, ir.Constant(v32, [0] * 32)), v32)
        sc = _at(context, builder, sig.args[0], args[0], o64, 48, ir.VectorType(_I16, 4))
        v16 = ir.VectorType(_I16, 16)
        s = builder.shuffle_vector(sc, sc, _idx([i // 4 for i in range(16)]))
        s = builder.and_(builder.lshr(s, ir.Constant(v16, [3 * (i % 4) for i in range(16)])),
                         ir.Constant(v16, [7] * 16))
        s = builder.or_(builder.shl(s, ir.Constant(v16, [1] * 16)), ir.Constant(v16, [1] * 16))
        return _state(builder, idx + [_pad64(builder, neg), _pad32w(builder, s)])

    return sig, codegen


def _step_impl(per_group: bool):
    def impl(typingctx, st, p, grid):
        """(w64, scale words) of weights 64p..64p + 63 of an IQ1 block state (grid: IQ1S_U64)."""
        _need("grid", grid, types.uint64)
        sig = types.Tuple((w64, i16x32))(blk1, p, grid)

        def codegen(context, builder, sig, args):
            st, pv = args[0], _i64(context, builder, args[1], sig.args[1])
            half = builder.select(builder.icmp_signed(">=", pv, ir.Constant(_I64, 2)),
                                  builder.extract_value(st, 1), builder.extract_value(st, 0))
            idx = builder.select(
                builder.icmp_unsigned("!=", builder.and_(pv, ir.Constant(_I64, 1)),
                                      ir.Constant(_I64, 0)),
                builder.shuffle_vector(half, half, _idx(range(8, 16))),
                builder.shuffle_vector(half, half, _idx(range(8))))
            g = _gather(builder, context, sig.args[2], args[2], idx, 8)
            p8 = builder.trunc(pv, _I8)
            if per_group:       # byte m: group 8p + m // 8
                ctl = builder.add(_c8([m // 8 for m in range(64)]),
                                  _splat8(builder, builder.mul(p8, ir.Constant(_I8, 8))))
            else:               # byte m: sub-block 2p + m // 32 (its word's low byte)
                ctl = builder.add(_c8([2 * (m // 32) for m in range(64)]),
                                  _splat8(builder, builder.mul(p8, ir.Constant(_I8, 4))))
            d = builder.or_(_permb(builder, builder.extract_value(st, 2), ctl), _c8([1] * 64))
            w = builder.add(g, d)
            p16 = builder.trunc(pv, _I16)
            if per_group:       # words 8h..8h + 7: scale 4p + h
                sctl = builder.add(_c16([w // 8 for w in range(32)]),
                                   _splat16(builder, builder.mul(p16, ir.Constant(_I16, 4))))
            else:               # words 0..15: sub-block 2p, 16..31: 2p + 1
                sctl = builder.add(_c16([w // 16 for w in range(32)]),
                                   _splat16(builder, builder.mul(p16, ir.Constant(_I16, 2))))
            sc = _permw(builder, builder.extract_value(st, 3), sctl)
            return context.make_tuple(builder, sig.return_type, [_signed(builder, w), sc])

        return sig, codegen

    return intrinsic(impl)


iq1s_step = _step_impl(False)
iq1m_step = _step_impl(True)
