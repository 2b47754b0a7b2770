"""Decode's loop of the 8-row record kernels (T = 1: one activation row against the weights),
as `base.specialize` templates; T > 1 goes to the token tiles of `_tiles`.

Template constants: STEP (the record step), STEP_PAIR (its two-record version, 32-weight block
types only), GROUPS (the token-tile loop), REC (record bytes), BLOCK (weights per block),
PREFETCH (`_simd.record_prefetch(REC)`).

`pf`: decode's software prefetch distance in bytes (0: none), chosen per CPU and type by
calibration (see `_simd.PREFETCH_AHEAD`); a branch the predictor never misses.
"""
from __future__ import annotations

import numpy as np

from ._simd import vzero
from ._tiles import put8 as _put8

GROUP = 8


def _matmul_x8_t(q, xq, dx, xaux, out, r0, r1, pf=0):
    # q: uint8 (G, nb * REC) records; xq: int8 (T, K) codes; dx float32 (T, nb) block scales;
    # xaux: the code sums STEP reads (q8_0: int32 (T, nb); q8_k: int16 (T, K/16)); out: float32
    # (T, N) C-contiguous.
    # Decode (T = 1) walks the two halves of the group range at once, alternating records: one
    # core then keeps two sequential streams in flight, each with its own hardware-prefetch
    # run-ahead. On the Xeon (AVX-512) VM this took one thread from 10.7-15 to 16-19 GB/s on
    # 256 MB (Q4_0, Q4_K, Q6_K; 4 streams were no better); every row still sees the same
    # step sequence, so results are bit-identical to one stream. T > 1 (prefill, batched
    # decode) goes one group at a time in token tiles (`_tiles`).
    n_t, nb = dx.shape
    qf = q.reshape(-1)
    xf = xq.reshape(-1)
    of = out.reshape(-1)
    dxf = dx.reshape(-1)
    xaf = xaux.reshape(-1)
    rs = q.shape[1]
    part = np.empty(GROUP, np.float32)   # (8,) a group whose rows are not all in [r0, r1)
    g0 = r0 // GROUP
    g1 = (r1 + GROUP - 1) // GROUP
    per = (g1 - g0) // 2 if n_t == 1 else 0     # groups per stream
    for i in range(per):
        # one STEP call site for both streams (two inlined copies of a K-quant step spill
        # registers): step j is stream j % 2's record j // 2; acc holds the current stream's
        # sum, acc2 the other's, swapped after every step
        o = (g0 + i) * rs
        o2 = o + per * rs
        acc = vzero()
        acc2 = vzero()
        for j in range(2 * nb):
            if pf > 0:
                PREFETCH(qf, o + pf)  # noqa: F821
            nxt = STEP(acc, qf, o, xf, (j >> 1) * BLOCK, dxf, xaf, j >> 1)  # noqa: F821
            acc = acc2
            acc2 = nxt
            o, o2 = o2, o + REC  # noqa: F821
        _put8(acc, out, of, part, g0 + i, 0, r0, r1)
        _put8(acc2, out, of, part, g0 + i + per, 0, r0, r1)
    # the rest (and every group when T > 1): token tiles, each record decoded once per tile
    GROUPS(qf, rs, xf, dxf, xaf, n_t, nb, out, of, part, g0 + 2 * per, g1, r0, r1)  # noqa: F821


def _matmul_x8_pair_t(q, xq, dx, xaux, out, r0, r1, pf=0):
    # _matmul_x8_t for the 32-weight block types: decode's two streams advance together through
    # a two-record step (STEP_PAIR), which loads each block's activations once for both records
    # and halves the loop's index work; the records are read in the same order as there
    # (stream 0's record b, then stream 1's) and each row's result is bit-identical.
    n_t, nb = dx.shape
    qf = q.reshape(-1)
    xf = xq.reshape(-1)
    of = out.reshape(-1)
    dxf = dx.reshape(-1)
    xaf = xaux.reshape(-1)
    rs = q.shape[1]
    part = np.empty(GROUP, np.float32)   # (8,) a group whose rows are not all in [r0, r1)
    g0 = r0 // GROUP
    g1 = (r1 + GROUP - 1) // GROUP
    per = (g1 - g0) // 2 if n_t == 1 else 0     # groups per stream
    for i in range(per):
        o = (g0 + i) * rs
        o2 = o + per * rs
        acc = vzero()
        acc2 = vzero()
        for b in range(nb):
            if pf > 0:
                PREFETCH(qf, o + pf)  # noqa: F821
                PREFETCH(qf, o2 + pf)  # noqa: F821
            acc, acc2 = STEP_PAIR(acc, acc2, qf, o, o2, xf, b * BLOCK, dxf, xaf, b)  # noqa: F821
            o += REC  # noqa: F821
            o2 += REC  # noqa: F821
        _put8(acc, out, of, part, g0 + i, 0, r0, r1)
        _put8(acc2, out, of, part, g0 + i + per, 0, r0, r1)
    GROUPS(qf, rs, xf, dxf, xaf, n_t, nb, out, of, part, g0 + 2 * per, g1, r0, r1)  # noqa: F821
