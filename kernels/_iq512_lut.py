"""In-register codebook steps of the avx512-iq variant (IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S):
no scalar load per grid entry, no gather.

Each grid entry is stored as a 16-bit code (`_iq_grids.*_CODES`: 2 bits per value for IQ2's 3
levels, 3 for IQ3's 8), so a grid of 256 (512, 1024) entries is 8 (16, 32) zmm of words. Once per
block (`*_block`) the block's grid indices become word lanes and one vpermi2w per 64 entries plus
masked blends on the higher index bits look up 32 codes at once; 7-bit sign indices (IQ2_XXS,
IQ2_XS, IQ3_XXS) are cut out with vpmultishiftqb and looked up in KSIGNS with one vpermi2b (the
128 bytes in two registers), explicit sign bytes (IQ2_S, IQ3_S) are loaded as they are, each
step's 8 sign bytes in one qword; the scales become one word per 16 weights. Per 64-weight step
(`iq2_step`, `iq3_step`) one vpmultishiftqb spreads the step's codes one per byte (the code
vectors are laid out so that every qword holds its share of each step), a vpermb turns each code
into its grid value (the magnitude), the step's qword of sign bytes is the sign mask, a vpermw
gives the scale words.

The block state (`blk3`: codes, sign bytes, scales, more codes, as four zmm) and the step's
scale words (`i16x32`) stay in registers; steps take p (0..3) as a runtime value, added to
constant control vectors (folded once the loop over p is unrolled).
"""
from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.extending import intrinsic, models, register_model

from ._iq512_simd import _I64, _V8Q, _V32W, _V64B, _i64, _idx, _load, _make_w, i16x32, w64
from ._simd import _I8, _I16, _I32, _fn
from ._x8_simd import _need

_BLK = ir.LiteralStructType([_V32W, _V64B, _V32W, _V32W])   # codes a, sign bytes, scales, codes b


class Blk3Type(types.Type):
    def __init__(self):
        super().__init__(name="iq_blk3")


blk3 = Blk3Type()


@register_model(Blk3Type)
class _Blk3Model(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _BLK)


def _c8(values):
    return ir.Constant(_V64B, [v & 255 for v in values])


def _c16(values):
    return ir.Constant(_V32W, list(values))


def _call(builder, name, ret, args):
    return builder.call(_fn(builder, name, ret, [a.type for a in args]), args)


def _permw(builder, table, ctrl):
    return _call(builder, "llvm.x86.avx512.permvar.hi.512", _V32W, [table, ctrl])


def _permb(builder, table, ctrl):
    return _call(builder, "llvm.x86.avx512.permvar.qi.512", _V64B, [table, ctrl])


def _multishift(builder, ctrl, data):
    """Byte k of each qword: the 8 bits of the same qword of data from bit ctrl[k] (mod 64)."""
    return _call(builder, "llvm.x86.avx512.pmultishift.qb.512", _V64B, [ctrl, data])


def _tables(context, builder, aryty, ary, n, vty):
    data = builder.bitcast(context.make_array(aryty)(context, builder, ary).data,
                           vty.as_pointer())
    return [builder.load(builder.gep(data, [ir.Constant(_I32, i)]), align=1) for i in range(n)]


def _lut(builder, idx, tabs):
    """tabs (n x <32 x i16>, a 32n-word table, n = 8, 16 or 32) at the 32 word indices idx:
    vpermi2w per 64 entries (index bits 0..5), then masked blends on bits 6, 7, ..."""
    f = "llvm.x86.avx512.vpermi2var.hi.512"
    r = [_call(builder, f, _V32W, [tabs[2 * i], idx, tabs[2 * i + 1]])
         for i in range(len(tabs) // 2)]
    bit = 64
    while len(r) > 1:
        on = builder.icmp_unsigned("!=", builder.and_(idx, _c16([bit] * 32)), _c16([0] * 32))
        r = [builder.select(on, r[2 * i + 1], r[2 * i]) for i in range(len(r) // 2)]
        bit *= 2
    return r[0]


def _splat16(builder, v):
    s = builder.insert_element(ir.Constant(_V32W, ir.Undefined), v, ir.Constant(_I32, 0))
    return builder.shuffle_vector(s, s, _idx([0] * 32))


def _splat8(builder, v):
    s = builder.insert_element(ir.Constant(_V64B, ir.Undefined), v, ir.Constant(_I32, 0))
    return builder.shuffle_vector(s, s, _idx([0] * 64))


def _words(builder, v, positions, byte: bool):
    """<32 x i16> whose word i is byte (byte) or word positions[i] of the vector v, zero-
    extended."""
    if byte:
        mask = []
        for p in positions:
            mask += [p, 64]
        w = builder.shuffle_vector(v, ir.Constant(_V64B, [0] * 64), _idx(mask))
        return builder.bitcast(w, _V32W)
    return builder.shuffle_vector(v, v, _idx(positions))


def _ksigns(builder, data, bits, kslo, kshi):
    """Byte 8i + k: KSIGNS[the 7 bits from bit bits[k] of qword i of data]."""
    ms = _multishift(builder, _c8(list(bits) * 8), data)
    return _call(builder, "llvm.x86.avx512.vpermi2var.qi.512", _V64B, [kslo, ms, kshi])


def _pad(builder, v, n):
    """v widened to n lanes (zeros above)."""
    m = v.type.count
    return builder.shuffle_vector(v, ir.Constant(v.type, [0] * m),
                                  _idx(list(range(m)) + [m] * (n - m)))


def _nib_scales(builder, b8, per16: bool, odd_bias: int):
    """Words i = 0..15: odd_bias + 2 * (the 4-bit scale of 16-weight group i) from the bytes
    b8 (<n x i8>): nibble i of them (per16) or nibble i // 2 (one scale per sub-block)."""
    v16 = ir.VectorType(_I16, 16)
    nib = [i if per16 else i // 2 for i in range(16)]
    s = builder.zext(builder.shuffle_vector(b8, b8, _idx([n // 2 for n in nib])), v16)
    s = builder.and_(builder.lshr(s, ir.Constant(v16, [4 * (n % 2) for n in nib])),
                     ir.Constant(v16, [15] * 16))
    s = builder.or_(builder.shl(s, ir.Constant(v16, [1] * 16)), ir.Constant(v16, [odd_bias] * 16))
    return _pad(builder, s, 32)


# Code vector layouts (word 4q + r = qword q, word r; the step's vpmultishiftqb picks a step's
# codes from every qword): IQ2 (8 values a code) word 4q + r = group 8r + q (step r); IQ3 (4
# values) the first vector's word 4q + r = entry 2q + r % 2 + 16 (r // 2), the second's + 32
G2 = [8 * (i % 4) + i // 4 for i in range(32)]
E3 = [2 * (i // 4) + (i % 4) % 2 + 16 * ((i % 4) // 2) for i in range(32)]


def _xxs2(builder, load, ks):
    v = load(2, _V64B)   # qword j = sub-block j: 4 index bytes, a u32 of 4 sign indices + scale
    idx = [_words(builder, v, [8 * (g // 4) + g % 4 for g in G2], True)]
    aux = builder.shuffle_vector(v, v, _idx([8 * (d // 4) + 4 + d % 4 for d in range(32)]
                                            + list(range(32))))
    return idx, aux, _ksigns(builder, aux, (0, 7, 14, 21, 32, 39, 46, 53), *ks)


def _xxs3(builder, load, ks):
    v = load(2, _V64B)   # 64 index bytes, then 8 u32 as IQ2_XXS's
    idx = [_words(builder, v, [e + 32 * h for e in E3], True) for h in range(2)]
    aux = _pad(builder, load(66, ir.VectorType(_I8, 32)), 64)
    return idx, aux, _ksigns(builder, aux, (0, 7, 14, 21, 32, 39, 46, 53), *ks)


def _aux_scales(builder, aux):
    """Words i: 2 (u32 i // 2 of aux >> 28) + 1 (the XXS types' sub-block scales)."""
    d16 = ir.VectorType(_I32, 16)
    s = builder.lshr(builder.bitcast(aux, d16), ir.Constant(d16, [28] * 16))
    s = builder.or_(builder.shl(s, ir.Constant(d16, [1] * 16)), ir.Constant(d16, [1] * 16))
    return builder.bitcast(builder.or_(s, builder.shl(s, ir.Constant(d16, [16] * 16))), _V32W)


def _hi_bits(builder, lo, qh, per, width):
    """f(entries): word indices lo(entries) | ((qh[e // per] >> width * (e % per)) &
    (2^width - 1)) << 8 for the entries e (lo: their low bytes as words; qh: bytes)."""
    def impl(entries):
        h = builder.zext(builder.shuffle_vector(qh, qh, _idx([e // per for e in entries])), _V32W)
        h = builder.lshr(h, _c16([width * (e % per) for e in entries]))
        h = builder.and_(h, _c16([(1 << width) - 1] * 32))
        return builder.or_(lo(entries), builder.shl(h, _c16([8] * 32)))
    return impl


def _block_codegen(kind):
    def codegen(context, builder, sig, args):
        o64 = _i64(context, builder, args[1], sig.args[1])

        def load(off, vty):
            return _load(context, builder, sig.args[0], args[0],
                         builder.add(o64, ir.Constant(_I64, off)), vty)

        codes_ty, codes = sig.args[2], args[2]
        n = {"xxs2": 8, "xxs3": 8, "xs2": 16, "s2": 32, "s3": 16}[kind]
        tabs = _tables(context, builder, codes_ty, codes, n, _V32W)
        if kind in ("xxs2", "xxs3", "xs2"):
            ks = _tables(context, builder, sig.args[3], args[3], 2, _V64B)
        if kind == "xxs2":
            idx, aux, sb = _xxs2(builder, load, ks)
            sc = _aux_scales(builder, aux)
        elif kind == "xxs3":
            idx, aux, sb = _xxs3(builder, load, ks)
            sc = _aux_scales(builder, aux)
        elif kind == "xs2":
            v = load(2, _V32W)   # 32 u16: bits 0..8 the index, 9..15 the sign index
            idx = [builder.and_(_words(builder, v, G2, False), _c16([511] * 32))]
            sb = _ksigns(builder, builder.bitcast(v, _V64B), (9, 25, 41, 57) * 2, *ks)
            # qword j holds groups 4j..4j + 3 (twice): step p's are qwords 2p, 2p + 1
            sb = builder.shuffle_vector(sb, sb, _idx([8 * (2 * (m // 8) + (m % 8) // 4) + m % 4
                                                      for m in range(64)]))
            sc = _nib_scales(builder, load(66, ir.VectorType(_I8, 8)), True, 1)
        elif kind == "s2":
            qs, qh = load(2, ir.VectorType(_I8, 32)), load(66, ir.VectorType(_I8, 8))
            idx = [_hi_bits(builder, lambda es: builder.zext(builder.shuffle_vector(
                qs, qs, _idx(es)), _V32W), qh, 4, 2)(G2)]
            sb = _pad(builder, load(34, ir.VectorType(_I8, 32)), 64)   # a sign byte per group
            sc = _nib_scales(builder, load(74, ir.VectorType(_I8, 8)), True, 1)
        else:   # s3
            qs, qh = load(2, _V64B), load(66, ir.VectorType(_I8, 8))
            hb = _hi_bits(builder, lambda es: builder.zext(builder.shuffle_vector(
                qs, qs, _idx(es)), _V32W), qh, 8, 1)
            idx = [hb([e + 32 * h for e in E3]) for h in range(2)]
            sb = _pad(builder, load(74, ir.VectorType(_I8, 32)), 64)   # a sign byte per 8
            sc = _nib_scales(builder, load(106, ir.VectorType(_I8, 4)), False, 1)
        ca = _lut(builder, idx[0], tabs)
        cb = _lut(builder, idx[1], tabs) if len(idx) > 1 else ca
        st = ir.Constant(_BLK, ir.Undefined)
        for i, val in enumerate((ca, sb, sc, cb)):
            st = builder.insert_value(st, val, i)
        return st

    return codegen


def _block_ks(kind):
    def impl(typingctx, q, o, codes, ks):
        """The block state at byte o of q (codes: the type's uint16 code table; ks: KSIGNS)."""
        _need("q", q, types.uint8)
        _need("codes", codes, types.uint16)
        _need("ks", ks, types.uint8)
        return blk3(q, o, codes, ks), _block_codegen(kind)

    return intrinsic(impl)


def _block(kind):
    def impl(typingctx, q, o, codes):
        """The block state at byte o of q (codes: the type's uint16 code table)."""
        _need("q", q, types.uint8)
        _need("codes", codes, types.uint16)
        return blk3(q, o, codes), _block_codegen(kind)

    return intrinsic(impl)


iq2xxs_block = _block_ks("xxs2")
iq3xxs_block = _block_ks("xxs3")
iq2xs_block = _block_ks("xs2")
iq2s_block = _block("s2")
iq3s_block = _block("s3")


def _step_impl(xxs3: bool):
    def impl(typingctx, st, p, vals):
        """(w64, scale words) of weights 64p..64p + 63 of the block state st; vals: the 64-byte
        code -> grid value table."""
        _need("vals", vals, types.uint8)
        sig = types.Tuple((w64, i16x32))(blk3, p, vals)

        def codegen(context, builder, sig, args):
            st, pv = args[0], _i64(context, builder, args[1], sig.args[1])
            vtab = _tables(context, builder, sig.args[2], args[2], 1, _V64B)[0]
            p8 = builder.trunc(pv, _I8)
            p16 = builder.trunc(pv, _I16)
            if not xxs3:
                # qword q: codes of groups q, 8 + q, 16 + q, 24 + q; step p's at bits 16p..
                codes = builder.extract_value(st, 0)
                spread = _c8([2 * (k % 8) for k in range(64)])
                shift = builder.mul(p8, ir.Constant(_I8, 16))
            else:
                # codes of entries 0..31 (steps 0, 1) or 32..63 (steps 2, 3); qword q: entries
                # 2q, 2q + 1 of step 0 (2), 16 + 2q, 17 + 2q of step 1 (3)
                codes = builder.select(builder.icmp_signed(">=", pv, ir.Constant(_I64, 2)),
                                       builder.extract_value(st, 3), builder.extract_value(st, 0))
                spread = _c8([(3 * k if k < 4 else 16 + 3 * (k - 4)) for _ in range(8)
                              for k in range(8)])
                shift = builder.mul(builder.and_(p8, ir.Constant(_I8, 1)), ir.Constant(_I8, 32))
            ctl = builder.add(spread, _splat8(builder, shift))
            mag = _permb(builder, vtab, _multishift(builder, ctl, builder.bitcast(codes, _V64B)))
            ks = builder.bitcast(builder.extract_value(st, 1), _V8Q)
            neg = builder.bitcast(builder.extract_element(ks, pv), ir.VectorType(ir.IntType(1), 64))
            sc = _permw(builder, builder.extract_value(st, 2), builder.add(
                _c16([w // 8 for w in range(32)]),
                _splat16(builder, builder.mul(p16, ir.Constant(_I16, 4)))))
            return context.make_tuple(builder, sig.return_type, [_make_w(builder, mag, neg), sc])

        return sig, codegen

    return intrinsic(impl)


iq2_step = _step_impl(False)    # IQ2_XXS, IQ2_XS, IQ2_S
iq3_step = _step_impl(True)     # IQ3_XXS, IQ3_S
