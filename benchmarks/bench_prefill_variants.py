"""Every variant of a type's kernel unit on a prefill-sized product, one thread: G
multiply-adds per second for T = 8, 32, 128 tokens (calibration's prefill sizes) against one
weight matrix that stays in the cache (as calibration times prefill: compute-bound).

Run:  python benchmarks/bench_prefill_variants.py IQ2_XXS,IQ1_S,Q6_K [--rows 2048] [--k 2048]

Best of 5 calls, the calling thread's CPU time (time.thread_time). Not asserted: run it alone,
under flock. Results: benchmarks/results/.
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np
from gguf import GGMLQuantizationType as T
from threadpoolctl import threadpool_limits

import numallm_kernels as nk


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("types")
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--k", type=int, default=2048)
    ap.add_argument("--tokens", default="8,32,128")
    a = ap.parse_args()
    n, k = a.rows, a.k
    print(f"N {n}, K {k}, load {os.getloadavg()[0]:.2f}; G multiply-adds/s, one thread, "
          "best of 5 (thread CPU time)")
    print("| type | T | variant: G MAC/s |")
    print("|---|--:|---|")
    for name in a.types.split(","):
        unit = nk.get(getattr(T, name))
        w = unit.prepare(unit.synthetic(n, k, np.random.default_rng(0)))
        for t in (int(v) for v in a.tokens.split(",")):
            x = np.random.default_rng(1).standard_normal((t, k)).astype(np.float32)
            row = []
            for v in unit.variants():
                if v == "numba-f32":          # the portable float loop: far behind, slow to time
                    continue
                out = np.zeros((t, n), np.float32)
                unit.run(v, w, x, out, 0, n)  # compile, warm
                best = float("inf")
                for _ in range(5):
                    t0 = time.thread_time()
                    unit.run(v, w, x, out, 0, n)
                    best = min(best, time.thread_time() - t0)
                row.append(f"{v} {n * k * t / best / 1e9:.1f}")
            print(f"| {name} | {t} | " + ", ".join(row) + " |", flush=True)


if __name__ == "__main__":
    with threadpool_limits(1):     # blas-tile on one thread, as the engine's workers run it
        main()
