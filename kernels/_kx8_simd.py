"""AVX2 steps of the 8-row interleaved K-quant kernels (Q2_K..Q6_K, IQ4_XS; record layouts in
`kquant_x8.py`).

As in `_x8_simd` (Q4_0/Q8_0), one call handles one super-block column (256 weights) of a group of
8 rows, with the quants interleaved 4 bytes per row per 32-byte chunk, so vpmaddubsw against the
4 matching activation bytes broadcast to all lanes (vpbroadcastd) leaves row i's partial sums in
lanes 2i, 2i + 1 and chunks add up vertically. The sub-block scale is applied by vpmaddwd with
the scale repeated in both int16 halves of lane i; the activations are Q8_K-style (one float
scale per 256, `xb` = int16 sums of the codes per 16), so the whole super-block stays an exact
int32 sum per row until one float multiply-add with d * dx.

Bounds (x codes |x| <= 127):
  Q4_K: one vpmaddubsw lane <= 2*15*127 = 3810; 8 chunks of one 32-weight sub-block add in int16
        to <= 30480 < 32767. Times a 6-bit scale in vpmaddwd: |lane| <= 2*30480*63; 8 sub-blocks
        sum to < 2^25. Mins: sum_j m_j * (xb[2j] + xb[2j+1]) <= 8*63*2*2032.
  Q5_K: codes <= 31, lane <= 7874, so 4 chunks at a time in int16 (<= 31496); the rest as Q4_K.
  Q3_K: codes q + 4 <= 7 (lane <= 1778), 4 chunks per 16-weight sub-block in int16, int8
        scales (|sc| <= 32); the -4 offset as 4 * sum_s sc_s * xb_s.
  Q2_K: codes <= 3 (lane <= 762), 4-bit scales and mins.
  IQ4_XS: table values |w| <= 127, lane <= 2*127*127 = 32258: each half-chunk goes to int32 by
        vpmaddwd with the scale (|sc| <= 32): |isum| <= 64 * 2*32258*32 < 2^28.
  Q6_K: codes u = q + 32 in 0..63 go through vpmaddubsw: lane <= 2*63*127 = 16002, so only two
        chunks add in int16 (<= 32004) before vpmaddwd with the int8 scale; the -32 offset is
        taken off once per block as 32 * sum_s sc_s * xb_s.

VNNI steps (`kx8v_*`, the avx512vnni-x8 variant; same records and activations): vpdpbusd adds
4 u8 x s8 products per lane straight into int32 (the activation broadcast folded in as {1to8}),
so a sub-block's codes . x is one int32 per row with no int16 stage; the sub-block scale is then
applied by one vpmulld (Q4_K/Q5_K: lane <= 32 * 31 * 127 times 63; Q6_K: 16 * 63 * 127 times
|sc| <= 128: all < 2^31). Two chains per sub-block (even and odd chunks) let consecutive
vpdpbusd overlap. Mins and offsets come off as in the AVX2 steps.

Numba caches compiled kernels by the source file of the kernel (kquant_x8.py), not of these
steps: after editing this file, touch kquant_x8.py (or clear __pycache__).
"""
from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from ._simd import _I32, _V8D, _V8F, _V16W, _V32B, _fn, _ptr, _splat8, dpbusd, f32x8
from ._x8_simd import _MANY, _at, _bcast32, _need, _splat_f, many_steps

_I8 = ir.IntType(8)


def _maddubs(builder, u, s):
    return builder.call(_fn(builder, "llvm.x86.avx2.pmadd.ub.sw", _V16W, [_V32B, _V32B]), [u, s])


def _maddwd(builder, a, b):
    return builder.call(_fn(builder, "llvm.x86.avx2.pmadd.wd", _V8D, [_V16W, _V16W]), [a, b])


def _dup_u8(builder, p, off):
    """8 unsigned bytes at p + off -> <16 x i16> with byte i in lanes 2i and 2i + 1."""
    v = builder.zext(_at(builder, p, off, ir.VectorType(_I8, 8)), _V8D)   # vpmovzxbd
    v = builder.or_(v, builder.shl(v, ir.Constant(_V8D, [16] * 8)))
    return builder.bitcast(v, _V16W)


def _dup_s8(builder, p, off):
    """8 signed bytes at p + off -> <16 x i16> with byte i in lanes 2i and 2i + 1."""
    v = builder.sext(_at(builder, p, off, ir.VectorType(_I8, 8)), _V8D)   # vpmovsxbd
    low16 = builder.and_(v, ir.Constant(_V8D, [0xFFFF] * 8))
    return builder.bitcast(builder.or_(low16, builder.shl(v, ir.Constant(_V8D, [16] * 8))), _V16W)


def _pair16(builder, bp, k):
    """int16 xb[2k], xb[2k + 1] (bytes 4k.. of bp) in every int32 lane (one vpbroadcastd)."""
    return builder.bitcast(_bcast32(builder, bp, 4 * k), _V16W)


def _f16x8(builder, p, off):
    return builder.fpext(_at(builder, p, off, ir.VectorType(ir.HalfType(), 8)), _V8F)


def _fma(builder, a, b, c):
    return builder.call(_fn(builder, "llvm.fma.v8f32", _V8F, [_V8F, _V8F, _V8F]), [a, b, c])


def _q45_k(builder, acc, wp, xp, bp, dx, qs_at, qh_at):
    """Q4_K / Q5_K record: d[8] f16 | dmin[8] f16 | sc[8 sub][8 rows] u8 | mn[8 sub][8 rows] u8 |
    (Q5_K: 8 chunks of qh at qh_at) | 32 chunks of qs at qs_at. Chunk c holds quant bytes
    4c..4c+3 of each row: bytes 32p..32p+31 of a row are sub-blocks 2p (low nibbles) and 2p + 1
    (high nibbles), so chunks 8p..8p+7 make sub-blocks 2p, 2p + 1; Q5_K's fifth bit of weight
    32j + l is bit j of qh byte l (qh chunk l // 4). Q4_K codes (<= 15) add 8 chunks in int16,
    Q5_K codes (<= 31) only 4 (4 * 2*31*127 = 31496 < 32767)."""
    low = _splat8(builder, 0x0F, 32)
    bit4 = _splat8(builder, 0x10, 32)
    per16 = 8 if qh_at is None else 4
    isum = None
    for p in range(4):
        # each chunk's two nibbles at once (sub-blocks 2p and 2p + 1 side by side), so a chunk
        # is dead after its step: few values live at once, fewer register spills (stack stores)
        # in the decode loop (see `_x8_loops`)
        acc16 = [None, None]
        for k in range(8):
            q = _at(builder, wp, qs_at + 32 * (8 * p + k), _V32B)
            for t in range(2):                # sub-block j = 2p + t
                j = 2 * p + t
                v = builder.and_(q if t == 0 else builder.lshr(q, _splat8(builder, 4, 32)), low)
                if qh_at is not None:         # bit j of the qh byte -> bit 4
                    h = _at(builder, wp, qh_at + 32 * k, _V32B)
                    h = builder.shl(h, _splat8(builder, 4 - j, 32)) if j <= 4 else \
                        builder.lshr(h, _splat8(builder, j - 4, 32))
                    v = builder.or_(v, builder.and_(h, bit4))
                d = _maddubs(builder, v, _bcast32(builder, xp, 32 * j + 4 * k))
                acc16[t] = d if acc16[t] is None else builder.add(acc16[t], d)
                if (k + 1) % per16 == 0:
                    part = _maddwd(builder, acc16[t], _dup_u8(builder, wp, 32 + 8 * j))
                    isum = part if isum is None else builder.add(isum, part)
                    acc16[t] = None
    msum = None
    for j in range(8):  # m_j * (xb[2j] + xb[2j + 1]): the two int16 sums of sub-block j
        xbj = _pair16(builder, bp, j)
        m = _maddwd(builder, _dup_u8(builder, wp, 96 + 8 * j), xbj)
        msum = m if msum is None else builder.add(msum, m)
    vdx = _splat_f(builder, dx)
    acc = _fma(builder, builder.sitofp(isum, _V8F), builder.fmul(_f16x8(builder, wp, 0), vdx), acc)
    neg = builder.fneg(builder.fmul(_f16x8(builder, wp, 16), vdx))
    return _fma(builder, builder.sitofp(msum, _V8F), neg, acc)


def _sc32(builder, p, off, signed):
    """8 bytes at p + off (one per row) as <8 x i32> (vpmovzxbd / vpmovsxbd)."""
    v = _at(builder, p, off, ir.VectorType(_I8, 8))
    return builder.sext(v, _V8D) if signed else builder.zext(v, _V8D)


def _q45_k_vnni(builder, acc, wp, xp, bp, dx, qs_at, qh_at):
    """_q45_k with vpdpbusd: sub-block j's 8 chunks (two chains) give codes . x in int32 per
    row, times its scale by vpmulld."""
    low = _splat8(builder, 0x0F, 32)
    bit4 = _splat8(builder, 0x10, 32)
    isum = None
    for p in range(4):
        for t in range(2):                    # sub-block j = 2p + t
            j = 2 * p + t
            ch = [None, None]
            for k in range(8):
                q = _at(builder, wp, qs_at + 32 * (8 * p + k), _V32B)
                v = builder.and_(q if t == 0 else builder.lshr(q, _splat8(builder, 4, 32)), low)
                if qh_at is not None:         # bit j of the qh byte -> bit 4
                    h = _at(builder, wp, qh_at + 32 * k, _V32B)
                    h = builder.shl(h, _splat8(builder, 4 - j, 32)) if j <= 4 else \
                        builder.lshr(h, _splat8(builder, j - 4, 32))
                    v = builder.or_(v, builder.and_(h, bit4))
                ch[k % 2] = dpbusd(builder, ch[k % 2], v, _bcast32(builder, xp, 32 * j + 4 * k))
            part = builder.mul(builder.add(ch[0], ch[1]), _sc32(builder, wp, 32 + 8 * j, False))
            isum = part if isum is None else builder.add(isum, part)
    msum = None
    for j in range(8):  # m_j * (xb[2j] + xb[2j + 1]): the two int16 sums of sub-block j
        m = _maddwd(builder, _dup_u8(builder, wp, 96 + 8 * j), _pair16(builder, bp, j))
        msum = m if msum is None else builder.add(msum, m)
    vdx = _splat_f(builder, dx)
    acc = _fma(builder, builder.sitofp(isum, _V8F), builder.fmul(_f16x8(builder, wp, 0), vdx), acc)
    neg = builder.fneg(builder.fmul(_f16x8(builder, wp, 16), vdx))
    return _fma(builder, builder.sitofp(msum, _V8F), neg, acc)


def q6_codes(builder, load, width: int):
    """The 4 chunks of Q6_K codes u = q + 32 (0..63) of one record step (sub-block t: chunk j
    holds weights 16t + 4j + b), j = 0..3, from its 3 chunks X, Y, Z (`load(off)`: the
    `width`-byte vector at byte off of the step; 32 for one record, 64 for two side by side in
    `_kx16_simd`): u0, u1, u2 are the low 6 bits of X, Y, Z, and u3's bits 0-1, 2-3, 4-5 are
    their top 2 bits (`kquant_x8._pack_q6_k`). u3 gathers them with three 2-bit right shifts
    (vpsrlw: within each byte here, as every byte shifted holds only bits the mask kept), 11
    vector ops per step where the GGUF's ql/qh split took 17."""
    low6, top2 = _splat8(builder, 0x3F, width), _splat8(builder, 0xC0, width)
    words = ir.VectorType(ir.IntType(16), width // 2)
    two = ir.Constant(words, [2] * (width // 2))

    def shr2(v):   # a 16-bit shift (no byte mask after it: nothing crosses between bytes)
        return builder.bitcast(builder.lshr(builder.bitcast(v, words), two), v.type)

    x, y, z = (load(32 * k) for k in range(3))
    u3 = shr2(builder.and_(x, top2))
    u3 = shr2(builder.or_(u3, builder.and_(y, top2)))
    u3 = shr2(builder.or_(u3, builder.and_(z, top2)))
    return [builder.and_(x, low6), builder.and_(y, low6), builder.and_(z, low6), u3]


def _q6_codes(builder, wp, step):
    return q6_codes(builder, lambda off: _at(builder, wp, step + off, _V32B), 32)


def _q6_scales(builder, wp, k):
    """Scale pair k of the 8 rows, (sc_2k, sc_2k+1) per row, as 16 int16."""
    return builder.sext(_at(builder, wp, 16 + 16 * k, ir.VectorType(_I8, 16)), _V16W)


def _q6_finish(builder, acc, isum, wp, bp, dx):
    """acc + d * dx * (isum - 32 * sum_s sc_s * xb_s): the codes' -32 taken off once per block."""
    off = None
    for k in range(8):
        o = _maddwd(builder, _q6_scales(builder, wp, k), _pair16(builder, bp, k))
        off = o if off is None else builder.add(off, o)
    isum = builder.sub(isum, builder.shl(off, ir.Constant(_V8D, [5] * 8)))
    scale = builder.fmul(_f16x8(builder, wp, 0), _splat_f(builder, dx))
    return _fma(builder, builder.sitofp(isum, _V8F), scale, acc)


def _q4_k_v(builder, acc, wp, xp, bp, dx):
    return _q45_k_vnni(builder, acc, wp, xp, bp, dx, 160, None)


def _q5_k_v(builder, acc, wp, xp, bp, dx):
    return _q45_k_vnni(builder, acc, wp, xp, bp, dx, 416, 160)


def _q6_k_v(builder, acc, wp, xp, bp, dx):
    """_q6_k with vpdpbusd: step t's 4 chunks of codes u = q + 32 (0..63) give sub-block t's
    codes . x in int32 (two chains), times sc_t by vpmulld; the -32 comes off once per block
    as 32 * sum_s sc_s * xb_s, as in _q6_k."""
    isum = None
    for t in range(16):
        u = _q6_codes(builder, wp, 144 + 96 * t)
        ch = [None, None]
        for j in range(4):
            ch[j % 2] = dpbusd(builder, ch[j % 2], u[j], _bcast32(builder, xp, 16 * t + 4 * j))
        # row i's sc_t: byte 16 (t // 2) + 2i + t % 2 of the scale pairs
        pairs = _at(builder, wp, 16 + 16 * (t // 2), ir.VectorType(_I8, 16))
        sc = builder.shuffle_vector(pairs, pairs, ir.Constant(
            ir.VectorType(_I32, 8), [2 * i + t % 2 for i in range(8)]))
        part = builder.mul(builder.add(ch[0], ch[1]), builder.sext(sc, _V8D))
        isum = part if isum is None else builder.add(isum, part)
    return _q6_finish(builder, acc, isum, wp, bp, dx)


def _q4_k(builder, acc, wp, xp, bp, dx):
    return _q45_k(builder, acc, wp, xp, bp, dx, 160, None)


def _q5_k(builder, acc, wp, xp, bp, dx):
    return _q45_k(builder, acc, wp, xp, bp, dx, 416, 160)


def _q6_k(builder, acc, wp, xp, bp, dx):
    """Record: d[8] f16 | scale pairs: for k = 0..7, 8 rows x (sc_2k, sc_2k+1) int8 | 16 steps
    of 3 chunks X, Y, Z, step t = sub-block t (`_q6_codes`; chunk = 4 bytes of each of the 8
    rows): code chunk j of step t holds weights 16t + 4j + b, b = 0..3."""
    isum = None
    for t in range(16):
        v = _q6_scales(builder, wp, t // 2)   # sc_t of row i in int16 lanes 2i, 2i + 1
        sc = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, 16),
                                                      [i - i % 2 + t % 2 for i in range(16)]))
        u = _q6_codes(builder, wp, 144 + 96 * t)
        for j in (0, 2):   # two chunks add in int16 (<= 2 * 16002), then times the scale
            d = builder.add(_maddubs(builder, u[j], _bcast32(builder, xp, 16 * t + 4 * j)),
                            _maddubs(builder, u[j + 1], _bcast32(builder, xp, 16 * t + 4 * j + 4)))
            part = _maddwd(builder, d, sc)
            isum = part if isum is None else builder.add(isum, part)
    return _q6_finish(builder, acc, isum, wp, bp, dx)


def _scale_pairs(builder, wp, off, k, signed):
    """Sub-blocks 2k, 2k + 1 of the 16 per block: their 8 rows' scales (bytes at off + 8s) as
    int16 pairs (sc_2k, sc_2k+1) in each lane, and each scale repeated in both halves."""
    a, b = (_dup_s8 if signed else _dup_u8)(builder, wp, off + 16 * k), \
        (_dup_s8 if signed else _dup_u8)(builder, wp, off + 16 * k + 8)
    a32, b32 = builder.bitcast(a, _V8D), builder.bitcast(b, _V8D)
    mask = ir.Constant(_V8D, [0xFFFF] * 8)
    pair = builder.or_(builder.and_(a32, mask), builder.shl(b32, ir.Constant(_V8D, [16] * 8)))
    return builder.bitcast(pair, _V16W), a, b


def _sub16_sums(builder, xp, codes, scale):
    """int32 <8 x i32>: lane i = sum over the 16 sub-blocks s = 8h + 2j + half of row i's
    scale(s) * (its codes . x), for the 2-bit-plane layouts (Q2_K, Q3_K): codes(h, j, lc) is
    the unsigned code vector of chunk lc (4 chunks per sub-block, small enough to add in int16)
    of weights 128h + 32j + 4lc.., scale(s) the <16 x i16> scales for vpmaddwd."""
    isum = None
    for h in range(2):
        for j in range(4):
            for half in range(2):
                acc16 = None
                for lc in range(4 * half, 4 * half + 4):
                    x = _bcast32(builder, xp, 128 * h + 32 * j + 4 * lc)
                    d = _maddubs(builder, codes(h, j, lc), x)
                    acc16 = d if acc16 is None else builder.add(acc16, d)
                part = _maddwd(builder, acc16, scale(8 * h + 2 * j + half))
                isum = part if isum is None else builder.add(isum, part)
    return isum


def _q3_k(builder, acc, wp, xp, bp, dx):
    """Record: d[8] f16 | (scale - 32)[16 sub][8 rows] int8 | 8 hmask chunks | 16 qs chunks.
    Weight 128h + 32j + l: low 2 bits at bit 2j of qs byte 32h + l (qs chunk 8h + l // 4), high
    bit at bit 4h + j of hmask byte l (hmask chunk l // 4); q = low + 4 * high - 4, sub-block
    s = 8h + 2j + l // 16. The codes go in as q + 4 (0..7, lane <= 1778: 4 chunks add in int16);
    the -4 comes off once per block as 4 * sum_s sc_s * xb_s."""
    three = _splat8(builder, 3, 32)
    one = _splat8(builder, 1, 32)
    pairs = [_scale_pairs(builder, wp, 16, k, True) for k in range(8)]

    def codes(h, j, lc):
        q = _at(builder, wp, 400 + 32 * (8 * h + lc), _V32B)
        hm = _at(builder, wp, 144 + 32 * lc, _V32B)
        lo = builder.and_(builder.lshr(q, _splat8(builder, 2 * j, 32)), three)
        hb = builder.and_(builder.lshr(hm, _splat8(builder, 4 * h + j, 32)), one)
        return builder.or_(lo, builder.shl(hb, _splat8(builder, 2, 32)))

    isum = _sub16_sums(builder, xp, codes, lambda s: pairs[s // 2][2 if s % 2 else 1])
    off = None  # 4 * sum_s sc_s * xb_s
    for k in range(8):
        o = _maddwd(builder, pairs[k][0], _pair16(builder, bp, k))
        off = o if off is None else builder.add(off, o)
    isum = builder.sub(isum, builder.shl(off, ir.Constant(_V8D, [2] * 8)))
    scale = builder.fmul(_f16x8(builder, wp, 0), _splat_f(builder, dx))
    return _fma(builder, builder.sitofp(isum, _V8F), scale, acc)


def _nibble_dup(builder, wp, off, high):
    """8 bytes at wp + off, their low (or high) nibbles as int16 repeated in both halves."""
    v = builder.zext(_at(builder, wp, off, ir.VectorType(_I8, 8)), _V8D)
    v = builder.lshr(v, ir.Constant(_V8D, [4] * 8)) if high else \
        builder.and_(v, ir.Constant(_V8D, [15] * 8))
    return builder.bitcast(builder.or_(v, builder.shl(v, ir.Constant(_V8D, [16] * 8))), _V16W), v


def _q2_k(builder, acc, wp, xp, bp, dx):
    """Record: d[8] f16 | dmin[8] f16 | scales[16 sub][8 rows] (low nibble scale, high nibble min,
    the GGUF bytes) | 16 qs chunks. Weight 128h + 32j + l: bits 2j..2j+1 of qs byte 32h + l (chunk
    8h + l // 4), sub-block s = 8h + 2j + l // 16. Codes 0..3 (lane <= 762): 4 chunks in int16."""
    three = _splat8(builder, 3, 32)

    def codes(h, j, lc):
        q = _at(builder, wp, 160 + 32 * (8 * h + lc), _V32B)
        return builder.and_(builder.lshr(q, _splat8(builder, 2 * j, 32)), three)

    isum = _sub16_sums(builder, xp, codes, lambda s: _nibble_dup(builder, wp, 32 + 8 * s, False)[0])
    msum = None  # sum_s m_s * xb_s, two sub-blocks per vpmaddwd
    for k in range(8):
        _, ma = _nibble_dup(builder, wp, 32 + 16 * k, True)
        _, mb = _nibble_dup(builder, wp, 32 + 16 * k + 8, True)
        pair = builder.bitcast(builder.or_(ma, builder.shl(mb, ir.Constant(_V8D, [16] * 8))), _V16W)
        m = _maddwd(builder, pair, _pair16(builder, bp, k))
        msum = m if msum is None else builder.add(msum, m)
    vdx = _splat_f(builder, dx)
    acc = _fma(builder, builder.sitofp(isum, _V8F), builder.fmul(_f16x8(builder, wp, 0), vdx), acc)
    neg = builder.fneg(builder.fmul(_f16x8(builder, wp, 16), vdx))
    return _fma(builder, builder.sitofp(msum, _V8F), neg, acc)


_IQ4NL = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


def _iq4_xs(builder, acc, wp, xp, bp, dx):
    """Record: d[8] f16 | sc[8 sub][8 rows] int8 (scale - 32) | 32 chunks of qs. Sub-block j is
    chunks 4j..4j+3; byte 16j + l holds weight 32j + l (low nibble) and 32j + 16 + l (high),
    codes index the fixed non-linear table (vpshufb). Signed weights go through |w|, sign(w)*x:
    a lane is <= 2*127*127, so each half-chunk is widened (vpmaddwd with the scale) at once."""
    low = _splat8(builder, 0x0F, 32)
    table = ir.Constant(_V32B, [v & 0xFF for v in _IQ4NL * 2])
    shuf = _fn(builder, "llvm.x86.avx2.pshuf.b", _V32B, [_V32B, _V32B])
    absf = _fn(builder, "llvm.abs.v32i8", _V32B, [_V32B, ir.IntType(1)])
    sign = _fn(builder, "llvm.x86.avx2.psign.b", _V32B, [_V32B, _V32B])
    isum = None
    for j in range(8):
        sc = _dup_s8(builder, wp, 16 + 8 * j)
        for k in range(4):
            q = _at(builder, wp, 80 + 32 * (4 * j + k), _V32B)
            for half, nib in ((0, builder.and_(q, low)),
                              (16, builder.and_(builder.lshr(q, _splat8(builder, 4, 32)), low))):
                w = builder.call(shuf, [table, nib])
                x = _bcast32(builder, xp, 32 * j + half + 4 * k)
                d = _maddubs(builder, builder.call(absf, [w, ir.Constant(ir.IntType(1), 0)]),
                             builder.call(sign, [x, w]))
                part = _maddwd(builder, d, sc)
                isum = part if isum is None else builder.add(isum, part)
    scale = builder.fmul(_f16x8(builder, wp, 0), _splat_f(builder, dx))
    return _fma(builder, builder.sitofp(isum, _V8F), scale, acc)


def _step(body, record_bytes):
    """Make `f(acc, w, woff, xq, xoff, xd, xb, b)`: acc + the 8 rows' dots with super-block b.

    w: uint8 group records, woff: byte offset of one record; xq: int8 codes, xoff: index of the
    block's first; xd float32: block scales (read at b); xb int16: code sums per 16 (read from
    16b)."""

    def impl(typingctx, acc, w, woff, xq, xoff, xd, xb, b):
        _need("w", w, types.uint8), _need("xq", xq, types.int8)
        _need("xd", xd, types.float32), _need("xb", xb, types.int16)
        sig = f32x8(f32x8, w, woff, xq, xoff, xd, xb, b)

        def codegen(context, builder, sig, args):
            acc_v, w_v, woff_v, xq_v, xoff_v, xd_v, xb_v, b_v = args
            wp = _ptr(context, builder, sig.args[1], w_v, woff_v)
            xp = _ptr(context, builder, sig.args[3], xq_v, xoff_v)
            dx = builder.load(_ptr(context, builder, sig.args[5], xd_v, b_v))
            b16 = builder.mul(b_v, ir.Constant(b_v.type, 16))
            bp = builder.bitcast(_ptr(context, builder, sig.args[6], xb_v, b16), _I8.as_pointer())
            return body(builder, acc_v, wp, xp, bp, dx)

        return sig, codegen

    step = intrinsic(impl)
    _MANY[step] = many_steps(body, record_bytes, types.int16, _token_k)
    return step


def _token_k(context, builder, sig, xd_v, xb_v, bi, body, acc, wp, xp):
    dx = builder.load(_ptr(context, builder, sig.args[6], xd_v, bi))
    b16 = builder.mul(bi, ir.Constant(bi.type, 16))
    bp = builder.bitcast(_ptr(context, builder, sig.args[7], xb_v, b16), _I8.as_pointer())
    return body(builder, acc, wp, xp, bp, dx)


kx8_q4_k = _step(_q4_k, 1184)     # record bytes
kx8_q5_k = _step(_q5_k, 1440)
kx8_q6_k = _step(_q6_k, 1680)
kx8_iq4_xs = _step(_iq4_xs, 1104)
kx8_q3_k = _step(_q3_k, 912)
kx8_q2_k = _step(_q2_k, 672)
# VNNI steps (compiled only where _simd.has_vnni())
kx8v_q4_k = _step(_q4_k_v, 1184)
kx8v_q5_k = _step(_q5_k_v, 1440)
kx8v_q6_k = _step(_q6_k_v, 1680)
