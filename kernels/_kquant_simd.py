"""AVX2 super-block dot products for Q4_K and Q6_K decode, as Numba intrinsics.

Plain Numba loops over the packed quants vectorize only at 128 bits with a horizontal reduction
per sub-block (~3-6 GB/s); these emit LLVM vector IR around vpmaddubsw/vpmaddwd (llama.cpp's
scheme) for one whole 256-weight super-block and return its exact int32 sum, so the calling
kernel stays ordinary Numba and gives bit-identical results to the plain variant. They are only
compiled where `has_avx2()` holds; the units fall back to the plain kernels elsewhere.

Bounds (no int16 saturation, no int32 overflow): x codes are in [-127, 127]. Q4_K: pair sums
<= 2*15*127, times a 6-bit scale. Q6_K: unsigned codes 0..63 go through vpmaddubsw,
pair sums <= 2*63*127, times an int8 scale; the offset is taken off once per block as
32 * sum_s sc_s * sum(xq_s) from the int16 per-16 sums of xq (|sum| <= 16*127).
"""
from __future__ import annotations

import functools

import llvmlite.binding as llvm
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.core.errors import TypingError
from numba.extending import intrinsic

_I8, _I16, _I32 = ir.IntType(8), ir.IntType(16), ir.IntType(32)
_V32B = ir.VectorType(_I8, 32)
_V16W = ir.VectorType(_I16, 16)
_V8D = ir.VectorType(_I32, 8)


@functools.lru_cache(maxsize=None)
def has_avx2() -> bool:
    feats = llvm.get_host_cpu_features()
    return all(feats.get(f, False) for f in ("avx2", "fma"))


def _need(name, aryty, dtype):
    """The intrinsics read raw pointers: insist on a C-contiguous 1-D array of `dtype`."""
    if not (isinstance(aryty, types.Array) and aryty.ndim == 1 and aryty.layout == "C"
            and aryty.dtype == dtype):
        raise TypingError(f"{name} must be a C-contiguous 1-D {dtype} array, got {aryty}")


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


def _load_scales(builder, sp, n, signed):
    """<n x i16> of the n bytes at sp, widened once per block (one load + vpmovsx/zxbw)."""
    v = builder.load(builder.bitcast(sp, ir.VectorType(_I8, n).as_pointer()), align=1)
    return (builder.sext if signed else builder.zext)(v, ir.VectorType(_I16, n))


def _pick(builder, v, lanes):
    """<16 x i16> whose lane i is lane lanes[i] of v (a shuffle, no memory traffic)."""
    return builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, 16), list(lanes)))


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
    _need("qs", qs, types.uint8), _need("xq", xq, types.int8), _need("sc", sc, types.uint8)
    sig = types.int32(qs, qoff, xq, xoff, sc, soff)

    def codegen(context, builder, sig, args):
        qp = _ptr(context, builder, sig.args[0], args[0], args[1])
        xp = _ptr(context, builder, sig.args[2], args[2], args[3])
        sp = _ptr(context, builder, sig.args[4], args[4], args[5])
        mub, mwd = _maddubs(builder), _maddwd(builder)
        scales = _load_scales(builder, sp, 8, signed=False)
        acc = ir.Constant(_V8D, [0] * 8)
        for p in range(4):  # 32 bytes = sub-blocks 2p (low nibbles) and 2p + 1 (high nibbles)
            q = _load32(builder, qp, 32 * p)
            lo = builder.and_(q, _splat8(15))
            hi = builder.lshr(q, _splat8(4))
            d0 = builder.call(mub, [lo, _load32(builder, xp, 64 * p)])
            d1 = builder.call(mub, [hi, _load32(builder, xp, 64 * p + 32)])
            for d, j in ((d0, 2 * p), (d1, 2 * p + 1)):
                acc = builder.add(acc, builder.call(mwd, [d, _pick(builder, scales, [j] * 16)]))
        return _hsum(builder, acc)

    return sig, codegen


@intrinsic
def q6k_isum(typingctx, qs, qoff, xq, xoff, sc, soff, xb, boff):
    """sum_s sc[soff + s] * ((q_s - 32) . xq_s) over one Q6_K super-block, s = 0..15.

    qs: uint8 row, qoff: byte offset of the block (ql at +0, qh at +128); xq, xoff as in q4k_isum;
    sc: int8 scales, soff: index of the block's first; xb: int16 sums of xq per 16, boff: index
    of the block's first.
    """
    _need("qs", qs, types.uint8), _need("xq", xq, types.int8), _need("sc", sc, types.int8)
    _need("xb", xb, types.int16)
    sig = types.int32(qs, qoff, xq, xoff, sc, soff, xb, boff)

    def codegen(context, builder, sig, args):
        qp = _ptr(context, builder, sig.args[0], args[0], args[1])
        xp = _ptr(context, builder, sig.args[2], args[2], args[3])
        sp = _ptr(context, builder, sig.args[4], args[4], args[5])
        mub, mwd = _maddubs(builder), _maddwd(builder)
        scales = _load_scales(builder, sp, 16, signed=True)
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
                s0 = 8 * h + 2 * g  # first of the two 16-weight sub-blocks of this group
                sc = _pick(builder, scales, [s0] * 8 + [s0 + 1] * 8)
                acc = builder.add(acc, builder.call(mwd, [dq, sc]))
        # the -32 offset of every code: subtract 32 * sum_s sc_s * sum(xq over sub-block s)
        bp = _ptr(context, builder, sig.args[6], args[6], args[7])
        bsums = builder.load(builder.bitcast(bp, _V16W.as_pointer()), align=1)
        off = builder.shl(builder.call(mwd, [scales, bsums]), ir.Constant(_V8D, [5] * 8))
        return _hsum(builder, builder.sub(acc, off))

    return sig, codegen


@intrinsic
def q4k_msum(typingctx, mn, moff, xb, boff):
    """sum_j mn[moff + j] * (xb[boff + 2j] + xb[boff + 2j + 1]), j = 0..7: a Q4_K block's mins
    times the sums of xq over its 32-weight sub-blocks (xb: int16 sums of xq per 16)."""
    _need("mn", mn, types.uint8), _need("xb", xb, types.int16)
    sig = types.int32(mn, moff, xb, boff)

    def codegen(context, builder, sig, args):
        mins = _load_scales(builder, _ptr(context, builder, sig.args[0], args[0], args[1]), 8,
                            signed=False)
        bp = _ptr(context, builder, sig.args[2], args[2], args[3])
        bsums = builder.load(builder.bitcast(bp, _V16W.as_pointer()), align=1)
        m2 = _pick(builder, mins, [i // 2 for i in range(16)])
        return _hsum(builder, builder.call(_maddwd(builder), [m2, bsums]))

    return sig, codegen
