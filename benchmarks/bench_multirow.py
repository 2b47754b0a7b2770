"""One thread's record kernel with T = 1, 2, 4, 8, 16 activation rows (batched decode, short
prefill chunks) on one weight matrix: milliseconds per call and per token, and the effective
rate (weight bytes x T per second: how fast the kernel gets through the weights for all rows).

Run:  python benchmarks/bench_multirow.py Q4_0,Q8_0,Q4_K,Q6_K [ROWS] [--wall]

Times are the calling thread's CPU time (time.thread_time), best of 5, so that other processes
on a busy machine count less than in wall time (a sibling hyper-thread still slows the core);
--wall uses wall-clock time instead. Not asserted: run it alone, under flock.
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np
from gguf import GGMLQuantizationType as T

import numallm_kernels as nk
from numallm_kernels.base import Activations

K = 2048


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("types")
    ap.add_argument("rows", nargs="?", type=int, default=65536)
    ap.add_argument("--wall", action="store_true")
    a = ap.parse_args()
    clock = time.perf_counter if a.wall else time.thread_time
    print(f"K {K}, rows {a.rows}, load {os.getloadavg()[0]:.2f}, "
          f"{'wall' if a.wall else 'thread CPU'} time")
    rng = np.random.default_rng(0)
    for name in a.types.split(","):
        unit = nk.get(getattr(T, name))
        w = unit.prepare(unit.synthetic(a.rows, K, rng))
        mib = w.q.nbytes / 2**20
        for t in (1, 2, 4, 8, 16):
            x = rng.standard_normal((t, K)).astype(np.float32)
            acts = Activations(x)
            unit.prepare_x(acts)
            out = np.empty((t, a.rows), np.float32)                  # (T, rows)
            unit.matmul_x(w, acts, out, 0, a.rows)
            best = np.inf
            for _ in range(5):
                t0 = clock()
                unit.matmul_x(w, acts, out, 0, a.rows)
                best = min(best, clock() - t0)
            print(f"{name:5} {mib:6.1f} MiB  T={t:2d}  {best * 1e3:8.2f} ms  "
                  f"{best * 1e3 / t:6.2f} ms/token  {w.q.nbytes * t / best / 1e9:6.1f} GB/s x T",
                  flush=True)


if __name__ == "__main__":
    main()
