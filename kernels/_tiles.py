"""The multi-token loop of the 8-row record kernels (prefill and batched decode: T > 1 rows of
activations against the same weights).

For each group of 8 weight rows, the tokens go in tiles of 4 (then 2, then 1): a tile walks the
group's records once, and each record is read and unpacked once for all the tile's tokens (the
n-token steps of `_x8_simd.many`), so a token costs only its activation side (broadcasts,
vpmaddubsw, sums, the scale multiply) where it used to re-read and re-decode every record. The
group's records (a few KB to ~25 KB) stay in L1/L2 while the tiles pass over them; a tile of 4
keeps its 4 accumulators and a 32-block type's unpacked record (8 vectors) in the 16 ymm
registers.

The avx512vnni-x16 variant's loop (`_groups_wide_t`) takes two groups per 16-row step and
tiles of 8, 4, 2, 1 tokens; for Q4_0 and Q8_0 `_groups_wide32_t` takes the whole 4-token tiles
over four groups first (`_kx32_simd`).

Each token's arithmetic is exactly that of the one-token step (same ops, same order), so a row's
result does not depend on T or on its place in a tile (tests/record_checks.py).
"""
from __future__ import annotations

from numba import njit

from ._kx16_simd import hi8, lo8, vzero16
from ._simd import vzero
from ._x8_simd import store8

GROUP = 8


@njit(nogil=True, cache=True, inline="always")
def put8(acc, out, of, part, g, t, r0, r1):
    """Rows of group g that lie in [r0, r1) of out[t] from the 8 lanes of acc."""
    a = max(r0, g * GROUP)
    e = min(r1, g * GROUP + GROUP)
    if e - a == GROUP:
        store8(acc, of, t * out.shape[1] + a)
    else:
        store8(acc, part, 0)
        for r in range(a, e):
            out[t, r] = part[r - g * GROUP]


def _groups_t(qf, rs, xf, dxf, xaf, n_t, nb, out, of, part, ga, gb, r0, r1):
    # groups ga..gb-1 of records qf (flat, rs bytes per group) against the n_t token rows of xf
    # (flat codes, nb blocks each), dxf / xaf (flat scales / code sums, nb per token); template
    # constants: STEP (one token), STEP2, STEP4 (n-token steps), REC (record bytes), BLOCK
    k = nb * BLOCK  # noqa: F821 (template constant)
    for g in range(ga, gb):
        t = 0
        while t + 4 <= n_t:
            a4 = (vzero(), vzero(), vzero(), vzero())
            o = g * rs
            for b in range(nb):
                a4 = STEP4(a4, qf, o, xf, t * k + b * BLOCK, k, dxf, xaf, t * nb + b, nb)  # noqa: F821
                o += REC  # noqa: F821
            put8(a4[0], out, of, part, g, t, r0, r1)
            put8(a4[1], out, of, part, g, t + 1, r0, r1)
            put8(a4[2], out, of, part, g, t + 2, r0, r1)
            put8(a4[3], out, of, part, g, t + 3, r0, r1)
            t += 4
        if t + 2 <= n_t:
            a2 = (vzero(), vzero())
            o = g * rs
            for b in range(nb):
                a2 = STEP2(a2, qf, o, xf, t * k + b * BLOCK, k, dxf, xaf, t * nb + b, nb)  # noqa: F821
                o += REC  # noqa: F821
            put8(a2[0], out, of, part, g, t, r0, r1)
            put8(a2[1], out, of, part, g, t + 1, r0, r1)
            t += 2
        if t < n_t:
            acc = vzero()
            o = g * rs
            xo = t * k
            for b in range(t * nb, t * nb + nb):
                acc = STEP(acc, qf, o, xf, xo, dxf, xaf, b)  # noqa: F821
                o += REC  # noqa: F821
                xo += BLOCK  # noqa: F821
            put8(acc, out, of, part, g, t, r0, r1)


def _groups_wide_t(qf, rs, xf, dxf, xaf, n_t, nb, out, of, part, ga, gb, r0, r1):
    # _groups_t two groups at a time through the 16-row steps of `_kx16_simd`, tokens in tiles
    # of 8, 4, 2, 1 (template constants WIDE1..WIDE8: the n-token steps; REC, BLOCK; GROUPS8:
    # the 8-row tile loop, for an odd last group)
    k = nb * BLOCK  # noqa: F821 (template constant)
    g = ga
    while g + 2 <= gb:
        t = 0
        while t + 8 <= n_t:
            a8 = (vzero16(), vzero16(), vzero16(), vzero16(), vzero16(), vzero16(), vzero16(),
                  vzero16())
            o = g * rs
            for b in range(nb):
                a8 = WIDE8(a8, qf, o, o + rs, xf, t * k + b * BLOCK, k, dxf, xaf, t * nb + b, nb)  # noqa: F821
                o += REC  # noqa: F821
            for i in range(8):
                put8(lo8(a8[i]), out, of, part, g, t + i, r0, r1)
                put8(hi8(a8[i]), out, of, part, g + 1, t + i, r0, r1)
            t += 8
        if t + 4 <= n_t:
            a = (vzero16(), vzero16(), vzero16(), vzero16())
            o = g * rs
            for b in range(nb):
                a = WIDE4(a, qf, o, o + rs, xf, t * k + b * BLOCK, k, dxf, xaf, t * nb + b, nb)  # noqa: F821
                o += REC  # noqa: F821
            for i in range(4):
                put8(lo8(a[i]), out, of, part, g, t + i, r0, r1)
                put8(hi8(a[i]), out, of, part, g + 1, t + i, r0, r1)
            t += 4
        if t + 2 <= n_t:
            a2 = (vzero16(), vzero16())
            o = g * rs
            for b in range(nb):
                a2 = WIDE2(a2, qf, o, o + rs, xf, t * k + b * BLOCK, k, dxf, xaf, t * nb + b, nb)  # noqa: F821
                o += REC  # noqa: F821
            for i in range(2):
                put8(lo8(a2[i]), out, of, part, g, t + i, r0, r1)
                put8(hi8(a2[i]), out, of, part, g + 1, t + i, r0, r1)
            t += 2
        if t < n_t:
            a1 = (vzero16(),)
            o = g * rs
            for b in range(nb):
                a1 = WIDE1(a1, qf, o, o + rs, xf, t * k + b * BLOCK, k, dxf, xaf, t * nb + b, nb)  # noqa: F821
                o += REC  # noqa: F821
            put8(lo8(a1[0]), out, of, part, g, t, r0, r1)
            put8(hi8(a1[0]), out, of, part, g + 1, t, r0, r1)
        g += 2
    if g < gb:
        GROUPS8(qf, rs, xf, dxf, xaf, n_t, nb, out, of, part, g, gb, r0, r1)  # noqa: F821


def _groups_wide32_t(qf, rs, xf, dxf, xaf, n_t, nb, out, of, part, ga, gb, r0, r1):
    # _groups_wide_t with the whole 4-token tiles four groups at a time (WIDE32: the 32-row
    # step of `_kx32_simd`, each activation broadcast feeding two zmm of weights); the tokens
    # past the last whole tile on those groups, and the groups past the last four, go through
    # GROUPS16 (the 16-row loop) on views of the same arrays
    k = nb * BLOCK  # noqa: F821 (template constant)
    n4 = n_t - n_t % 4
    g = ga
    while n4 and g + 4 <= gb:
        t = 0
        while t < n4:
            a = (vzero16(), vzero16(), vzero16(), vzero16(), vzero16(), vzero16(), vzero16(),
                 vzero16())
            o = g * rs
            for b in range(nb):
                a = WIDE32(a, qf, o, rs, xf, t * k + b * BLOCK, k, dxf, xaf, t * nb + b, nb)  # noqa: F821
                o += REC  # noqa: F821
            for i in range(4):
                put8(lo8(a[2 * i]), out, of, part, g, t + i, r0, r1)
                put8(hi8(a[2 * i]), out, of, part, g + 1, t + i, r0, r1)
                put8(lo8(a[2 * i + 1]), out, of, part, g + 2, t + i, r0, r1)
                put8(hi8(a[2 * i + 1]), out, of, part, g + 3, t + i, r0, r1)
            t += 4
        g += 4
    if n4 < n_t and g > ga:
        m = xaf.shape[0] // n_t                 # code sums per token
        n_out = out.shape[1]
        GROUPS16(qf, rs, xf[n4 * k:], dxf[n4 * nb:], xaf[n4 * m:], n_t - n4, nb, out[n4:],  # noqa: F821
                 of[n4 * n_out:], part, ga, g, r0, r1)
    if g < gb:
        GROUPS16(qf, rs, xf, dxf, xaf, n_t, nb, out, of, part, g, gb, r0, r1)  # noqa: F821
