"""Decode (T = 1) rate of a kernel from L2: one thread, a 256 x 2048 matrix (100-300 KiB).

    .venv/bin/python benchmarks/bench_kernels_l2.py IQ2_XXS,IQ1_S,Q4_K

The compute rate of the chosen decode variant with the memory taken out: a kernel whose GB/s
here is no higher than on a 256 MiB matrix (bench_kernels.py) is compute-bound. Best of 7 x 200
calls, x encoded once. Calibrated units only (they make their own random valid blocks).
"""
from __future__ import annotations

import sys
import time

import numpy as np

import numallm_kernels as nk
from numallm_kernels.base import Activations
from numallm.gguf_file import GGMLQuantizationType as T

N, K = 256, 2048


def main(names: list[str]) -> None:
    rng = np.random.default_rng(0)
    print("| type | variant | matrix KiB | GB/s from L2 (1 thread) | Mweights/s |")
    print("|---|---|--:|--:|--:|")
    for name in names:
        unit = nk.get(T[name])
        raw = unit.synthetic(N, K, rng)
        w = unit.prepare(raw)
        acts = Activations(rng.standard_normal((1, K)).astype(np.float32))
        out = np.zeros((1, N), np.float32)      # (1, N)
        variant = unit.choice().matvec
        unit.prepare_variant_x(variant, acts)
        unit.run_x(variant, w, acts, out, 0, N)  # compile outside the timing
        best = float("inf")
        for _ in range(7):
            t0 = time.perf_counter()
            for _ in range(200):
                unit.run_x(variant, w, acts, out, 0, N)
            best = min(best, (time.perf_counter() - t0) / 200)
        print(f"| {name} | {variant} | {raw.nbytes / 1024:.0f} | {raw.nbytes / best / 1e9:.2f} | "
              f"{N * K / best / 1e6:.0f} |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1].split(",") if len(sys.argv) > 1 else ["IQ2_XXS", "IQ1_S", "Q4_K"])
