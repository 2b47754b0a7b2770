"""A check both kernel test files run on every record variant a unit offers."""
from __future__ import annotations

import numpy as np


def decode_equals_prefill_rows(unit, w, x: np.ndarray, n: int, variants: list[str]) -> None:
    """For each variant: a 3-token product (prefill, one record group at a time) equals the same
    rows computed token by token (decode, two record streams), bit for bit, over row ranges cut
    mid-group; and every variant gives the last one's bits."""
    results = {}
    for variant in variants:
        for r0, r1 in ((0, n), (3, 70), (13, 51), (8, 16), (5, 12)):
            many = np.zeros((3, n), np.float32)
            unit.run(variant, w, x, many, r0, r1)
            for t in range(3):
                one = np.zeros((1, n), np.float32)
                unit.run(variant, w, x[t:t + 1], one, r0, r1)
                np.testing.assert_array_equal(one[0].view(np.uint32), many[t].view(np.uint32))
            results[variant, r0] = many
    for (variant, r0), many in results.items():
        np.testing.assert_array_equal(many.view(np.uint32), results[variants[-1], r0].view(np.uint32))
