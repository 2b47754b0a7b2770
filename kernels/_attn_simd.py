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


def _dots(heads: int):
    """The intrinsic f(q, qoff, qstride, k, koff, hd, out, ooff, ostride, scale): for heads
    i < `heads` and rows s < LANES / heads, out[ooff + i * ostride + s] = scale * sum_j
    q[qoff + i * qstride + j] * k[koff + s * hd + j]. The LANES dots accumulate in LANES
    registers (each key chunk loaded once for every head) and one transposing add tree sums
    them, so a head's scores are the same bits whichever `heads` computed them."""
    rows = LANES // heads

    def impl(typingctx, q, qoff, qstride, k, koff, hd, out, ooff, ostride, scale):
        sig = types.void(q, qoff, qstride, k, koff, hd, out, ooff, ostride, scale)

        def codegen(context, builder, sig, args):
            q_v, qoff_v, qstride_v, k_v, koff_v, hd_v, out_v, ooff_v, ostride_v, scale_v = args
            i64 = hd_v.type

            def c(x):
                return ir.Constant(i64, x)
            zero = ir.Constant(_vty(), [0.0] * LANES)
            accs = [cgutils.alloca_once_value(builder, zero) for _ in range(LANES)]  # (head, row)
            with cgutils.for_range(builder, builder.udiv(hd_v, c(LANES))) as loop:
                base = builder.mul(loop.index, c(LANES))
                qs = [_vload(builder, _ptr(context, builder, sig.args[0], q_v, builder.add(
                    qoff_v, builder.add(builder.mul(c(i), qstride_v), base)))) for i in range(heads)]
                for r in range(rows):
                    off = builder.add(koff_v, builder.add(builder.mul(c(r), hd_v), base))
                    kv = _vrow(context, builder, sig.args[3], k_v, off)
                    for i in range(heads):
                        acc = accs[i * rows + r]
                        builder.store(_fma(builder, qs[i], kv, builder.load(acc)), acc)
            sums = transpose_sum(builder, [builder.load(a) for a in accs])    # lanes (head, row)
            sums = builder.fmul(sums, _splat(builder, scale_v), flags=_EXACT)
            part_ty = ir.VectorType(_F32, rows)
            for i in range(heads):
                part = builder.shuffle_vector(sums, sums, _idx(range(i * rows, (i + 1) * rows)))
                p = _ptr(context, builder, sig.args[6], out_v,
                         builder.add(ooff_v, builder.mul(c(i), ostride_v)))
                builder.store(part, builder.bitcast(p, part_ty.as_pointer()), align=4)
            return context.get_dummy_value()

        return sig, codegen

    return intrinsic(impl)


def _axpys(heads: int, chunks: int):
    """The intrinsic f(p, poff, pstride, v, voff, hd, out, ooff): for heads i < `heads`,
    out[ooff + i * hd + j] += sum_s p[poff + i * pstride + s] * v[voff + s * hd + j] over rows
    s < LANES in order (each lane ((out + p0 v0) + p1 v1) + ...), j < hd (a multiple of
    chunks * LANES). The heads x chunks output vectors stay in registers across the block, so
    a value row loaded serves every head and the output is loaded and stored once per block."""
    hoist = heads == 1      # one head's LANES weights fit in registers for the whole call

    def impl(typingctx, p, poff, pstride, v, voff, hd, out, ooff):
        sig = types.void(p, poff, pstride, v, voff, hd, out, ooff)

        def codegen(context, builder, sig, args):
            p_v, poff_v, pstride_v, v_v, voff_v, hd_v, out_v, ooff_v = args
            i64 = hd_v.type

            def c(x):
                return ir.Constant(i64, x)

            def at(argno, ary, off):
                return _ptr(context, builder, sig.args[argno], ary, off)

            def weight(i, s):
                pi = builder.add(poff_v, builder.add(builder.mul(c(i), pstride_v), c(s)))
                return _splat(builder, builder.load(at(0, p_v, pi)))
            held = [[weight(i, s) for s in range(LANES)] for i in range(heads)] if hoist else None
            with cgutils.for_range(builder, builder.udiv(hd_v, c(chunks * LANES))) as loop:
                base = builder.mul(loop.index, c(chunks * LANES))
                outs = [[at(6, out_v, builder.add(ooff_v, builder.add(builder.mul(c(i), hd_v),
                                                                      builder.add(base, c(j * LANES)))))
                         for j in range(chunks)] for i in range(heads)]
                accs = [[_vload(builder, o) for o in row] for row in outs]
                for s in range(LANES):
                    row = builder.add(voff_v, builder.add(builder.mul(c(s), hd_v), base))
                    vs = [_vrow(context, builder, sig.args[3], v_v, builder.add(row, c(j * LANES)))
                          for j in range(chunks)]
                    for i in range(heads):
                        ps = held[i][s] if hoist else weight(i, s)
                        accs[i] = [_fma(builder, ps, vj, a) for vj, a in zip(vs, accs[i])]
                for orow, arow in zip(outs, accs):
                    for o, a in zip(orow, arow):
                        _vstore(builder, a, o)
            return context.get_dummy_value()

        return sig, codegen

    return intrinsic(impl)


# axpy_heads' tile: HEADS heads x CHUNKS vectors of each head's output in registers (16 of 32
# zmm; 8 of 16 ymm), so each value row loaded serves HEADS heads
HEADS = 4 if LANES == 16 else 2
CHUNKS = 4

dot_rows = _dots(1)             # one head, LANES rows
dot_rows2 = _dots(2)            # two heads of a group, LANES / 2 rows each
axpy_rows = _axpys(1, 1)        # one head
axpy_heads = _axpys(HEADS, CHUNKS)
