"""AVX2 steps of the 8-row interleaved 32-block kernels (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL;
record layouts in `interleaved.py`).

One call handles one block column (32 weights) of a group of 8 rows: it reads the group's record
(8 f16 scales, [8 f16 mins], [8 x 32-bit high bits], then the 8 rows' quants interleaved 4 bytes
at a time) and the token's 32 int8 activations once, and adds the 8 row results to an
<8 x float> accumulator whose lane i is row i of the group. No horizontal sum is needed: with 4
bytes of each row per 32-byte chunk and the matching 4 activation bytes broadcast to all lanes
(vpbroadcastd), vpmaddubsw + vpmaddwd leave row i's partial sums in lane i, so chunks simply add
up vertically.

Unsigned codes go straight into vpmaddubsw; an offset (Q4_0: -8, Q5_0: -16) comes off once per
block for all 8 rows (sum (q - o) x = sum q x - o sum x, with sum(x) precomputed per block), a
min (Q4_1, Q5_1) is added as m * dx * sum(x). Bounds: a vpmaddubsw lane is <= 2*15*127 = 3810
for 4-bit codes (8 add in int16: <= 30480) and <= 2*31*127 = 7874 for 5-bit ones (4 add in
int16). Signed weights (Q8_0, IQ4_NL's table values) go through |w| and sign(w)*x (vpsignb):
every pair sum <= 2*128*127 < 32767, widened to int32 per chunk.

VNNI steps (`x8v_*`, the avx512vnni-x8 variant; same records, same activations): vpdpbusd adds
each lane's 4 u8 x s8 products straight into int32, replacing vpmaddubsw + vpmaddwd + vpaddw
(no int16 stage, so no chunk-count bound), and LLVM folds the activation broadcast into the
instruction ({1to8} from memory: no vpbroadcastd). Signed weights get a +128 bias instead of
the |w| / sign(w)*x pair: (w + 128) is a u8 (one vpxor with 0x80, or IQ4_NL's table stored
+128), and sum (w + 128) x = sum w x + 128 sum x, with sum(x) the block's precomputed code sum.
A lane's sum stays < 32 * 255 * 127 < 2^20. Each record keeps two dependency chains (low and
high nibbles, or even and odd chunks) so consecutive vpdpbusd overlap.
"""
from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core.errors import TypingError
from numba.extending import intrinsic

from ._simd import (_F32, _I32, _V8D, _V8F, _V16W, _V32B, _dot_us, _fn, _ptr, _splat8, dpbusd,
                    f32x8, prefetch)


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


def _nibble_rows(builder, wp, base, xp, fifth):
    """int32 <8 x i32>: lane i = sum of u * x over row i's 32 unsigned codes, u = the nibbles of
    4 chunks at wp + base (low: elements 4c.., high: 16 + 4c..), with bit 4 from the 32-bit qh of
    each row in `fifth` (<8 x i32>, lane i = row i's qh) when given. 4-bit codes add all 8
    vpmaddubsw results in int16 (<= 8 * 3810); 5-bit codes (lane <= 7874) two chunks at a time."""
    low = _splat8(builder, 0x0F, 32)
    pm = _fn(builder, "llvm.x86.avx2.pmadd.ub.sw", _V16W, [_V32B, _V32B])
    wd = _fn(builder, "llvm.x86.avx2.pmadd.wd", _V8D, [_V16W, _V16W])
    ones = ir.Constant(_V16W, [1] * 16)
    acc16 = acc32 = None
    for c in range(4):
        q = _at(builder, wp, base + 32 * c, _V32B)
        lo = builder.and_(q, low)
        hi = builder.and_(builder.lshr(q, _splat8(builder, 4, 32)), low)
        if fifth is not None:
            lo = builder.or_(lo, _bits_to_bytes(builder, fifth, 4 * c))
            hi = builder.or_(hi, _bits_to_bytes(builder, fifth, 16 + 4 * c))
        s = builder.add(builder.call(pm, [lo, _bcast32(builder, xp, 4 * c)]),
                        builder.call(pm, [hi, _bcast32(builder, xp, 16 + 4 * c)]))
        acc16 = s if acc16 is None else builder.add(acc16, s)
        if fifth is not None and c % 2 == 1:
            part = builder.call(wd, [acc16, ones])
            acc32 = part if acc32 is None else builder.add(acc32, part)
            acc16 = None
    return acc32 if fifth is not None else builder.call(wd, [acc16, ones])


def _bits_to_bytes(builder, qh, first):
    """<32 x i8>: byte m of lane i = 0x10 if bit first + m of qh[i] is set (m = 0..3). The four
    bits go to bytes 0..3 by one multiply: bit m times 2^(7m) lands at 8m, no other copy lands on
    a multiple of 8 and no two copies overlap, so no carries."""
    t = builder.and_(builder.lshr(qh, ir.Constant(_V8D, [first] * 8)), ir.Constant(_V8D, [15] * 8))
    t = builder.and_(builder.mul(t, ir.Constant(_V8D, [0x204081] * 8)),
                     ir.Constant(_V8D, [0x01010101] * 8))
    return builder.bitcast(builder.shl(t, ir.Constant(_V8D, [4] * 8)), _V32B)


def _rows_q8_0(builder, wp, xp):
    acc = None
    for c in range(8):
        w = _at(builder, wp, 16 + 32 * c, _V32B)
        s = _signed_dot(builder, w, _bcast32(builder, xp, 4 * c))
        acc = s if acc is None else builder.add(acc, s)
    return acc


_IQ4NL = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


def _rows_iq4_nl(builder, wp, xp):
    """Nibbles index the fixed non-linear table (vpshufb); signed values, so |w| and sign(w)*x,
    each half-chunk widened to int32 at once (a lane is <= 2*127*127)."""
    low = _splat8(builder, 0x0F, 32)
    table = ir.Constant(_V32B, [v & 0xFF for v in _IQ4NL * 2])
    shuf = _fn(builder, "llvm.x86.avx2.pshuf.b", _V32B, [_V32B, _V32B])
    acc = None
    for c in range(4):
        q = _at(builder, wp, 16 + 32 * c, _V32B)
        for half, nib in ((0, builder.and_(q, low)),
                          (16, builder.and_(builder.lshr(q, _splat8(builder, 4, 32)), low))):
            s = _signed_dot(builder, builder.call(shuf, [table, nib]),
                            _bcast32(builder, xp, half + 4 * c))
            acc = s if acc is None else builder.add(acc, s)
    return acc


def _nibble_rows_vnni(builder, wp, base, xp, fifth):
    """_nibble_rows with vpdpbusd: the low and high nibbles of each chunk go into two int32
    chains, added at the end (no int16 stage)."""
    low = _splat8(builder, 0x0F, 32)
    acc_lo = acc_hi = None
    for c in range(4):
        q = _at(builder, wp, base + 32 * c, _V32B)
        lo = builder.and_(q, low)
        hi = builder.and_(builder.lshr(q, _splat8(builder, 4, 32)), low)
        if fifth is not None:
            lo = builder.or_(lo, _bits_to_bytes(builder, fifth, 4 * c))
            hi = builder.or_(hi, _bits_to_bytes(builder, fifth, 16 + 4 * c))
        acc_lo = dpbusd(builder, acc_lo, lo, _bcast32(builder, xp, 4 * c))
        acc_hi = dpbusd(builder, acc_hi, hi, _bcast32(builder, xp, 16 + 4 * c))
    return builder.add(acc_lo, acc_hi)


def _less_128_xsum(builder, sums, xs):
    """sums - 128 * sum(x codes): removes the +128 bias of the signed weights (VNNI steps)."""
    return builder.sub(sums, _splat_i(builder, builder.shl(xs, ir.Constant(_I32, 7))))


def _rows_q8_0_vnni(builder, wp, xp, xs):
    bias = _splat8(builder, 0x80, 32)
    acc = [None, None]
    for c in range(8):
        u = builder.xor(_at(builder, wp, 16 + 32 * c, _V32B), bias)   # w + 128 as u8
        acc[c % 2] = dpbusd(builder, acc[c % 2], u, _bcast32(builder, xp, 4 * c))
    return _less_128_xsum(builder, builder.add(acc[0], acc[1]), xs)


def _rows_iq4_nl_vnni(builder, wp, xp, xs):
    low = _splat8(builder, 0x0F, 32)
    table = ir.Constant(_V32B, [v + 128 for v in _IQ4NL * 2])   # T[q] + 128 as u8
    shuf = _fn(builder, "llvm.x86.avx2.pshuf.b", _V32B, [_V32B, _V32B])
    acc = [None, None]
    for c in range(4):
        q = _at(builder, wp, 16 + 32 * c, _V32B)
        for h, nib in enumerate((builder.and_(q, low),
                                 builder.and_(builder.lshr(q, _splat8(builder, 4, 32)), low))):
            acc[h] = dpbusd(builder, acc[h], builder.call(shuf, [table, nib]),
                            _bcast32(builder, xp, 16 * h + 4 * c))
    return _less_128_xsum(builder, builder.add(acc[0], acc[1]), xs)


def _step(body, record_bytes):
    """Make `f(acc, w, woff, xq, xoff, dx, xsum, b)`: acc + the 8 rows' dots with block b.

    w: uint8 group records, woff: byte offset of one record; xq: int8 activations, xoff: index of
    the block's first; dx float32 / xsum int32: the activation blocks' scales and code sums (1-D,
    read at index b, here rather than in the caller so no index checks land in the hot loop).
    body(builder, acc, wp, xp, dx, xs) emits the record's arithmetic."""

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
            return body(builder, acc_v, wp, xp, d, xs)

        return sig, codegen

    step = intrinsic(impl)
    _MANY[step] = many_steps(body, record_bytes, types.int32, _token_32)
    PAIRS[step] = _pair_step(body, record_bytes)
    return step


# single-token step of a 32-weight block type -> its two-record step (`_pair_step`)
PAIRS: dict = {}


def _pair_step(body, record_bytes):
    """`f(acc0, acc1, w, woff0, woff1, xq, xoff, dx, xsum, b)` -> (acc0, acc1) + the dots of
    the records at woff0 and woff1 (two groups of rows, decode's two streams) with block b: the
    body emitted for both records in one basic block, so LLVM's value numbering loads the
    activation broadcasts, dx and xsum once for the pair, and the loop keeps one index update
    per pair. Each record's arithmetic is the single step's, so results are bit-identical."""

    def impl(typingctx, acc0, acc1, w, woff0, woff1, xq, xoff, dx, xsum, b):
        _need("w", w, types.uint8), _need("xq", xq, types.int8)
        _need("dx", dx, types.float32), _need("xsum", xsum, types.int32)
        sig = types.UniTuple(f32x8, 2)(f32x8, f32x8, w, woff0, woff1, xq, xoff, dx, xsum, b)

        def codegen(context, builder, sig, args):
            a0, a1, w_v, o0_v, o1_v, xq_v, xoff_v, dx_v, xs_v, b_v = args
            wp0 = _ptr(context, builder, sig.args[2], w_v, o0_v)
            wp1 = _ptr(context, builder, sig.args[2], w_v, o1_v)
            xp = _ptr(context, builder, sig.args[5], xq_v, xoff_v)
            d = builder.load(_ptr(context, builder, sig.args[7], dx_v, b_v))
            xs = builder.load(_ptr(context, builder, sig.args[8], xs_v, b_v))
            out = [body(builder, a0, wp0, xp, d, xs), body(builder, a1, wp1, xp, d, xs)]
            return context.make_tuple(builder, sig.return_type, out)

        return sig, codegen

    return intrinsic(impl)


def _token_32(context, builder, sig, dx_v, xs_v, bi, body, acc, wp, xp):
    d = builder.load(_ptr(context, builder, sig.args[6], dx_v, bi))
    xs = builder.load(_ptr(context, builder, sig.args[7], xs_v, bi))
    return body(builder, acc, wp, xp, d, xs)


# single-token step -> {n: its n-token step} (`many`)
_MANY: dict = {}
MANY_N = (2, 4)


def many(step, n: int):
    """The n-token version of a record step (n in MANY_N): `f(accs, w, woff, xq, xoff, xstride,
    dx, xaux, b, bstride)` -> accs, a tuple of n accumulators, token i's activations at
    xoff + i * xstride (codes) and b + i * bstride (scales, sums); see `many_steps`."""
    return _MANY[step][n]


def many_steps(body, record_bytes, aux_dtype, token) -> dict:
    """{n: the n-token step} of a step `body`: the body's code emitted once per token in one
    basic block. Every token reads the same record with the same loads and the same unpacking
    ops, which LLVM's value numbering merges, so the record is read and decoded once and only
    the activation side (broadcasts, multiplies, sums) is repeated per token: decode once,
    multiply n rows. Each token's arithmetic is the single step's, in the same order, so its
    result is bit-identical. token(context, builder, sig, dx, xaux, bi, body, acc, wp, xp)
    loads token-side scalars at block index bi and calls the body."""

    def make(n):
        def impl(typingctx, accs, w, woff, xq, xoff, xstride, dx, xaux, b, bstride):
            _need("w", w, types.uint8), _need("xq", xq, types.int8)
            _need("dx", dx, types.float32), _need("xaux", xaux, aux_dtype)
            tup = types.UniTuple(f32x8, n)
            sig = tup(tup, w, woff, xq, xoff, xstride, dx, xaux, b, bstride)

            def codegen(context, builder, sig, args):
                accs_v, w_v, woff_v, xq_v, xoff_v, xst_v, dx_v, xa_v, b_v, bst_v = args
                xoff_v, xst_v, b_v, bst_v = (context.cast(builder, v, t, types.intp) for v, t in
                                             ((xoff_v, sig.args[4]), (xst_v, sig.args[5]),
                                              (b_v, sig.args[8]), (bst_v, sig.args[9])))
                wp = _ptr(context, builder, sig.args[1], w_v, woff_v)
                prefetch(builder, wp, record_bytes)
                out = []
                for i in range(n):
                    c = ir.Constant(xoff_v.type, i)
                    xp = _ptr(context, builder, sig.args[3], xq_v,
                              builder.add(xoff_v, builder.mul(xst_v, c)))
                    bi = builder.add(b_v, builder.mul(bst_v, c))
                    out.append(token(context, builder, sig, dx_v, xa_v, bi, body,
                                     builder.extract_value(accs_v, i), wp, xp))
                return context.make_tuple(builder, sig.return_type, out)

            return sig, codegen

        return intrinsic(impl)

    return {n: make(n) for n in MANY_N}


def _with_min(builder, acc, wp, dx, xs):
    """acc + m * dx * sum(x codes): the min term of Q4_1/Q5_1 (m: the 8 f16 at wp + 16)."""
    m = builder.fpext(_at(builder, wp, 16, ir.VectorType(ir.HalfType(), 8)), _V8F)
    fma = _fn(builder, "llvm.fma.v8f32", _V8F, [_V8F, _V8F, _V8F])
    return builder.call(fma, [m, _splat_f(builder, builder.fmul(dx, builder.sitofp(xs, _F32))), acc])


def _steps(nibble_rows, rows_q8_0, rows_iq4_nl):
    """The six record steps (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL) over given row dots: the AVX2
    vpmaddubsw/vpmaddwd ones or the VNNI vpdpbusd ones (which also take the code sum xs). Each
    step returns acc + this record's 8 row sums, scaled (and the min term for Q4_1/Q5_1)."""

    def q4_0(builder, acc, wp, xp, dx, xs):
        # sum (q - 8) x = sum q x - 8 sum x
        sums = builder.sub(nibble_rows(builder, wp, 16, xp, None),
                           _splat_i(builder, builder.shl(xs, ir.Constant(_I32, 3))))
        return _scaled(builder, acc, sums, wp, dx)

    def q4_1(builder, acc, wp, xp, dx, xs):
        acc = _scaled(builder, acc, nibble_rows(builder, wp, 32, xp, None), wp, dx)
        return _with_min(builder, acc, wp, dx, xs)

    def q5_0(builder, acc, wp, xp, dx, xs):
        qh = _at(builder, wp, 16, _V8D)
        sums = builder.sub(nibble_rows(builder, wp, 48, xp, qh),
                           _splat_i(builder, builder.shl(xs, ir.Constant(_I32, 4))))
        return _scaled(builder, acc, sums, wp, dx)

    def q5_1(builder, acc, wp, xp, dx, xs):
        qh = _at(builder, wp, 32, _V8D)
        acc = _scaled(builder, acc, nibble_rows(builder, wp, 64, xp, qh), wp, dx)
        return _with_min(builder, acc, wp, dx, xs)

    def q8_0(builder, acc, wp, xp, dx, xs):
        return _scaled(builder, acc, rows_q8_0(builder, wp, xp, xs), wp, dx)

    def iq4_nl(builder, acc, wp, xp, dx, xs):
        return _scaled(builder, acc, rows_iq4_nl(builder, wp, xp, xs), wp, dx)

    # record bytes: 8 GGUF blocks
    return (_step(q4_0, 144), _step(q4_1, 160), _step(q5_0, 176), _step(q5_1, 192),
            _step(q8_0, 272), _step(iq4_nl, 144))


x8_q4_0, x8_q4_1, x8_q5_0, x8_q5_1, x8_q8_0, x8_iq4_nl = _steps(
    _nibble_rows, lambda b, wp, xp, xs: _rows_q8_0(b, wp, xp),
    lambda b, wp, xp, xs: _rows_iq4_nl(b, wp, xp))
# VNNI steps (compiled only where _simd.has_vnni())
x8v_q4_0, x8v_q4_1, x8v_q5_0, x8v_q5_1, x8v_q8_0, x8v_iq4_nl = _steps(
    _nibble_rows_vnni, _rows_q8_0_vnni, _rows_iq4_nl_vnni)


def vector_store(vtype, dtype, lty, align: int = 1):
    """An intrinsic f(v, out, off): out[off:off + n] = the n lanes of v (a register type
    `vtype` of LLVM type `lty`; out: C-contiguous 1-D `dtype`)."""
    def impl(typingctx, v, out, off):
        _need("out", out, dtype)
        sig = types.none(vtype, out, off)

        def codegen(context, builder, sig, args):
            p = _ptr(context, builder, sig.args[1], args[1], args[2])
            builder.store(args[0], builder.bitcast(p, lty.as_pointer()), align=align)
            return context.get_dummy_value()

        return sig, codegen

    return intrinsic(impl)


store8 = vector_store(f32x8, types.float32, _V8F)     # out[off:off + 8] = acc's 8 lanes

