"""AVX-512 steps of the IQ kernels (the avx512-iq variant of `_iq_common`), as Numba intrinsics.

One step is 64 weights, two 32-weight sub-blocks side by side in one zmm register, as a `w64`:
the magnitudes |w| (<64 x i8>) and the signs as a 64-bit mask (<64 x i1>, bit m set: weight m
is negative). AVX-512 has no vpsignb: the dot negates the activations under that mask (one
masked vpsubb), then vpmaddubsw (|w| u8 x sign-applied x s8; pairs <= 2 * 62 * 127 < 32767)
and vpmaddwd with the integer scales, one per 16 weights (`i16x32` words 8h..8h + 7 for
weights 16h..16h + 15, or `sc4`: word h of an int64), all exact in int32. How a type gets its
steps: `_iq512_lut` (IQ2, IQ3 grids in registers), `_iq512_iq1` (IQ1, gathered), and here
TQ2_0's `crumbs64` and the generic `join32` of two avx2-iq sub-blocks (TQ1_0).

Lane layout: int32 lane i < 8 of a step's sum holds weights 4i..4i + 3 of its first sub-block,
lane 8 + i those of the second, so the low and high halves added at the end of a block (`fold`)
are exactly the <8 x i32> sums the avx2-iq kernels form: same float operations after that, so
the results are bit-identical to avx2-iq.
"""
from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.extending import intrinsic, models, register_model

from ._iq_simd import i8x32
from ._simd import _I8, _I16, _I32, _V8F, _fn, _ptr, f32x8
from ._x8_simd import _need, _splat_f

_I64 = ir.IntType(64)
_B1 = ir.IntType(1)
_V64B = ir.VectorType(_I8, 64)
_V64K = ir.VectorType(_B1, 64)
_V32W = ir.VectorType(_I16, 32)
_V16D = ir.VectorType(_I32, 16)
_V8Q = ir.VectorType(_I64, 8)
_W64 = ir.LiteralStructType([_V64B, _V64K])

# the AVX-512 subsets the steps compile to (BW: byte/word ops and masks; VBMI: vpermb, vpermi2b,
# vpmultishiftqb)
FEATURES = ("avx512f", "avx512bw", "avx512vl", "avx512vbmi")


class W64Type(types.Type):
    def __init__(self):
        super().__init__(name="iq_w64")


class I32x16Type(types.Type):
    def __init__(self):
        super().__init__(name="i32x16")


class I16x32Type(types.Type):
    def __init__(self):
        super().__init__(name="i16x32")


w64 = W64Type()
i32x16 = I32x16Type()
i16x32 = I16x32Type()       # a step's scale words (weights 16h..16h + 15: words 8h..8h + 7)


@register_model(I16x32Type)
class _I16x32Model(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _V32W)


@register_model(W64Type)
class _W64Model(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _W64)


@register_model(I32x16Type)
class _I32x16Model(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _V16D)


def _idx(values):
    return ir.Constant(ir.VectorType(_I32, len(values)), list(values))


def _i64(context, builder, v, ty):
    return context.cast(builder, v, ty, types.int64)


def _make_w(builder, mag, neg):
    w = builder.insert_value(ir.Constant(_W64, ir.Undefined), mag, 0)
    return builder.insert_value(w, neg, 1)


def _mask(builder, bits):
    """An i64 as a <64 x i1> mask (kmovq)."""
    return builder.bitcast(bits, _V64K)


def _signed(builder, w):
    """w64 of a signed <64 x i8> w: vpabsb, vpmovb2m."""
    neg = builder.icmp_signed("<", w, ir.Constant(_V64B, [0] * 64))
    mag = builder.select(neg, builder.sub(ir.Constant(_V64B, [0] * 64), w), w)
    return _make_w(builder, mag, neg)


def _load(context, builder, aryty, ary, off, vty):
    p = _ptr(context, builder, aryty, ary, off)
    return builder.load(builder.bitcast(p, vty.as_pointer()), align=1)


def _gather(builder, context, tabty, tab, idx, n):
    """tab[idx] for the <n x i32> idx (n = 8: 8-byte entries, vpgatherdq; n = 16: 4-byte
    entries, vpgatherdd), as <64 x i8>."""
    base = builder.bitcast(context.make_array(tabty)(context, builder, tab).data,
                           ir.IntType(8).as_pointer())
    ety, name, sc = (_I64, "llvm.x86.avx512.mask.gather.dpq.512", 8) if n == 8 else \
        (_I32, "llvm.x86.avx512.mask.gather.dpi.512", 4)
    vty = ir.VectorType(ety, n)
    fn = _fn(builder, name, vty, [vty, base.type, ir.VectorType(_I32, n), ir.VectorType(_B1, n),
                                  _I32])
    ones = ir.Constant(ir.VectorType(_B1, n), [1] * n)
    g = builder.call(fn, [ir.Constant(vty, [0] * n), base, idx, ones, ir.Constant(_I32, sc)])
    return builder.bitcast(g, _V64B)


@intrinsic
def join32(typingctx, a, b):
    """w64 of two avx2-iq i8x32 pairs (weights 0..31 from a, 32..63 from b): the generic step
    of the types without a dedicated one."""
    sig = w64(i8x32, i8x32)

    def codegen(context, builder, sig, args):
        mag = builder.shuffle_vector(args[0], args[1], _idx(list(range(32)) + list(range(64, 96))))
        sgn = builder.shuffle_vector(args[0], args[1], _idx(list(range(32, 64))
                                                          + list(range(96, 128))))
        return _make_w(builder, mag, builder.icmp_signed("<", sgn, ir.Constant(_V64B, [0] * 64)))

    return sig, codegen


@intrinsic
def crumbs64(typingctx, q, off, shift):
    """64 ternary weights of TQ2_0: ((q[off + m % 32] >> (shift + 2 (m // 32))) & 3) - 1,
    m = 0..63 (two sub-blocks from the same 32 bytes), as w64."""
    _need("q", q, types.uint8)
    sig = w64(q, off, shift)

    def codegen(context, builder, sig, args):
        b = _load(context, builder, sig.args[0], args[0], args[1], ir.VectorType(_I8, 32))
        b = builder.shuffle_vector(b, b, _idx(list(range(32)) * 2))
        # word shifts (vpsrlvw; x86 has no byte shift): the bits a byte gets from its
        # neighbour land above the 2 kept
        sh = builder.trunc(_i64(context, builder, args[2], sig.args[2]), _I16)
        shv = builder.insert_element(ir.Constant(_V32W, ir.Undefined), sh, ir.Constant(_I32, 0))
        shv = builder.add(builder.shuffle_vector(shv, shv, _idx([0] * 32)),
                          ir.Constant(_V32W, [0] * 16 + [2] * 16))
        v = builder.bitcast(builder.lshr(builder.bitcast(b, _V32W), shv), _V64B)
        v = builder.and_(v, ir.Constant(_V64B, [3] * 64))
        return _signed(builder, builder.sub(v, ir.Constant(_V64B, [1] * 64)))

    return sig, codegen


@intrinsic
def izero16(typingctx):
    """<16 x i32> zero."""
    def codegen(context, builder, sig, args):
        return ir.Constant(_V16D, [0] * 16)

    return i32x16(), codegen


def _scale_words(context, builder, ty, sc):
    """The <32 x i16> scale words of a step: sc itself (i16x32) or from an int64 sc4 (word h of
    it for weights 16h..16h + 15)."""
    if ty == i16x32:
        return sc
    s = builder.bitcast(_i64(context, builder, sc, ty), ir.VectorType(_I16, 4))
    return builder.shuffle_vector(s, ir.Constant(ir.VectorType(_I16, 4), ir.Undefined),
                                  _idx([h for h in range(4) for _ in range(8)]))


@intrinsic
def dot64(typingctx, acc, w, xq, xoff, sc):
    """acc + the 16 int32 lanes of sum(w * x) over the 64 weights w and the int8 activations
    xq[xoff:xoff + 64], times the step's scales sc (an int64 sc4 or i16x32 words)."""
    _need("xq", xq, types.int8)
    sig = i32x16(i32x16, w64, xq, xoff, sc)

    def codegen(context, builder, sig, args):
        acc_v, w_v, xq_v, xo, sc = args
        x = _load(context, builder, sig.args[2], xq_v, xo, _V64B)
        mag = builder.extract_value(w_v, 0)
        neg = builder.extract_value(w_v, 1)
        xs = builder.select(neg, builder.sub(ir.Constant(_V64B, [0] * 64), x), x)
        pm = _fn(builder, "llvm.x86.avx512.pmaddubs.w.512", _V32W, [_V64B, _V64B])
        wd = _fn(builder, "llvm.x86.avx512.pmaddw.d.512", _V16D, [_V32W, _V32W])
        s = _scale_words(context, builder, sig.args[4], sc)
        return builder.add(acc_v, builder.call(wd, [builder.call(pm, [mag, xs]), s]))

    return sig, codegen


@intrinsic
def fold_fma(typingctx, acc, isum, f):
    """acc + float(low 8 lanes + high 8 lanes of isum) * f: avx2-iq's `fma_sum` of the same
    <8 x i32> block sums."""
    sig = f32x8(f32x8, i32x16, types.float32)

    def codegen(context, builder, sig, args):
        acc_v, s, fv = args
        lo = builder.shuffle_vector(s, s, _idx(range(8)))
        hi = builder.shuffle_vector(s, s, _idx(range(8, 16)))
        fma = _fn(builder, "llvm.fma.v8f32", _V8F, [_V8F, _V8F, _V8F])
        return builder.call(fma, [builder.sitofp(builder.add(lo, hi), _V8F),
                                  _splat_f(builder, fv), acc_v])

    return sig, codegen


@intrinsic
def store_w64(typingctx, w, buf, off, negs, k):
    """buf[off:off + 64] = w's magnitudes, negs[k] = its sign mask (prefill's decoded block)."""
    _need("buf", buf, types.uint8)
    _need("negs", negs, types.int64)
    sig = types.none(w64, buf, off, negs, k)

    def codegen(context, builder, sig, args):
        p = _ptr(context, builder, sig.args[1], args[1], args[2])
        builder.store(builder.extract_value(args[0], 0), builder.bitcast(p, _V64B.as_pointer()),
                      align=1)
        n = builder.bitcast(builder.extract_value(args[0], 1), _I64)
        builder.store(n, _ptr(context, builder, sig.args[3], args[3], args[4]), align=8)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def load_w64(typingctx, buf, off, negs, k):
    """The w64 `store_w64` put at buf[off:], negs[k]."""
    _need("buf", buf, types.uint8)
    _need("negs", negs, types.int64)
    sig = w64(buf, off, negs, k)

    def codegen(context, builder, sig, args):
        mag = _load(context, builder, sig.args[0], args[0], args[1], _V64B)
        n = builder.load(_ptr(context, builder, sig.args[2], args[2], args[3]), align=8)
        return _make_w(builder, mag, _mask(builder, n))

    return sig, codegen


@intrinsic
def store_sc(typingctx, sc, buf, k):
    """buf[32k:32k + 32] = the scale words of sc (int64 sc4 or i16x32; buf: int16)."""
    _need("buf", buf, types.int16)
    sig = types.none(sc, buf, k)

    def codegen(context, builder, sig, args):
        off = builder.mul(_i64(context, builder, args[2], sig.args[2]), ir.Constant(_I64, 32))
        p = _ptr(context, builder, sig.args[1], args[1], off)
        builder.store(_scale_words(context, builder, sig.args[0], args[0]),
                      builder.bitcast(p, _V32W.as_pointer()), align=1)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def load_sc(typingctx, buf, k):
    """The scale words store_sc put at buf[32k:]."""
    _need("buf", buf, types.int16)
    sig = i16x32(buf, k)

    def codegen(context, builder, sig, args):
        off = builder.mul(_i64(context, builder, args[1], sig.args[1]), ir.Constant(_I64, 32))
        return _load(context, builder, sig.args[0], args[0], off, _V32W)

    return sig, codegen


@intrinsic
def no_block(typingctx, q, o):
    """The block state of the types whose steps need none."""
    sig = types.int64(q, o)

    def codegen(context, builder, sig, args):
        return ir.Constant(_I64, 0)

    return sig, codegen
