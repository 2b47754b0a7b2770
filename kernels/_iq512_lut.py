"""In-register codebook steps of the avx512-iq variant for the 256-entry grids (IQ2_XXS, IQ3_XXS):
no scalar load per grid entry, no gather.

Each grid entry is stored as a 16-bit code (`_iq_grids.*_CODES`: 2 bits per value for IQ2's 3
levels, 3 for IQ3's 8), so the whole grid is 512 bytes, 8 zmm registers. Once per block
(`*_block`) the block's grid indices become word lanes and 4 vpermi2w + 3 masked blends (index
bits 6 and 7) look up 32 codes at once; the KSIGNS indices are cut out of the sign words with
vpmultishiftqb and looked up with one vpermi2b (the 128-byte KSIGNS table in two registers); the
sub-block scales are shifted into word lanes. Per 64-weight step (`*_step`) a vpermw puts each
qword's codes in its low bits, vpmultishiftqb spreads them one per byte, a vpermb turns each
code into its grid value (the magnitude); a vpermb spreads each group's sign byte over its 8
bytes and vptestmb makes the sign mask; a vpermw gives the step's scales (words).

The block state (`blk3`: codes, sign bytes, scales, as three zmm) and the step's scale words
(`i16x32`) stay in registers; steps take p (0..3) as a runtime value, added to constant control
vectors (folded once the loop over p is unrolled).
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


def _lut256(builder, idx, tabs):
    """tabs (8 x <32 x i16>, a 256-word table) at the 32 word indices idx (0..255)."""
    f = "llvm.x86.avx512.vpermi2var.hi.512"
    r = [_call(builder, f, _V32W, [tabs[2 * i], idx, tabs[2 * i + 1]]) for i in range(4)]
    zero = _c16([0] * 32)
    b6 = builder.icmp_unsigned("!=", builder.and_(idx, _c16([64] * 32)), zero)
    b7 = builder.icmp_unsigned("!=", builder.and_(idx, _c16([128] * 32)), zero)
    return builder.select(b7, builder.select(b6, r[3], r[2]), builder.select(b6, r[1], r[0]))


def _splat16(builder, v):
    s = builder.insert_element(ir.Constant(_V32W, ir.Undefined), v, ir.Constant(_I32, 0))
    return builder.shuffle_vector(s, s, _idx([0] * 32))


def _splat8(builder, v):
    s = builder.insert_element(ir.Constant(_V64B, ir.Undefined), v, ir.Constant(_I32, 0))
    return builder.shuffle_vector(s, s, _idx([0] * 64))


def _byte_words(builder, v, positions):
    """<32 x i16> whose word i is byte positions[i] of the <64 x i8> v, zero-extended."""
    mask = []
    for p in positions:
        mask += [p, 64]
    w = builder.shuffle_vector(v, ir.Constant(_V64B, [0] * 64), _idx(mask))
    return builder.bitcast(w, _V32W)


def _ksigns(builder, aux, kslo, kshi):
    """Byte 8i + k: KSIGNS of the k-th 7-bit index of the u32 pair in qword i of aux (4 per
    u32, at bits 0, 7, 14, 21 and 32, 39, 46, 53): the sign bytes of step i's 8 groups."""
    ms = _multishift(builder, _c8([0, 7, 14, 21, 32, 39, 46, 53] * 8), aux)
    return _call(builder, "llvm.x86.avx512.vpermi2var.qi.512", _V64B, [kslo, ms, kshi])


def _block_impl(xxs3: bool):
    def impl(typingctx, q, o, codes, ks):
        """The block state of the IQ2_XXS (IQ3_XXS) block at byte o of q: its grid codes
        (codes: the type's uint16 code table), KSIGNS bytes (ks: the 128 KSIGNS bytes), scales."""
        _need("q", q, types.uint8)
        _need("codes", codes, types.uint16)
        _need("ks", ks, types.uint8)
        sig = blk3(q, o, codes, ks)

        def codegen(context, builder, sig, args):
            tabs = _tables(context, builder, sig.args[2], args[2], 8, _V32W)
            kslo, kshi = _tables(context, builder, sig.args[3], args[3], 2, _V64B)
            base = builder.add(_i64(context, builder, args[1], sig.args[1]), ir.Constant(_I64, 2))
            v = _load(context, builder, sig.args[0], args[0], base, _V64B)
            # word 4q + r of a code vector: qword q, word r (see the step's vpmultishiftqb)
            if not xxs3:
                # qword j = sub-block j: 4 index bytes (groups 4j..4j + 3), then a u32 of their
                # 4 7-bit sign indices and the scale in bits 28..31; word 4q + r: group 8r + q
                g = [8 * (i % 4) + i // 4 for i in range(32)]
                ca = cb = _lut256(builder, _byte_words(builder, v, [8 * (e // 4) + e % 4
                                                                    for e in g]), tabs)
                a = builder.shuffle_vector(v, v, _idx([8 * (d // 4) + 4 + d % 4 for d in range(32)]
                                                     + list(range(32))))
            else:
                # 64 index bytes (entries of 4 weights), then 8 u32 (at byte 66) as IQ2_XXS's;
                # word 4q + r: entry 2q + r % 2 + 16 (r // 2), + 32 in the second vector
                e = [2 * (i // 4) + (i % 4) % 2 + 16 * ((i % 4) // 2) for i in range(32)]
                ca = _lut256(builder, _byte_words(builder, v, e), tabs)
                cb = _lut256(builder, _byte_words(builder, v, [x + 32 for x in e]), tabs)
                a = _load(context, builder, sig.args[0], args[0],
                          builder.add(base, ir.Constant(_I64, 64)), ir.VectorType(_I8, 32))
                a = builder.shuffle_vector(a, ir.Constant(a.type, [0] * 32), _idx(range(64)))
            # a: u32 d = sub-block d's sign indices and scale
            ks_b = _ksigns(builder, a, kslo, kshi)
            d16 = ir.VectorType(_I32, 16)
            s = builder.lshr(builder.bitcast(a, d16), ir.Constant(d16, [28] * 16))
            s = builder.or_(builder.shl(s, ir.Constant(d16, [1] * 16)), ir.Constant(d16, [1] * 16))
            st = ir.Constant(_BLK, ir.Undefined)
            for i, val in enumerate((ca, ks_b, builder.bitcast(s, _V32W), cb)):
                st = builder.insert_value(st, val, i)
            return st

        return sig, codegen

    return intrinsic(impl)


iq2xxs_block = _block_impl(False)
iq3xxs_block = _block_impl(True)


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
                _c16([0] * 16 + [2] * 16), _splat16(builder, builder.mul(p16, ir.Constant(_I16, 4)))))
            return context.make_tuple(builder, sig.return_type, [_make_w(builder, mag, neg), sc])

        return sig, codegen

    return intrinsic(impl)


iq2xxs_step = _step_impl(False)
iq3xxs_step = _step_impl(True)
