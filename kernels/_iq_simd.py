"""AVX2 steps of the IQ kernels (iq1.py, iq2.py, iq3.py), as Numba intrinsics.

An IQ sub-block of 32 weights is 4 codebook entries of 8 values (IQ1, IQ2) or 8 of 4 (IQ3), each
with a sign pattern or a +-1 delta. The kernels decode it in registers into 32 signed int8
weights (times a per-type constant, so they are integers: IQ2 |w| <= 43, IQ3 <= 62, IQ1 8w in
-9..9), as llama.cpp's AVX2 code does: one scalar load per codebook entry (uint64 or uint32
tables, `_iq_grids`) inserted into a ymm register, the signs applied with vpsignb. Then the dot
with the int8 activations (Q8_K-style, one float scale per 256) is the usual |w| . sign(w) * x
pair: vpsignb, vpmaddubsw (pairs <= 2 * 62 * 127 = 15748 < 32767, no saturation), and vpmaddwd
with the sub-block's integer scales (one per 16 weights: low and high half of the register),
exact in int32: per 256 weights |sum| <= 256 * 62 * 127 * 31 < 2^27.

Types (Numba): `i8x32` (32 decoded weights, as a <64 x i8> pair: the magnitudes |w| in bytes
0..31, a vector with the signs of w (+-1 or w itself) in bytes 32..63, so the dot needs one
vpsignb, on x; the pair is two ymm registers) and `i32x8` (<8 x i32>, integer sums), both carried
in registers through the kernel loops.
"""
from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.extending import intrinsic, models, register_model

from ._simd import _I32, _V8D, _V8F, _V16W, _V32B, _fn, _ptr, f32x8
from ._x8_simd import _need, _splat_f

_I8 = ir.IntType(8)
_I16 = ir.IntType(16)
_I64 = ir.IntType(64)
_V4Q = ir.VectorType(_I64, 4)


class I8x32Type(types.Type):
    def __init__(self):
        super().__init__(name="i8x32")


class I32x8Type(types.Type):
    def __init__(self):
        super().__init__(name="i32x8")


i8x32 = I8x32Type()
i32x8 = I32x8Type()


_V64B = ir.VectorType(_I8, 64)


@register_model(I8x32Type)
class _I8x32Model(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _V64B)


def _pair(builder, mag, sgn):
    """<64 x i8>: mag (|w|) then sgn (a vector whose byte signs are w's)."""
    return builder.shuffle_vector(mag, sgn, ir.Constant(ir.VectorType(_I32, 64), list(range(64))))


def _half(builder, pair, k):
    return builder.shuffle_vector(pair, pair, ir.Constant(ir.VectorType(_I32, 32),
                                                          list(range(32 * k, 32 * k + 32))))


@register_model(I32x8Type)
class _I32x8Model(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _V8D)


def _psign(builder, a, b):
    return builder.call(_fn(builder, "llvm.x86.avx2.psign.b", _V32B, [_V32B, _V32B]), [a, b])


def _entries(context, builder, tabty, tab, idx_types, idxs, ety, n):
    """Vector of n table entries tab[idx] (each a scalar of LLVM type ety), as <32 x i8>."""
    vec = ir.Constant(ir.VectorType(ety, n), ir.Undefined)
    for k in range(n):
        i = context.cast(builder, idxs[k], idx_types[k], types.intp)
        p = _ptr(context, builder, tabty, tab, i)
        vec = builder.insert_element(vec, builder.load(p, align=1), ir.Constant(_I32, k))
    return builder.bitcast(vec, _V32B)


@intrinsic
def izero(typingctx):
    """<8 x i32> zero."""
    def codegen(context, builder, sig, args):
        return ir.Constant(_V8D, [0] * 8)

    return i32x8(), codegen


@intrinsic
def grid8_signed(typingctx, gtab, i0, i1, i2, i3, stab, s0, s1, s2, s3):
    """32 int8 weights: entries gtab[i0..i3] (uint64: 8 unsigned bytes each) with the signs of
    stab[s0..s3] (uint64: 8 bytes of +1 / -1), as a (magnitudes, signs) pair."""
    _need("gtab", gtab, types.uint64)
    _need("stab", stab, types.uint64)
    sig = i8x32(gtab, i0, i1, i2, i3, stab, s0, s1, s2, s3)

    def codegen(context, builder, sig, args):
        a = sig.args
        g = _entries(context, builder, a[0], args[0], a[1:5], args[1:5], _I64, 4)
        s = _entries(context, builder, a[5], args[5], a[6:10], args[6:10], _I64, 4)
        return _pair(builder, g, s)

    return sig, codegen


@intrinsic
def grid4_signed(typingctx, gtab, i0, i1, i2, i3, i4, i5, i6, i7, stab, s0, s1, s2, s3):
    """32 int8 weights: entries gtab[i0..i7] (uint32: 4 unsigned bytes each) with the signs of
    stab[s0..s3] (uint64: 8 bytes of +1 / -1, each covering two entries), as a pair."""
    _need("gtab", gtab, types.uint32)
    _need("stab", stab, types.uint64)
    sig = i8x32(gtab, i0, i1, i2, i3, i4, i5, i6, i7, stab, s0, s1, s2, s3)

    def codegen(context, builder, sig, args):
        a = sig.args
        g = _entries(context, builder, a[0], args[0], a[1:9], args[1:9], _I32, 8)
        s = _entries(context, builder, a[9], args[9], a[10:14], args[10:14], _I64, 4)
        return _pair(builder, g, s)

    return sig, codegen


@intrinsic
def grid8_plus(typingctx, gtab, i0, i1, i2, i3, a0, a1, a2, a3):
    """32 int8 weights: entries gtab[i0..i3] (uint64: 8 signed bytes each) plus, bytewise, the
    int64 scalars a0..a3 (each 8 bytes, e.g. all +1 or all -1), as a (|w|, w) pair."""
    _need("gtab", gtab, types.uint64)
    sig = i8x32(gtab, i0, i1, i2, i3, a0, a1, a2, a3)

    def codegen(context, builder, sig, args):
        a = sig.args
        g = _entries(context, builder, a[0], args[0], a[1:5], args[1:5], _I64, 4)
        add = ir.Constant(_V4Q, ir.Undefined)
        for k in range(4):
            v = context.cast(builder, args[5 + k], a[5 + k], types.int64)
            add = builder.insert_element(add, v, ir.Constant(_I32, k))
        w = builder.add(g, builder.bitcast(add, _V32B))
        return _pair(builder, _psign(builder, w, w), w)

    return sig, codegen


@intrinsic
def dot32(typingctx, acc, w, xq, xoff, sc_lo, sc_hi):
    """acc + the 8 int32 lanes of sum(w * x) over the 32 int8 weights w and activations
    xq[xoff:xoff + 32], weights 0..15 times the integer sc_lo and 16..31 times sc_hi (each lane
    holds 4 products: lanes 0..3 the low half)."""
    _need("xq", xq, types.int8)
    sig = i32x8(i32x8, i8x32, xq, xoff, sc_lo, sc_hi)

    def codegen(context, builder, sig, args):
        acc_v, w_v, xq_v, xo, lo, hi = args
        x = builder.load(builder.bitcast(_ptr(context, builder, sig.args[2], xq_v, xo),
                                         _V32B.as_pointer()), align=1)
        u = _half(builder, w_v, 0)                          # |w|
        xs = _psign(builder, x, _half(builder, w_v, 1))     # sign(w) * x (0 where w = 0)
        pm = _fn(builder, "llvm.x86.avx2.pmadd.ub.sw", _V16W, [_V32B, _V32B])
        wd = _fn(builder, "llvm.x86.avx2.pmadd.wd", _V8D, [_V16W, _V16W])
        p = builder.call(pm, [u, xs])
        sc = ir.Constant(_V16W, ir.Undefined)
        lo16 = builder.trunc(context.cast(builder, lo, sig.args[4], types.int64), _I16)
        hi16 = builder.trunc(context.cast(builder, hi, sig.args[5], types.int64), _I16)
        sc = builder.insert_element(sc, lo16, ir.Constant(_I32, 0))
        sc = builder.insert_element(sc, hi16, ir.Constant(_I32, 1))
        sc = builder.shuffle_vector(sc, sc, ir.Constant(ir.VectorType(_I32, 16), [0] * 8 + [1] * 8))
        return builder.add(acc_v, builder.call(wd, [p, sc]))

    return sig, codegen


@intrinsic
def fma_sum(typingctx, acc, isum, f):
    """acc + float(isum) * f (one vfmadd per block; f: float32 scalar)."""
    sig = f32x8(f32x8, i32x8, types.float32)

    def codegen(context, builder, sig, args):
        acc_v, s, fv = args
        fma = _fn(builder, "llvm.fma.v8f32", _V8F, [_V8F, _V8F, _V8F])
        return builder.call(fma, [builder.sitofp(s, _V8F), _splat_f(builder, fv), acc_v])

    return sig, codegen


@intrinsic
def store_w(typingctx, w, arr, off):
    """arr[off:off + 32] = the 32 int8 weights of w (arr: C-contiguous 1-D int8)."""
    _need("arr", arr, types.int8)
    sig = types.none(i8x32, arr, off)

    def codegen(context, builder, sig, args):
        p = _ptr(context, builder, sig.args[1], args[1], args[2])
        w = _psign(builder, _half(builder, args[0], 0), _half(builder, args[0], 1))
        builder.store(w, builder.bitcast(p, _V32B.as_pointer()), align=1)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def load_w(typingctx, arr, off):
    """The 32 int8 weights at arr[off:] as i8x32."""
    _need("arr", arr, types.int8)
    sig = i8x32(arr, off)

    def codegen(context, builder, sig, args):
        p = _ptr(context, builder, sig.args[0], args[0], args[1])
        w = builder.load(builder.bitcast(p, _V32B.as_pointer()), align=1)
        return _pair(builder, _psign(builder, w, w), w)

    return sig, codegen


@intrinsic
def load8(typingctx, arr, off):
    """arr[off:off + 8] (C-contiguous 1-D float32) as f32x8."""
    _need("arr", arr, types.float32)
    sig = f32x8(arr, off)

    def codegen(context, builder, sig, args):
        p = _ptr(context, builder, sig.args[0], args[0], args[1])
        return builder.load(builder.bitcast(p, _V8F.as_pointer()), align=1)

    return sig, codegen


def _raw_load(bits: int):
    def impl(typingctx, arr, off):
        """The unsigned little-endian integer of `bits` bits at byte `off` of a uint8 array, as
        int64: one plain load, without Numba's negative-index wraparound (offsets are >= 0)."""
        _need("arr", arr, types.uint8)
        sig = types.int64(arr, off)

        def codegen(context, builder, sig, args):
            p = _ptr(context, builder, sig.args[0], args[0], args[1])
            ity = ir.IntType(bits)
            v = builder.load(builder.bitcast(p, ity.as_pointer()), align=1)
            return v if bits == 64 else builder.zext(v, _I64)

        return sig, codegen

    return intrinsic(impl)


ld8 = _raw_load(8)
ld16 = _raw_load(16)
ld32 = _raw_load(32)
ld64 = _raw_load(64)


@intrinsic
def half_bits(typingctx, h):
    """The IEEE half whose bits are the low 16 of integer h, as float32 (vcvtph2ps with F16C)."""
    sig = types.float32(h)

    def codegen(context, builder, sig, args):
        v = builder.trunc(context.cast(builder, args[0], sig.args[0], types.int64), _I16)
        return builder.fpext(builder.bitcast(v, ir.HalfType()), ir.FloatType())

    return sig, codegen


def _ld16(context, builder, aryty, ary, off):
    p = _ptr(context, builder, aryty, ary, off)
    return builder.load(builder.bitcast(p, ir.VectorType(_I8, 16).as_pointer()), align=1)


def _signed_pair(builder, w):
    """(|w|, w) of a <32 x i8> w, the i8x32 pair."""
    return _pair(builder, _psign(builder, w, w), w)


@intrinsic
def crumbs32(typingctx, q, off, shift):
    """32 ternary weights of TQ2_0: ((q[off + m] >> shift) & 3) - 1 for m = 0..31."""
    _need("q", q, types.uint8)
    sig = i8x32(q, off, shift)

    def codegen(context, builder, sig, args):
        p = _ptr(context, builder, sig.args[0], args[0], args[1])
        b = builder.load(builder.bitcast(p, _V32B.as_pointer()), align=1)
        sh = builder.trunc(context.cast(builder, args[2], sig.args[2], types.int64), _I8)
        shv = builder.shuffle_vector(builder.insert_element(ir.Constant(_V32B, ir.Undefined), sh,
                                                            ir.Constant(_I32, 0)),
                                     ir.Constant(_V32B, ir.Undefined),
                                     ir.Constant(ir.VectorType(_I32, 32), [0] * 32))
        v = builder.and_(builder.lshr(b, shv), ir.Constant(_V32B, [3] * 32))
        return _signed_pair(builder, builder.sub(v, ir.Constant(_V32B, [1] * 32)))

    return sig, codegen


def _trits(builder, b, mul):
    """TQ1_0's base-3 digit: ((uint8(b * mul) * 3) >> 8) - 1, bytewise (<32 x i8> b, mul)."""
    _V32W = ir.VectorType(_I16, 32)
    x = builder.zext(builder.mul(b, mul), _V32W)
    t = builder.lshr(builder.mul(x, ir.Constant(_V32W, [3] * 32)), ir.Constant(_V32W, [8] * 32))
    return builder.sub(builder.trunc(t, _V32B), ir.Constant(_V32B, [1] * 32))


def _trits_impl(quad: bool):
    def impl(typingctx, q, oa, ob, mlo, mhi):
        _need("q", q, types.uint8)
        sig = i8x32(q, oa, ob, mlo, mhi)

        def codegen(context, builder, sig, args):
            lo = _ld16(context, builder, sig.args[0], args[0], args[1])
            if quad:            # 4 bytes at ob, repeated 4 times
                p = _ptr(context, builder, sig.args[0], args[0], args[2])
                u = builder.load(builder.bitcast(p, _I32.as_pointer()), align=1)
                v4 = ir.VectorType(_I32, 4)
                hi = builder.insert_element(ir.Constant(v4, ir.Undefined), u, ir.Constant(_I32, 0))
                hi = builder.shuffle_vector(hi, hi, ir.Constant(v4, [0] * 4))
                hi = builder.bitcast(hi, ir.VectorType(_I8, 16))
            else:
                hi = _ld16(context, builder, sig.args[0], args[0], args[2])
            b = builder.shuffle_vector(lo, hi, ir.Constant(ir.VectorType(_I32, 32), list(range(32))))
            m = []
            for a, t in ((args[3], sig.args[3]), (args[4], sig.args[4])):
                m.append(builder.trunc(context.cast(builder, a, t, types.int64), _I64))
            mul = ir.Constant(ir.VectorType(_I64, 4), ir.Undefined)
            for k in range(4 if not quad else 2):
                mul = builder.insert_element(mul, m[k // 2], ir.Constant(_I32, k))
            mul = builder.bitcast(mul, _V32B)
            if quad:            # the repeated 4 bytes times 1, 3, 9, 27 (qh's digits)
                hi_mul = ir.Constant(_V32B, [0] * 16 + [1] * 4 + [3] * 4 + [9] * 4 + [27] * 4)
                mul = builder.shuffle_vector(mul, hi_mul, ir.Constant(
                    ir.VectorType(_I32, 32), list(range(16)) + list(range(48, 64))))
            return _signed_pair(builder, _trits(builder, b, mul))

        return sig, codegen

    return intrinsic(impl)


# trits32(q, oa, ob, mlo, mhi): 32 TQ1_0 weights from q[oa:oa + 16] and q[ob:ob + 16], the bytes
# multiplied bytewise by the 8 bytes of int64 mlo (low half) / mhi (high half) before the digit
trits32 = _trits_impl(False)
# trits32q: the high half is the 4 bytes q[ob:ob + 4] repeated 4 times, times 1, 3, 9, 27 (mhi
# unused)
trits32q = _trits_impl(True)


@intrinsic
def ld_idx(typingctx, arr, off):
    """arr[off] of a C-contiguous int32 array, as int64 (one load, no wraparound check)."""
    _need("arr", arr, types.int32)
    sig = types.int64(arr, off)

    def codegen(context, builder, sig, args):
        data = context.make_array(sig.args[0])(context, builder, args[0]).data
        at = builder.gep(data, [args[1]])
        return builder.sext(builder.load(at, align=4), _I64)

    return sig, codegen


def _indices(n: int, qs_at: int, qh_at: int, qh_bits: int, per: int, step: int, mask: int):
    """An intrinsic f(q, o, ibuf) writing the n grid indices of the block at byte o into
    ibuf[0:n] (int32): index g = q[o + qs_at + g] | ((qh[g // per] >> step * (g % per)) & mask)
    << 8, qh the qh_bits-bit little-endian elements at byte o + qh_at. Vector shifts and masks
    per block in place of scalar bit arithmetic per index."""
    def impl(typingctx, q, o, ibuf):
        _need("q", q, types.uint8)
        _need("ibuf", ibuf, types.int32)
        sig = types.none(q, o, ibuf)

        def codegen(context, builder, sig, args):
            vn = ir.VectorType(_I32, n)
            nqh = n // per
            qs = builder.load(builder.bitcast(
                _ptr(context, builder, sig.args[0], args[0],
                     builder.add(args[1], ir.Constant(args[1].type, qs_at))),
                ir.VectorType(_I8, n).as_pointer()), align=1)
            qh = builder.load(builder.bitcast(
                _ptr(context, builder, sig.args[0], args[0],
                     builder.add(args[1], ir.Constant(args[1].type, qh_at))),
                ir.VectorType(ir.IntType(qh_bits), nqh).as_pointer()), align=1)
            h = builder.zext(builder.shuffle_vector(qh, qh, ir.Constant(
                ir.VectorType(_I32, n), [g // per for g in range(n)])), vn)
            h = builder.lshr(h, ir.Constant(vn, [step * (g % per) for g in range(n)]))
            h = builder.shl(builder.and_(h, ir.Constant(vn, [mask] * n)), ir.Constant(vn, [8] * n))
            idx = builder.or_(builder.zext(qs, vn), h)
            data = context.make_array(sig.args[2])(context, builder, args[2]).data
            builder.store(idx, builder.bitcast(data, vn.as_pointer()), align=4)
            return context.get_dummy_value()

        return sig, codegen

    return intrinsic(impl)


# the grid indices of a whole block (per type's layout, see iq1.py, iq2.py, iq3.py)
iq1s_indices = _indices(32, 2, 34, 16, 4, 3, 7)
iq1m_indices = _indices(32, 0, 32, 8, 2, 4, 7)
iq2s_indices = _indices(32, 2, 66, 8, 4, 2, 3)
iq3s_indices = _indices(64, 2, 66, 8, 8, 1, 1)


@intrinsic
def no_indices(typingctx, q, o, ibuf):
    """The types whose SUB needs no precomputed indices."""
    sig = types.none(q, o, ibuf)

    def codegen(context, builder, sig, args):
        return context.get_dummy_value()

    return sig, codegen
