"""A check both kernel test files run on every record variant a unit offers."""
from __future__ import annotations

import numpy as np


def decode_equals_prefill_rows(unit, w, x: np.ndarray, n: int, variants: list[str]) -> None:
    """For each variant: a T-token product (T = len(x), prefill and batched decode: one record
    group at a time, tokens in tiles of 4, 2, 1 that decode each record once per tile) equals
    the same rows computed token by token (decode, two record streams), bit for bit, for every
    T from 2 to len(x), over row ranges cut mid-group; and every variant gives the last one's
    bits. len(x) = 7 covers every tile size of the 8-row tiles (4 + 2 + 1), 15 those of the
    16-row ones (8 + 4 + 2 + 1)."""
    results = {}
    for variant in variants:
        for r0, r1 in ((0, n), (3, 70), (13, 51), (8, 16), (5, 12)):
            one = np.zeros((len(x), n), np.float32)
            for t in range(len(x)):
                unit.run(variant, w, x[t:t + 1], one[t:t + 1], r0, r1)
            for n_t in range(2, len(x) + 1):
                many = np.zeros((n_t, n), np.float32)
                unit.run(variant, w, x[:n_t], many, r0, r1)
                np.testing.assert_array_equal(one[:n_t].view(np.uint32), many.view(np.uint32),
                                              err_msg=f"{variant} T={n_t} rows {r0}..{r1}")
            results[variant, r0] = one
    for (variant, r0), one in results.items():
        np.testing.assert_array_equal(one.view(np.uint32), results[variants[-1], r0].view(np.uint32))
