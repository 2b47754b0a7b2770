"""AVX2 steps of the 8-row interleaved Q4_0 / Q8_0 kernels (layout in `interleaved.py`).

One call handles one block column (32 weights) of a group of 8 rows: it reads the group's record
(8 f16 scales, then the 8 rows' quants interleaved 4 bytes at a time) and the token's 32 int8
activations once, and adds the 8 row results to an <8 x float> accumulator whose lane i is row i
of the group. Compared with one row at a time (the `avx2-q8act` kernel of the other 32-block
types) the activations and the scale conversion are shared by 8 rows, and no horizontal sum is
needed: with 4 bytes of each row per 32-byte chunk and the matching 4 activation bytes broadcast
to all lanes (vpbroadcastd), vpmaddubsw + vpmaddwd leave row i's partial sums in lane i, so the
chunks simply add up vertically.

Q4_0 multiplies the unsigned nibble q (0..15) and takes the -8 offset off afterwards, once per
block for all 8 rows: sum (q - 8) x = sum q x - 8 sum x, with sum(x) precomputed per block.
Bounds: each vpmaddubsw lane is <= 2*15*127 = 3810 and a lane adds 8 of them (4 chunks, low and
high nibbles) in int16: <= 30480 < 32767, so one vpmaddwd per block suffices.
Q8_0 weights are signed: |w| and sign(w)*x (vpsignb) keep every pair sum <= 2*128*127 < 32767;
each chunk is widened to int32 (vpmaddwd) before the chunks add up.

Numba caches the compiled kernels by the source file of the kernel (interleaved.py), not of
these steps: after editing this file, touch interleaved.py (or clear __pycache__).
"""
from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core.errors import TypingError
from numba.extending import intrinsic

from ._simd import _I32, _V8D, _V8F, _V16W, _V32B, _dot_us, _fn, _ptr, _splat8, f32x8


def _need(name, aryty, dtype):
    """The steps read raw pointers: insist on a C-contiguous 1-D array of `dtype`."""
    if not (isinstance(aryty, types.Array) and aryty.ndim == 1 and aryty.layout == "C"
            and aryty.dtype == dtype):
        raise TypingError(f"{name} must be a C-contiguous 1-D {dtype} array, got {aryty}")


def _at(builder, p, off, vty):
    q = builder.gep(p, [ir.Constant(_I32, off)])
    return builder.load(builder.bitcast(q, vty.as_pointer()), align=1)


def _splat_f(builder, v):
    vs = builder.insert_element(ir.Constant(_V8F, ir.Undefined), v, ir.Constant(_I32, 0))
    return builder.shuffle_vector(vs, vs, ir.Constant(ir.VectorType(_I32, 8), [0] * 8))


def _splat_i(builder, v):
    vs = builder.insert_element(ir.Constant(_V8D, ir.Undefined), v, ir.Constant(_I32, 0))
    return builder.shuffle_vector(vs, vs, ir.Constant(ir.VectorType(_I32, 8), [0] * 8))


def _scaled(builder, acc, sums, wp, dx):
    """acc + float(sums) * (the group's 8 f16 scales at wp) * dx."""
    h = builder.load(builder.bitcast(wp, ir.VectorType(ir.HalfType(), 8).as_pointer()), align=1)
    s = builder.fmul(builder.fpext(h, _V8F), _splat_f(builder, dx))  # vcvtph2ps, vmulps
    fma = _fn(builder, "llvm.fma.v8f32", _V8F, [_V8F, _V8F, _V8F])
    return builder.call(fma, [builder.sitofp(sums, _V8F), s, acc])


def _signed_dot(builder, w, x):
    absf = _fn(builder, "llvm.abs.v32i8", _V32B, [_V32B, ir.IntType(1)])
    sign = _fn(builder, "llvm.x86.avx2.psign.b", _V32B, [_V32B, _V32B])
    aw = builder.call(absf, [w, ir.Constant(ir.IntType(1), 0)])
    return _dot_us(builder, aw, builder.call(sign, [x, w]))


def _bcast32(builder, p, off):
    """The 4 bytes at p + off repeated 8 times (one vpbroadcastd)."""
    v = builder.load(builder.bitcast(builder.gep(p, [ir.Constant(_I32, off)]), _I32.as_pointer()),
                     align=1)
    return builder.bitcast(_splat_i(builder, v), _V32B)


def _rows_q4_0(builder, wp, xp):
    """int32 <8 x i32>: lane i = sum of q * x over row i's 32 unsigned nibbles (chunk layout)."""
    pm = _fn(builder, "llvm.x86.avx2.pmadd.ub.sw", _V16W, [_V32B, _V32B])
    wd = _fn(builder, "llvm.x86.avx2.pmadd.wd", _V8D, [_V16W, _V16W])
    acc = None
    for c in range(4):
        q = _at(builder, wp, 16 + 32 * c, _V32B)
        lo = builder.and_(q, _splat8(builder, 0x0F, 32))
        hi = builder.and_(builder.lshr(q, _splat8(builder, 4, 32)), _splat8(builder, 0x0F, 32))
        s = builder.add(builder.call(pm, [lo, _bcast32(builder, xp, 4 * c)]),
                        builder.call(pm, [hi, _bcast32(builder, xp, 16 + 4 * c)]))
        acc = s if acc is None else builder.add(acc, s)
    return builder.call(wd, [acc, ir.Constant(_V16W, [1] * 16)])


def _rows_q8_0(builder, wp, xp):
    acc = None
    for c in range(8):
        w = _at(builder, wp, 16 + 32 * c, _V32B)
        s = _signed_dot(builder, w, _bcast32(builder, xp, 4 * c))
        acc = s if acc is None else builder.add(acc, s)
    return acc


def _step(rows):
    """Make `f(acc, w, woff, xq, xoff, dx, xsum, b)`: acc + the 8 rows' dots with block b.

    w: uint8 group records, woff: byte offset of one record; xq: int8 activations, xoff: index of
    the block's first; dx float32 / xsum int32: the activation blocks' scales and code sums (1-D,
    read at index b, here rather than in the caller so no index checks land in the hot loop)."""

    def impl(typingctx, acc, w, woff, xq, xoff, dx, xsum, b):
        _need("w", w, types.uint8), _need("xq", xq, types.int8)
        _need("dx", dx, types.float32), _need("xsum", xsum, types.int32)
        sig = f32x8(f32x8, w, woff, xq, xoff, dx, xsum, b)

        def codegen(context, builder, sig, args):
            acc_v, w_v, woff_v, xq_v, xoff_v, dx_v, xs_v, b_v = args
            wp = _ptr(context, builder, sig.args[1], w_v, woff_v)
            xp = _ptr(context, builder, sig.args[3], xq_v, xoff_v)
            d = builder.load(_ptr(context, builder, sig.args[5], dx_v, b_v))
            xs = builder.load(_ptr(context, builder, sig.args[6], xs_v, b_v))
            return _scaled(builder, acc_v, rows(builder, wp, xp, xs), wp, d)

        return sig, codegen

    return intrinsic(impl)


def _q4_0(builder, wp, xp, xs):
    # sum (q - 8) x = sum q x - 8 sum x
    eight_xs = builder.shl(xs, ir.Constant(_I32, 3))
    return builder.sub(_rows_q4_0(builder, wp, xp), _splat_i(builder, eight_xs))


def _q8_0(builder, wp, xp, xs):
    return _rows_q8_0(builder, wp, xp)


x8_q4_0 = _step(_q4_0)
x8_q8_0 = _step(_q8_0)


@intrinsic
def store8(typingctx, acc, out, off):
    """out[off:off + 8] = the 8 lanes of acc (out: C-contiguous 1-D float32)."""
    _need("out", out, types.float32)
    sig = types.none(f32x8, out, off)

    def codegen(context, builder, sig, args):
        p = _ptr(context, builder, sig.args[1], args[1], args[2])
        builder.store(args[0], builder.bitcast(p, _V8F.as_pointer()), align=1)
        return context.get_dummy_value()

    return sig, codegen

