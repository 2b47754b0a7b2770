"""Decode attention's two inner blocks as vector IR: `LANES` cache rows at a time (16 where
AVX-512 runs <16 x float>, 8 with AVX2; 0: no SIMD target, attention.py keeps its row loop).

dot_rows: one query head against a block of LANES key rows, one score per row. Each row's dot
accumulates across the head dimension in its own register; the LANES registers are then summed
lane-wise into one register holding the LANES scores (a transposing add tree: 2 (LANES - 1)
shuffles and LANES - 1 adds for LANES dots). Done per row (as before) every dot ended in its own
horizontal sum, which cost more than the products.

axpy_rows: one head's output += its LANES softmax weights times the block's value rows, the
output chunk kept in a register across the block (one load and store per chunk, not per row).

Both take C-contiguous arrays of any shape with flat element offsets; hd must be a multiple of
LANES (attention.py checks). Per head the arithmetic depends only on hd and the positions, never
on how a caller splits heads over threads.
"""
from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from ._simd import _F32, _I32, _fn, _ptr, has_avx2, host_features

LANES = 16 if has_avx2() and "avx512f" in host_features() else 8 if has_avx2() else 0


# A flag that changes nothing for a sum or product: Numba's fastmath pass adds its flags (reassoc,
# contract) only to float ops that have none, and with them LLVM regrouped the add tree or fused
# the scale multiply differently from one caller to the next (a kernel inlined into another gave
# other bits). The FMAs are llvm.fma calls, which that pass leaves alone.
_EXACT = ("arcp",)


def _vty():
    return ir.VectorType(_F32, max(LANES, 1))


def _idx(values):
    return ir.Constant(ir.VectorType(_I32, len(values)), list(values))


def _vload(builder, p):
    return builder.load(builder.bitcast(p, _vty().as_pointer()), align=4)


def _vrow(context, builder, aryty, ary, off):
    """LANES cache values at element `off` of a float32 array, or of a uint16 array of f16 bits
    (converted as loaded: vcvtph2ps, so an f16 cache is read in place at half the bytes)."""
    p = _ptr(context, builder, aryty, ary, off)
    if aryty.dtype == types.uint16:
        h = builder.load(builder.bitcast(p, ir.VectorType(ir.HalfType(), LANES).as_pointer()), align=2)
        return builder.fpext(h, _vty())
    return _vload(builder, p)


def _vstore(builder, v, p):
    builder.store(v, builder.bitcast(p, _vty().as_pointer()), align=4)


def _splat(builder, x):
    v = builder.insert_element(ir.Constant(_vty(), ir.Undefined), x, ir.Constant(_I32, 0))
    return builder.shuffle_vector(v, v, _idx([0] * LANES))


def _fma(builder, a, b, c):
    vty = _vty()
    return builder.call(_fn(builder, f"llvm.fma.v{LANES}f32", vty, [vty, vty, vty]), [a, b, c])


def transpose_sum(builder, vs: list) -> ir.Value:
    """One vector whose lane s is the sum of vs[s]'s lanes (len(vs) == LANES, a power of 2).
    Each round adds, pairwise, the first and second halves of every block of the two vectors
    (blocks start as whole vectors and halve each round), so the lanes stay in row order."""
    n = len(vs)
    m = n                                          # lanes per row's block
    while len(vs) > 1:
        blocks = n // m
        lo = [base + b * m + j for base in (0, n) for b in range(blocks) for j in range(m // 2)]
        hi = [i + m // 2 for i in lo]
        vs = [builder.fadd(builder.shuffle_vector(a, b, _idx(lo)), builder.shuffle_vector(a, b, _idx(hi)),
                           flags=_EXACT) for a, b in zip(vs[0::2], vs[1::2])]
        m //= 2
    return vs[0]


@intrinsic
def dot_rows(typingctx, q, qoff, k, koff, hd, out, ooff, scale):
    """out[ooff + s] = scale * sum_j q[qoff + j] * k[koff + s * hd + j] for s < LANES."""
    sig = types.void(q, qoff, k, koff, hd, out, ooff, scale)

    def codegen(context, builder, sig, args):
        q_v, qoff_v, k_v, koff_v, hd_v, out_v, ooff_v, scale_v = args
        i64 = hd_v.type
        zero = ir.Constant(_vty(), [0.0] * LANES)
        accs = [cgutils.alloca_once_value(builder, zero) for _ in range(LANES)]   # registers
        n_chunks = builder.udiv(hd_v, ir.Constant(i64, LANES))
        with cgutils.for_range(builder, n_chunks) as loop:
            base = builder.mul(loop.index, ir.Constant(i64, LANES))
            qv = _vload(builder, _ptr(context, builder, sig.args[0], q_v, builder.add(qoff_v, base)))
            for s, acc in enumerate(accs):
                off = builder.add(koff_v, builder.add(builder.mul(ir.Constant(i64, s), hd_v), base))
                kv = _vrow(context, builder, sig.args[2], k_v, off)
                builder.store(_fma(builder, qv, kv, builder.load(acc)), acc)
        r = transpose_sum(builder, [builder.load(a) for a in accs])
        r = builder.fmul(r, _splat(builder, scale_v), flags=_EXACT)
        _vstore(builder, r, _ptr(context, builder, sig.args[5], out_v, ooff_v))
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def axpy_rows(typingctx, p, poff, v, voff, hd, out, ooff):
    """out[ooff + j] += sum_s p[poff + s] * v[voff + s * hd + j] for j < hd, rows s < LANES in
    order (each output lane: ((out + p0 v0) + p1 v1) + ...)."""
    sig = types.void(p, poff, v, voff, hd, out, ooff)

    def codegen(context, builder, sig, args):
        p_v, poff_v, v_v, voff_v, hd_v, out_v, ooff_v = args
        i64 = hd_v.type
        ps = [_splat(builder, builder.load(_ptr(context, builder, sig.args[0], p_v,
                                                builder.add(poff_v, ir.Constant(i64, s)))))
              for s in range(LANES)]
        n_chunks = builder.udiv(hd_v, ir.Constant(i64, LANES))
        with cgutils.for_range(builder, n_chunks) as loop:
            base = builder.mul(loop.index, ir.Constant(i64, LANES))
            op = _ptr(context, builder, sig.args[5], out_v, builder.add(ooff_v, base))
            acc = _vload(builder, op)
            for s in range(LANES):
                off = builder.add(voff_v, builder.add(builder.mul(ir.Constant(i64, s), hd_v), base))
                vrow = _vrow(context, builder, sig.args[2], v_v, off)
                acc = _fma(builder, ps[s], vrow, acc)
            _vstore(builder, acc, op)
        return context.get_dummy_value()

    return sig, codegen


# axpy_heads' tile: HEADS heads x CHUNKS vectors of each head's output in registers (16 of 32
# zmm; 8 of 16 ymm), so each value row loaded serves HEADS heads
HEADS = 4 if LANES == 16 else 2
CHUNKS = 4


@intrinsic
def axpy_heads(typingctx, p, poff, pstride, v, voff, hd, out, ooff):
    """axpy_rows for HEADS heads at once: out[ooff + i * hd + j] += sum_s p[poff + i * pstride
    + s] * v[voff + s * hd + j] for i < HEADS, j < hd (a multiple of CHUNKS * LANES), s < LANES
    in order (the same sums, in the same order, as axpy_rows per head)."""
    sig = types.void(p, poff, pstride, v, voff, hd, out, ooff)

    def codegen(context, builder, sig, args):
        p_v, poff_v, pstride_v, v_v, voff_v, hd_v, out_v, ooff_v = args
        i64 = hd_v.type

        def at(argno, ary, off):
            return _ptr(context, builder, sig.args[argno], ary, off)

        def c(x):
            return ir.Constant(i64, x)
        n_tiles = builder.udiv(hd_v, c(CHUNKS * LANES))
        with cgutils.for_range(builder, n_tiles) as loop:
            base = builder.mul(loop.index, c(CHUNKS * LANES))
            outs = [[at(6, out_v, builder.add(ooff_v, builder.add(builder.mul(c(i), hd_v),
                                                                  builder.add(base, c(j * LANES)))))
                     for j in range(CHUNKS)] for i in range(HEADS)]
            accs = [[_vload(builder, o) for o in row] for row in outs]
            for s in range(LANES):
                row = builder.add(voff_v, builder.add(builder.mul(c(s), hd_v), base))
                vs = [_vrow(context, builder, sig.args[3], v_v, builder.add(row, c(j * LANES)))
                      for j in range(CHUNKS)]
                for i in range(HEADS):
                    pi = builder.add(poff_v, builder.add(builder.mul(c(i), pstride_v), c(s)))
                    ps = _splat(builder, builder.load(at(0, p_v, pi)))
                    accs[i] = [_fma(builder, ps, vj, a) for vj, a in zip(vs, accs[i])]
            for orow, arow in zip(outs, accs):
                for o, a in zip(orow, arow):
                    _vstore(builder, a, o)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def dot_rows2(typingctx, q, qoff, qstride, k, koff, hd, out, ooff, ostride, scale):
    """dot_rows for two heads over LANES / 2 rows, each key chunk loaded once for both:
    out[ooff + i * ostride + s] = scale * sum_j q[qoff + i * qstride + j] * k[koff + s * hd + j]
    for heads i < 2, rows s < LANES / 2 (the same sums, in the same order, as dot_rows)."""
    sig = types.void(q, qoff, qstride, k, koff, hd, out, ooff, ostride, scale)

    def codegen(context, builder, sig, args):
        q_v, qoff_v, qstride_v, k_v, koff_v, hd_v, out_v, ooff_v, ostride_v, scale_v = args
        i64 = hd_v.type
        half = LANES // 2

        def c(x):
            return ir.Constant(i64, x)
        zero = ir.Constant(_vty(), [0.0] * LANES)
        accs = [cgutils.alloca_once_value(builder, zero) for _ in range(LANES)]   # (head, row)
        n_chunks = builder.udiv(hd_v, c(LANES))
        with cgutils.for_range(builder, n_chunks) as loop:
            base = builder.mul(loop.index, c(LANES))
            qs = [_vload(builder, _ptr(context, builder, sig.args[0], q_v, builder.add(
                qoff_v, builder.add(builder.mul(c(i), qstride_v), base)))) for i in range(2)]
            for s in range(half):
                off = builder.add(koff_v, builder.add(builder.mul(c(s), hd_v), base))
                kv = _vrow(context, builder, sig.args[3], k_v, off)
                for i in range(2):
                    acc = accs[i * half + s]
                    builder.store(_fma(builder, qs[i], kv, builder.load(acc)), acc)
        r = transpose_sum(builder, [builder.load(a) for a in accs])     # lanes (head, row)
        r = builder.fmul(r, _splat(builder, scale_v), flags=_EXACT)
        hty = ir.VectorType(_F32, half)
        for i in range(2):
            part = builder.shuffle_vector(r, r, _idx(range(i * half, (i + 1) * half)))
            p = _ptr(context, builder, sig.args[6], out_v, builder.add(ooff_v, builder.mul(c(i), ostride_v)))
            builder.store(part, builder.bitcast(p, hty.as_pointer()), align=4)
        return context.get_dummy_value()

    return sig, codegen
