"""AVX-512 steps of the record kernels that take two groups of rows at once: 16 rows in one zmm
register (the avx512vnni-x16 variant of Q4_K, Q5_K, Q6_K, and of Q4_0 and Q8_0). Decode puts its two streams'
records side by side; the token tiles (prefill, batched decode) take groups g and g + 1.

The records and activations are those of the 8-row VNNI steps (`_kx8_simd`, `kquant_x8`;
`_x8_simd` for the 32-weight types): each
32-byte chunk of one group's record and the same chunk of the other's make one 64-byte vector
(two loads, vinserti64x4), so every unpacking op and every vpdpbusd works on both groups, the
activation bytes broadcast {1to16} from memory. Per token and 16 rows that is the instruction
count the ymm steps spend on 8: where 512-bit ops run at full width (measured on AMD Zen 5) the
work per weight halves; AMD Zen 4 splits them in two, so there it can gain only the front end's
share. Calibration times it per CPU like any variant. Each record step of a tile starts with
`_step_fence` (see there: without it LLVM spilled the whole tile).

Each lane does exactly what the 8-row VNNI step does for its row (same integer sums, which are
exact, then the same float ops in the same order), so results are bit-identical to it.
"""
from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.extending import intrinsic, models, register_model

from ._simd import _F32, _I8, _I16, _I32, _V32B, _fn, _ptr, f32x8, prefetch
from ._kx8_simd import q6_codes
from ._x8_simd import _at, _need

_V64B = ir.VectorType(_I8, 64)
_V32W = ir.VectorType(_I16, 32)
_V16D = ir.VectorType(_I32, 16)
_V16F = ir.VectorType(_F32, 16)


class F32x16Type(types.Type):
    def __init__(self):
        super().__init__(name="f32x16")


f32x16 = F32x16Type()       # the token tiles' accumulators: 16 rows (two groups) in one zmm


@register_model(F32x16Type)
class _F32x16Model(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _V16F)


@intrinsic
def vzero16(typingctx):
    def codegen(context, builder, sig, args):
        return ir.Constant(_V16F, [0.0] * 16)

    return f32x16(), codegen


def _half_of(hi: int):
    def impl(typingctx, acc):
        def codegen(context, builder, sig, args):
            return _half(builder, args[0], hi)

        return f32x8(f32x16), codegen

    return intrinsic(impl)


lo8, hi8 = _half_of(0), _half_of(1)     # the first group's 8 rows, the second's


def _idx(values):
    return ir.Constant(ir.VectorType(_I32, len(values)), list(values))


def _cat(builder, a, b):
    n = a.type.count
    return builder.shuffle_vector(a, b, _idx(range(2 * n)))


def _half(builder, v, hi: int):
    n = v.type.count // 2
    return builder.shuffle_vector(v, v, _idx(range(hi * n, hi * n + n)))


def _at2(builder, wps, off, vty):
    """The `vty` at wps[0] + off followed by the one at wps[1] + off (the two groups' records)."""
    return _cat(builder, _at(builder, wps[0], off, vty), _at(builder, wps[1], off, vty))


def _splat(vty, value):
    return ir.Constant(vty, [value] * vty.count)


def _bcast(builder, p, off):
    """The 4 bytes at p + off in all 16 lanes (folded into vpdpbusd as {1to16})."""
    v = builder.load(builder.bitcast(builder.gep(p, [ir.Constant(_I32, off)]), _I32.as_pointer()),
                     align=1)
    v = builder.insert_element(ir.Constant(_V16D, ir.Undefined), v, ir.Constant(_I32, 0))
    return builder.shuffle_vector(v, v, _idx([0] * 16))


def _dpbusd(builder, acc, u, s):
    fn = _fn(builder, "llvm.x86.avx512.vpdpbusd.512", _V16D, [_V16D, _V16D, _V16D])
    acc = _splat(_V16D, 0) if acc is None else acc
    return builder.call(fn, [acc, builder.bitcast(u, _V16D), builder.bitcast(s, _V16D)])


def _maddwd(builder, a, b):
    fn = _fn(builder, "llvm.x86.avx512.pmaddw.d.512", _V16D, [_V32W, _V32W])
    return builder.call(fn, [a, b])


def _step_fence(builder, sums):
    """An empty asm statement that clobbers memory and passes `sums` (the tokens' running int32
    sums) through registers: LLVM then finishes each record step, its products added into the
    sums, before it loads the next step's bytes. Left alone, its scheduler hoists every step's
    loads and unpacking to the top of a token tile, or leaves the partial sums for the end, and
    spills them all to the stack, where the spill stores can also alias the activation loads
    (4K aliasing, measured as a 1.7x swing between runs)."""
    live = [v for v in sums if v is not None]
    if not live:
        builder.asm(ir.FunctionType(ir.VoidType(), []), "", "~{memory}", [], side_effect=True)
        return sums
    n = len(live)
    cons = ",".join(["=v"] * n + [str(i) for i in range(n)] + ["~{memory}"])
    ret = ir.LiteralStructType([v.type for v in live]) if n > 1 else live[0].type
    out = builder.asm(ir.FunctionType(ret, [v.type for v in live]), "", cons, live,
                      side_effect=True)
    it = iter([builder.extract_value(out, i) for i in range(n)] if n > 1 else [out])
    return [next(it) if v is not None else None for v in sums]


def _fma(builder, a, b, c):
    return builder.call(_fn(builder, "llvm.fma.v16f32", _V16F, [_V16F] * 3), [a, b, c])


def _f16(builder, wps, off):
    """The 8 f16 at off of each record as 16 floats (vcvtph2ps)."""
    h = _at2(builder, wps, off, ir.VectorType(ir.HalfType(), 8))
    return builder.fpext(h, _V16F)


def _bytes(builder, wps, off, signed):
    """8 bytes at off of each record (one per row) as 16 int32."""
    v = _at2(builder, wps, off, ir.VectorType(_I8, 8))
    return builder.sext(v, _V16D) if signed else builder.zext(v, _V16D)


def _dup_u8(builder, wps, off):
    """_kx8_simd._dup_u8 of both records: row i's byte in int16 lanes 2i and 2i + 1."""
    v = _bytes(builder, wps, off, False)
    return builder.bitcast(builder.or_(v, builder.shl(v, _splat(_V16D, 16))), _V32W)


def _pair16(builder, bp, k):
    """int16 xb[2k], xb[2k + 1] in every int32 lane."""
    return builder.bitcast(_bcast(builder, bp, 4 * k), _V32W)


def _splat_f(builder, v):
    vs = builder.insert_element(ir.Constant(_V16F, ir.Undefined), v, ir.Constant(_I32, 0))
    return builder.shuffle_vector(vs, vs, _idx([0] * 16))


def _q45_k(builder, accs, wps, xps, bps, dxs, qs_at, qh_at):
    """_kx8_simd._q45_k_vnni on two records, for each token (xps, bps, dxs, accs: one each)."""
    low, bit4 = _splat(_V64B, 0x0F), _splat(_V64B, 0x10)
    n = len(accs)
    chains = 2 if n <= 4 else 1     # 8 tokens' chains overlap enough, and 2 each would spill
    isum = [None] * n
    for p in range(4):
        if qh_at is not None and n <= 4:   # Q5_K's qh unpacking spills without (Q4_K: faster)
            isum = _step_fence(builder, isum)     # per chunk row p: its bytes serve both nibbles
        for t in range(2):                    # sub-block j = 2p + t
            j = 2 * p + t
            if n > 4:
                isum = _step_fence(builder, isum)
            ch = [[None, None] for _ in range(n)]
            for k in range(8):
                q = _at2(builder, wps, qs_at + 32 * (8 * p + k), _V32B)
                v = builder.and_(q if t == 0 else builder.lshr(q, _splat(_V64B, 4)), low)
                if qh_at is not None:         # bit j of the qh byte -> bit 4
                    h = _at2(builder, wps, qh_at + 32 * k, _V32B)
                    h = builder.shl(h, _splat(_V64B, 4 - j)) if j <= 4 else \
                        builder.lshr(h, _splat(_V64B, j - 4))
                    v = builder.or_(v, builder.and_(h, bit4))
                for i in range(n):
                    c = ch[i]
                    c[k % chains] = _dpbusd(builder, c[k % chains], v,
                                            _bcast(builder, xps[i], 32 * j + 4 * k))
            sc = _bytes(builder, wps, 32 + 8 * j, False)
            for i in range(n):
                c = ch[i]
                part = builder.mul(c[0] if c[1] is None else builder.add(c[0], c[1]), sc)
                isum[i] = part if isum[i] is None else builder.add(isum[i], part)
    d, dmin = _f16(builder, wps, 0), _f16(builder, wps, 16)
    out = []
    for i in range(n):
        msum = None
        for j in range(8):
            m = _maddwd(builder, _dup_u8(builder, wps, 96 + 8 * j), _pair16(builder, bps[i], j))
            msum = m if msum is None else builder.add(msum, m)
        vdx = _splat_f(builder, dxs[i])
        acc = _fma(builder, builder.sitofp(isum[i], _V16F), builder.fmul(d, vdx), accs[i])
        neg = builder.fneg(builder.fmul(dmin, vdx))
        out.append(_fma(builder, builder.sitofp(msum, _V16F), neg, acc))
    return out


def _q6_codes(builder, wps, step):
    """_kx8_simd.q6_codes on two records."""
    return q6_codes(builder, lambda off: _at2(builder, wps, step + off, _V32B), 64)


def _q6_k(builder, accs, wps, xps, bps, dxs):
    """_kx8_simd._q6_k_v on two records, for each token."""
    n = len(accs)
    isum = [None] * n
    for t in range(16):
        isum = _step_fence(builder, isum)
        u = _q6_codes(builder, wps, 144 + 96 * t)
        pairs = _at2(builder, wps, 16 + 16 * (t // 2), ir.VectorType(_I8, 16))
        sc = builder.sext(builder.shuffle_vector(pairs, pairs, _idx(
            [16 * r + 2 * i + t % 2 for r in range(2) for i in range(8)])), _V16D)
        for i in range(n):
            ch = [None, None]
            for j in range(4):
                ch[j % 2] = _dpbusd(builder, ch[j % 2], u[j],
                                    _bcast(builder, xps[i], 16 * t + 4 * j))
            part = builder.mul(builder.add(ch[0], ch[1]), sc)
            isum[i] = part if isum[i] is None else builder.add(isum[i], part)
    d = _f16(builder, wps, 0)
    out = []
    for i in range(n):
        off = None
        for k in range(8):
            scales = builder.sext(_at2(builder, wps, 16 + 16 * k, ir.VectorType(_I8, 16)), _V32W)
            o = _maddwd(builder, scales, _pair16(builder, bps[i], k))
            off = o if off is None else builder.add(off, o)
        isum_i = builder.sub(isum[i], builder.shl(off, _splat(_V16D, 5)))
        scale = builder.fmul(d, _splat_f(builder, dxs[i]))
        out.append(_fma(builder, builder.sitofp(isum_i, _V16F), scale, accs[i]))
    return out


def _kquant_token(context, builder, arys, vals, xo, bi):
    """A K-quant token's side of block bi: (its codes' address, its 16-value sums' address as
    bytes, its scale)."""
    (xq_a, dx_a, xb_a), (xq_v, dx_v, xb_v) = arys, vals
    b16 = builder.mul(bi, ir.Constant(bi.type, 16))
    return (_ptr(context, builder, xq_a, xq_v, xo),
            builder.bitcast(_ptr(context, builder, xb_a, xb_v, b16), _I8.as_pointer()),
            builder.load(_ptr(context, builder, dx_a, dx_v, bi)))


def _block32_token(context, builder, arys, vals, xo, bi):
    """A 32-weight block type's token side of block bi: (codes' address, scale, code sum)."""
    (xq_a, dx_a, xs_a), (xq_v, dx_v, xs_v) = arys, vals
    return (_ptr(context, builder, xq_a, xq_v, xo), builder.load(_ptr(context, builder, dx_a, dx_v, bi)),
            builder.load(_ptr(context, builder, xs_a, xs_v, bi)))


def _wide(body, record_bytes, aux=types.int16, token=_kquant_token):
    """{n: the n-token two-group step, "pair": decode's two-stream step}, for a body
    `body(builder, accs, wps, *token sides)` (each token's side made by `token`, its sums array
    of dtype `aux`).

    n-token step: `f(accs, w, woff0, woff1, xq, xoff, xstride, dx, xb, b, bstride)` -> accs, a
    tuple of n f32x16 (token i's rows of the group at woff0 in lanes 0-7 of accs[i], of the
    group at woff1 in lanes 8-15: carried in zmm registers across the tile, not split into
    halves per step), token i's codes at xoff + i * xstride, its scale and sums at block
    b + i * bstride.
    The body takes the tokens together: each chunk is loaded and unpacked once and goes straight
    into every token's vpdpbusd, so only one unpacked chunk is live at a time (a body emitted
    token after token leaves all 64 chunks live for the later tokens: the 8-row tiles spill so).
    The token tiles prefetch the records 2 KB ahead.

    "pair": `f(acc0, acc1, w, woff0, woff1, xq, xoff, dx, xb, b)` -> (acc0, acc1), the shape of
    `_x8_simd`'s two-record steps, so decode's two streams (`_matmul_x8_pair_t`, which issues
    the calibrated prefetch itself) go through one zmm: 16 rows per instruction for one token."""

    def emit(context, builder, sig, w_a, xq_a, dx_a, xb_a, w_v, offs, xq_v, xoffs, dx_v, xb_v,
             bs, accs_in, tile):
        # tile: a token tile's step (prefetches; one f32x16 per token), else decode's pair
        # (its loop prefetches; two f32x8 halves per token, joined and split here)
        wps = [_ptr(context, builder, w_a, w_v, o) for o in offs]
        toks = [token(context, builder, (xq_a, dx_a, xb_a), (xq_v, dx_v, xb_v), xo, bi)
                for xo, bi in zip(xoffs, bs)]
        if tile:
            for wp in wps:
                prefetch(builder, wp, record_bytes)
            return context.make_tuple(builder, sig.return_type,
                                      body(builder, accs_in, wps, *zip(*toks)))
        accs = [_cat(builder, accs_in[2 * i], accs_in[2 * i + 1]) for i in range(len(toks))]
        out = []
        for acc in body(builder, accs, wps, *zip(*toks)):
            out += [_half(builder, acc, 0), _half(builder, acc, 1)]
        return context.make_tuple(builder, sig.return_type, out)

    def make(n):
        def impl(typingctx, accs, w, woff0, woff1, xq, xoff, xstride, dx, xb, b, bstride):
            _need("w", w, types.uint8), _need("xq", xq, types.int8)
            _need("dx", dx, types.float32), _need("xb", xb, aux)
            tup = types.UniTuple(f32x16, n)
            sig = tup(tup, w, woff0, woff1, xq, xoff, xstride, dx, xb, b, bstride)

            def codegen(context, builder, sig, args):
                accs_v, w_v, o0, o1, xq_v, xoff_v, xst_v, dx_v, xb_v, b_v, bst_v = args
                xoff_v, xst_v, b_v, bst_v = (context.cast(builder, v, t, types.intp) for v, t in
                                             ((xoff_v, sig.args[5]), (xst_v, sig.args[6]),
                                              (b_v, sig.args[9]), (bst_v, sig.args[10])))
                at = [ir.Constant(xoff_v.type, i) for i in range(n)]
                return emit(context, builder, sig, sig.args[1], sig.args[4], sig.args[7],
                            sig.args[8], w_v, (o0, o1), xq_v,
                            [builder.add(xoff_v, builder.mul(xst_v, c)) for c in at],
                            dx_v, xb_v, [builder.add(b_v, builder.mul(bst_v, c)) for c in at],
                            [builder.extract_value(accs_v, i) for i in range(n)], True)

            return sig, codegen

        return intrinsic(impl)

    def pair(typingctx, acc0, acc1, w, woff0, woff1, xq, xoff, dx, xb, b):
        _need("w", w, types.uint8), _need("xq", xq, types.int8)
        _need("dx", dx, types.float32), _need("xb", xb, aux)
        sig = types.UniTuple(f32x8, 2)(f32x8, f32x8, w, woff0, woff1, xq, xoff, dx, xb, b)

        def codegen(context, builder, sig, args):
            a0, a1, w_v, o0, o1, xq_v, xoff_v, dx_v, xb_v, b_v = args
            return emit(context, builder, sig, sig.args[2], sig.args[5], sig.args[7], sig.args[8],
                        w_v, (o0, o1), xq_v, [xoff_v], dx_v, xb_v, [b_v], [a0, a1], False)

        return sig, codegen

    return {**{n: make(n) for n in (1, 2, 4, 8)}, "pair": intrinsic(pair)}


kx16_q4_k = _wide(lambda *a: _q45_k(*a, 160, None), 1184)
kx16_q5_k = _wide(lambda *a: _q45_k(*a, 416, 160), 1440)
kx16_q6_k = _wide(_q6_k, 1680)


def _scaled16(builder, acc, sums, wps, dx):
    """_x8_simd._scaled on two records: acc + float(sums) * (their 16 f16 scales) * dx."""
    s = builder.fmul(_f16(builder, wps, 0), _splat_f(builder, dx))
    return _fma(builder, builder.sitofp(sums, _V16F), s, acc)


def _less_xsum(builder, sums, xs, shift: int):
    """sums - (xs << shift) in every lane (the weights' offset times the token's code sum)."""
    return builder.sub(sums, _bcast_i32(builder, builder.shl(xs, ir.Constant(_I32, shift))))


def _bcast_i32(builder, v):
    vs = builder.insert_element(ir.Constant(_V16D, ir.Undefined), v, ir.Constant(_I32, 0))
    return builder.shuffle_vector(vs, vs, _idx([0] * 16))


def _q4_0(builder, accs, wps, xps, dxs, xss):
    """_x8_simd's VNNI Q4_0 step (_nibble_rows_vnni, then - 8 sum x) on two records, for each
    token: each 64-byte chunk unpacked once, then every token's two vpdpbusd."""
    low, four = _splat(_V64B, 0x0F), _splat(_V64B, 4)
    n = len(accs)
    lo, hi = [None] * n, [None] * n
    lo = _step_fence(builder, lo)
    for c in range(4):
        q = _at2(builder, wps, 16 + 32 * c, _V32B)
        ql, qh = builder.and_(q, low), builder.and_(builder.lshr(q, four), low)
        for i in range(n):
            lo[i] = _dpbusd(builder, lo[i], ql, _bcast(builder, xps[i], 4 * c))
            hi[i] = _dpbusd(builder, hi[i], qh, _bcast(builder, xps[i], 16 + 4 * c))
    return [_scaled16(builder, accs[i], _less_xsum(builder, builder.add(lo[i], hi[i]), xss[i], 3),
                      wps, dxs[i]) for i in range(n)]


def _q8_0(builder, accs, wps, xps, dxs, xss):
    """_x8_simd's VNNI Q8_0 step (codes + 128 as u8, then - 128 sum x) on two records."""
    bias = _splat(_V64B, 0x80)
    n = len(accs)
    ch = [[None, None] for _ in range(n)]
    _step_fence(builder, [])
    for c in range(8):
        u = builder.xor(_at2(builder, wps, 16 + 32 * c, _V32B), bias)
        for i in range(n):
            ch[i][c % 2] = _dpbusd(builder, ch[i][c % 2], u, _bcast(builder, xps[i], 4 * c))
    return [_scaled16(builder, accs[i], _less_xsum(builder, builder.add(*ch[i]), xss[i], 7),
                      wps, dxs[i]) for i in range(n)]


kx16_q4_0 = _wide(_q4_0, 144, types.int32, _block32_token)
kx16_q8_0 = _wide(_q8_0, 272, types.int32, _block32_token)
