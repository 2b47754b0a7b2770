"""AVX2 building blocks shared by the kernels, as Numba intrinsics: the <8 x float> register
type, LLVM helpers, and the half-float (F16/BF16) steps of the dense units.

Plain Numba loops over int8 data do not vectorize well (LLVM widens the lanes to int64), so the
hot decode/prefill loops use intrinsics instead: each emits a few lines of LLVM vector IR around
x86 intrinsics (vpmaddubsw, vpmaddwd, vpsignb, vpshufb, vcvtph2ps). They are only ever compiled
on a CPU whose features include `AVX2_FEATURES` (the units check `has_avx2()` before choosing
them); elsewhere the plain-Numba variants run. The quantized record steps built from these are in
_x8_simd.py (32-element blocks) and _kx8_simd.py (K-quants).

The accumulator type `f32x8` is a Numba type backed by an LLVM <8 x float>, so a kernel can carry
it through its loops in a register (phi nodes) instead of through memory.

Activation trick (as in llama.cpp): x is quantized once per input to int8 blocks with one float
scale each (|q| <= 127), so a block dot is int8*int8 products summed exactly in int32, then
scaled by d_w * d_x. vpmaddubsw needs one unsigned operand: for signed weights w we feed |w| and
sign(w)*x (vpsignb), which keeps every pair sum below 2*128*127 < 32767 (no saturation).
"""
from __future__ import annotations

import functools

import llvmlite.binding as llvm
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, models, register_model

AVX2_FEATURES = ("avx2", "fma", "f16c")
# The VNNI record variants: vpdpbusd (u8 x s8 dot of 4 bytes added to an int32 lane) on ymm
# registers with EVEX encoding, whose embedded broadcast ({1to8}) reads the 4 activation bytes of
# a chunk straight from memory (AVX512-VNNI + AVX512VL; Ice Lake and later Xeons, Zen 4).
VNNI_FEATURES = AVX2_FEATURES + ("avx512f", "avx512vl", "avx512vnni")


@functools.lru_cache(maxsize=None)
def host_features() -> frozenset[str]:
    """The ISA features Numba compiles for: the host's, or only those NUMBA_CPU_FEATURES lists
    when NUMBA_CPU_NAME names another target (e.g. "generic" for a cache shared with other
    machines), where AVX2 intrinsics must not be compiled however capable this CPU is."""
    from numba.core import config

    if config.CPU_NAME and config.CPU_NAME != "host":
        return frozenset(f[1:] for f in (config.CPU_FEATURES or "").split(",") if f.startswith("+"))
    feats = llvm.get_host_cpu_features()
    return frozenset(k for k in feats if feats[k])


def has_avx2() -> bool:
    return all(f in host_features() for f in AVX2_FEATURES)


def has_vnni() -> bool:
    return all(f in host_features() for f in VNNI_FEATURES)


class F32x8Type(types.Type):
    def __init__(self):
        super().__init__(name="f32x8")


f32x8 = F32x8Type()

_F32 = ir.FloatType()
_V8F = ir.VectorType(_F32, 8)
_I8 = ir.IntType(8)
_I16 = ir.IntType(16)
_I32 = ir.IntType(32)
_V32B = ir.VectorType(_I8, 32)
_V16W = ir.VectorType(_I16, 16)
_V8D = ir.VectorType(_I32, 8)


@register_model(F32x8Type)
class _F32x8Model(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _V8F)


def _fn(builder, name, ret, args):
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, args), name)


def _ptr(context, builder, aryty, ary, off):
    """Address of element `off` of a C-contiguous array, as an i8 pointer."""
    data = context.make_array(aryty)(context, builder, ary).data
    return builder.gep(data, [off])


def _load(builder, ptr, vty):
    return builder.load(builder.bitcast(ptr, vty.as_pointer()), align=1)


# Software prefetch distance of the record kernels, in bytes of the weight stream. Decode reads
# each weight once, and one core alone may keep too few cache misses in flight for the 4-5 bit
# types' compute rate: on a Sapphire-Rapids-class Xeon, asking for the lines 2 KB ahead measured
# +7-16% (4 KB was worse), while on AMD Zen 4 the same prefetches cost a third of the decode
# speed. So decode's loop takes the distance as an argument (0: none) and calibration times
# both per CPU and type (`_calibrate`); the token tiles (prefill) always prefetch.
PREFETCH_AHEAD = 2048


def prefetch(builder, p, nbytes: int, ahead: int = PREFETCH_AHEAD) -> None:
    """prefetcht0 the cache lines of the `nbytes` at p + ahead (never faults)."""
    fn = _fn(builder, "llvm.prefetch.p0i8", ir.VoidType(), [p.type, _I32, _I32, _I32])
    for k in range(0, nbytes, 64):
        at = builder.gep(p, [ir.Constant(_I32, ahead + k)])
        builder.call(fn, [at, ir.Constant(_I32, 0), ir.Constant(_I32, 3), ir.Constant(_I32, 1)])


def record_prefetch(nbytes: int):
    """An intrinsic f(w, off): prefetcht0 the cache lines of w's `nbytes` bytes from byte `off`
    (w a uint8 array; never faults, so off may run past its end)."""

    def impl(typingctx, w, off):
        sig = types.void(w, off)

        def codegen(context, builder, sig, args):
            prefetch(builder, _ptr(context, builder, sig.args[0], args[0], args[1]), nbytes, 0)
            return context.get_dummy_value()

        return sig, codegen

    return intrinsic(impl)


def _splat8(builder, value: int, n: int):
    return ir.Constant(ir.VectorType(_I8, n), [value] * n)


def _dot_us(builder, u, s):
    """sum over pairs of u8*s8 -> <8 x i32> (each lane sums 4 products)."""
    pm = _fn(builder, "llvm.x86.avx2.pmadd.ub.sw", _V16W, [_V32B, _V32B])
    wd = _fn(builder, "llvm.x86.avx2.pmadd.wd", _V8D, [_V16W, _V16W])
    p16 = builder.call(pm, [u, s])
    return builder.call(wd, [p16, ir.Constant(_V16W, [1] * 16)])


def dpbusd(builder, acc, u, s):
    """acc (<8 x i32>, or None for zero) + per lane the sum of its 4 u8 (u) * s8 (s) products:
    one vpdpbusd, exact in int32 (no int16 stage, so no saturation bound to respect)."""
    fn = _fn(builder, "llvm.x86.avx512.vpdpbusd.256", _V8D, [_V8D, _V8D, _V8D])
    if acc is None:
        acc = ir.Constant(_V8D, [0] * 8)
    return builder.call(fn, [acc, builder.bitcast(u, _V8D), builder.bitcast(s, _V8D)])


@intrinsic
def vzero(typingctx):
    def codegen(context, builder, sig, args):
        return ir.Constant(_V8F, [0.0] * 8)

    return f32x8(), codegen


@intrinsic
def hsum(typingctx, acc):
    sig = types.float32(f32x8)

    def codegen(context, builder, sig, args):
        v = args[0]
        # pairwise: 8 -> 4 -> 2 -> 1 lanes
        for n in (4, 2, 1):
            hi = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, 8), list(range(n, n + 8))))
            v = builder.fadd(v, hi)
        return builder.extract_element(v, ir.Constant(_I32, 0))

    return sig, codegen


@intrinsic
def load_f16(typingctx, w, off):
    """The IEEE half at byte offset `off` of a uint8 array, widened to float32 (exact)."""
    sig = types.float32(w, off)

    def codegen(context, builder, sig, args):
        p = builder.bitcast(_ptr(context, builder, sig.args[0], args[0], args[1]), _I16.as_pointer())
        h = builder.bitcast(builder.load(p, align=1), ir.HalfType())
        return builder.fpext(h, _F32)

    return sig, codegen


# --- dense half types: 8 weights per step, converted exactly to float32 ------------------------

def _half8_to_f32(builder, p, bf16: bool):
    v = _load(builder, p, ir.VectorType(_I16, 8))
    if bf16:  # bf16 is the top half of a float32
        v = builder.shl(builder.zext(v, _V8D), ir.Constant(_V8D, [16] * 8))
        return builder.bitcast(v, _V8F)
    return builder.fpext(builder.bitcast(v, ir.VectorType(ir.HalfType(), 8)), _V8F)  # vcvtph2ps


def _dense_dot(bf16: bool):
    def impl(typingctx, acc, w, woff, x, xoff):
        """acc + w[8 halves at byte woff] * x[xoff:xoff+8] (one FMA)."""
        sig = f32x8(f32x8, w, woff, x, xoff)

        def codegen(context, builder, sig, args):
            acc_v, w_v, woff_v, x_v, xoff_v = args
            wv = _half8_to_f32(builder, _ptr(context, builder, sig.args[1], w_v, woff_v), bf16)
            xv = _load(builder, _ptr(context, builder, sig.args[3], x_v, xoff_v), _V8F)
            fma = _fn(builder, "llvm.fma.v8f32", _V8F, [_V8F, _V8F, _V8F])
            return builder.call(fma, [wv, xv, acc_v])

        return sig, codegen

    return intrinsic(impl)


def _dense_cvt(bf16: bool):
    def impl(typingctx, w, woff, out, ooff):
        """out[ooff:ooff+8] = the 8 halves at byte woff of w, as float32."""
        sig = types.none(w, woff, out, ooff)

        def codegen(context, builder, sig, args):
            wv = _half8_to_f32(builder, _ptr(context, builder, sig.args[0], args[0], args[1]), bf16)
            op = _ptr(context, builder, sig.args[2], args[2], args[3])
            builder.store(wv, builder.bitcast(op, _V8F.as_pointer()), align=1)
            return context.get_dummy_value()

        return sig, codegen

    return intrinsic(impl)


@intrinsic
def dot_f32x8(typingctx, acc, w, woff, x, xoff):
    """acc + w[woff:woff+8] * x[xoff:xoff+8] (one FMA), w and x float32 arrays."""
    sig = f32x8(f32x8, w, woff, x, xoff)

    def codegen(context, builder, sig, args):
        acc_v, w_v, woff_v, x_v, xoff_v = args
        wv = _load(builder, _ptr(context, builder, sig.args[1], w_v, woff_v), _V8F)
        xv = _load(builder, _ptr(context, builder, sig.args[3], x_v, xoff_v), _V8F)
        fma = _fn(builder, "llvm.fma.v8f32", _V8F, [_V8F, _V8F, _V8F])
        return builder.call(fma, [wv, xv, acc_v])

    return sig, codegen


dot_f16x8 = _dense_dot(False)
dot_bf16x8 = _dense_dot(True)
cvt_f16x8 = _dense_cvt(False)
cvt_bf16x8 = _dense_cvt(True)


@intrinsic
def load_bf16(typingctx, w, off):
    """The bfloat16 at byte offset `off` of a uint8 array, as float32 (exact, any CPU)."""
    sig = types.float32(w, off)

    def codegen(context, builder, sig, args):
        p = builder.bitcast(_ptr(context, builder, sig.args[0], args[0], args[1]), _I16.as_pointer())
        v = builder.shl(builder.zext(builder.load(p, align=1), _I32), ir.Constant(_I32, 16))
        return builder.bitcast(v, _F32)

    return sig, codegen
