"""AVX2 super-block dot products for Q4_K and Q6_K decode, as Numba intrinsics.

Plain Numba loops over the packed quants vectorize only at 128 bits with a horizontal reduction
per sub-block (~3-6 GB/s); these emit LLVM vector IR around vpmaddubsw/vpmaddwd (llama.cpp's
scheme) for one whole 256-weight super-block and return its exact int32 sum, so the calling
kernel stays ordinary Numba and gives bit-identical results to the plain variant. They are only
compiled where `has_avx2()` holds; the units fall back to the plain kernels elsewhere.

Bounds (no int16 saturation, no int32 overflow): x codes are in [-127, 127]. Q4_K: pair sums
<= 2*15*127, times a 6-bit scale. Q6_K: (q - 32) is formed as pmaddubsw(q, x) - pmaddubsw(32, x),
each pair sum <= 2*63*127 + 2*32*127 = 24130 < 32767, times an int8 scale, 16 groups: < 2^31.
"""
from __future__ import annotations

import functools

import llvmlite.binding as llvm
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

_I8, _I16, _I32 = ir.IntType(8), ir.IntType(16), ir.IntType(32)
_V32B = ir.VectorType(_I8, 32)
_V16W = ir.VectorType(_I16, 16)
_V8D = ir.VectorType(_I32, 8)


@functools.lru_cache(maxsize=None)
def has_avx2() -> bool:
    feats = llvm.get_host_cpu_features()
    return all(feats.get(f, False) for f in ("avx2", "fma"))


def _fn(builder, name, ret, args):
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, args), name)


def _ptr(context, builder, aryty, ary, off):
    """i8* to element `off` of a C-contiguous 1-D byte array."""
    data = context.make_array(aryty)(context, builder, ary).data
    return builder.bitcast(builder.gep(data, [off]), _I8.as_pointer())


def _load32(builder, p, off):
    q = builder.gep(p, [ir.Constant(_I32, off)])
    return builder.load(builder.bitcast(q, _V32B.as_pointer()), align=1)


def _splat8(v):
    return ir.Constant(_V32B, [v] * 32)


def _scale_pair(builder, sp, off, signed):
    """<16 x i16>: byte sp[off] in lanes 0-7, sp[off + 1] in lanes 8-15."""
    ext = builder.sext if signed else builder.zext
    vec = ir.Constant(_V16W, ir.Undefined)
    for lane in range(16):
        byte = builder.load(builder.gep(sp, [ir.Constant(_I32, off + lane // 8)]))
        vec = builder.insert_element(vec, ext(byte, _I16), ir.Constant(_I32, lane))
    return vec


def _splat_scale(builder, sp, off):
    """<16 x i16> of the unsigned byte sp[off] in every lane."""
    w = builder.zext(builder.load(builder.gep(sp, [ir.Constant(_I32, off)])), _I16)
    vec = builder.insert_element(ir.Constant(_V16W, ir.Undefined), w, ir.Constant(_I32, 0))
    return builder.shuffle_vector(vec, vec, ir.Constant(ir.VectorType(_I32, 16), [0] * 16))


def _hsum(builder, v):
    """<8 x i32> -> i32, pairwise."""
    for n in (4, 2, 1):
        hi = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, 8),
                                                      [(i + n) % 8 for i in range(8)]))
        v = builder.add(v, hi)
    return builder.extract_element(v, ir.Constant(_I32, 0))


def _maddubs(builder):
    return _fn(builder, "llvm.x86.avx2.pmadd.ub.sw", _V16W, [_V32B, _V32B])


def _maddwd(builder):
    return _fn(builder, "llvm.x86.avx2.pmadd.wd", _V8D, [_V16W, _V16W])


@intrinsic
def q4k_isum(typingctx, qs, qoff, xq, xoff, sc, soff):
    """sum_j sc[soff + j] * (q_j . xq_j) over one Q4_K super-block, j = 0..7.

    qs: uint8 row, qoff: byte offset of the block's 128 quant bytes; xq: int8 codes, xoff: index
    of the block's first weight; sc: uint8 unpacked scales, soff: index of the block's first.
    """
    sig = types.int32(qs, qoff, xq, xoff, sc, soff)

    def codegen(context, builder, sig, args):
        qp = _ptr(context, builder, sig.args[0], args[0], args[1])
        xp = _ptr(context, builder, sig.args[2], args[2], args[3])
        sp = _ptr(context, builder, sig.args[4], args[4], args[5])
        mub, mwd = _maddubs(builder), _maddwd(builder)
        acc = ir.Constant(_V8D, [0] * 8)
        for p in range(4):  # 32 bytes = sub-blocks 2p (low nibbles) and 2p + 1 (high nibbles)
            q = _load32(builder, qp, 32 * p)
            lo = builder.and_(q, _splat8(15))
            hi = builder.lshr(q, _splat8(4))
            d0 = builder.call(mub, [lo, _load32(builder, xp, 64 * p)])
            d1 = builder.call(mub, [hi, _load32(builder, xp, 64 * p + 32)])
            acc = builder.add(acc, builder.call(mwd, [d0, _splat_scale(builder, sp, 2 * p)]))
            acc = builder.add(acc, builder.call(mwd, [d1, _splat_scale(builder, sp, 2 * p + 1)]))
        return _hsum(builder, acc)

    return sig, codegen


@intrinsic
def q6k_isum(typingctx, qs, qoff, xq, xoff, sc, soff):
    """sum_s sc[soff + s] * ((q_s - 32) . xq_s) over one Q6_K super-block, s = 0..15.

    qs: uint8 row, qoff: byte offset of the block (ql at +0, qh at +128); xq, xoff as in q4k_isum;
    sc: int8 scales, soff: index of the block's first.
    """
    sig = types.int32(qs, qoff, xq, xoff, sc, soff)

    def codegen(context, builder, sig, args):
        qp = _ptr(context, builder, sig.args[0], args[0], args[1])
        xp = _ptr(context, builder, sig.args[2], args[2], args[3])
        sp = _ptr(context, builder, sig.args[4], args[4], args[5])
        mub, mwd = _maddubs(builder), _maddwd(builder)
        acc = ir.Constant(_V8D, [0] * 8)
        for h in range(2):
            ql = (_load32(builder, qp, 64 * h), _load32(builder, qp, 64 * h + 32))
            qh = _load32(builder, qp, 128 + 32 * h)
            for g in range(4):  # weights 128h + 32g .. +31
                lo = ql[g % 2] if g < 2 else builder.lshr(ql[g % 2], _splat8(4))
                lo = builder.and_(lo, _splat8(15))
                hi = builder.and_(builder.shl(builder.lshr(qh, _splat8(2 * g)), _splat8(4)),
                                  _splat8(0x30))
                x = _load32(builder, xp, 128 * h + 32 * g)
                dq = builder.call(mub, [builder.or_(lo, hi), x])
                d32 = builder.call(mub, [_splat8(32), x])
                sc = _scale_pair(builder, sp, 8 * h + 2 * g, signed=True)
                acc = builder.add(acc, builder.call(mwd, [builder.sub(dq, d32), sc]))
        return _hsum(builder, acc)

    return sig, codegen
