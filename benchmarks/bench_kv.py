"""Decode attention over a long KV cache, per cache type: one layer's kernel call (the one
`numallm.kvcache.attend` makes for a decoded token) at a given context length.

    .venv/bin/python benchmarks/bench_kv.py [CTX] [N_KV] [GROUP] [HEAD_DIM]   # default 4096 4 8 64

The defaults are TinyLlama-1.1B's attention (4 KV heads of 64, 8 query heads each). Prints a
markdown table: cache bytes per layer, best and median microseconds of 30 calls, GB/s of cache
read. Not asserted (a shared machine's timings are noisy); run it under the team's lock.
End to end, the same comparison is `numallm bench MODEL -p 0 -n 16 -d 4096 -ctk T -ctv T`.
"""
from __future__ import annotations

import sys
import time

import numpy as np

from numallm import kvcache
from numallm.cache_types import CACHE_TYPES
from numallm_kernels import fused


def time_attend(cache: kvcache.KVCache, q: np.ndarray, pos: int, reps: int = 30) -> list[float]:
    """Seconds of each of `reps` calls of the decode kernel at position pos (after one warm-up)."""
    n_head, hd = q.shape[1], q.shape[2]
    out = np.empty((1, n_head * hd), np.float32)            # (1, n_head * hd)
    scores = np.empty((n_head, pos + 1), np.float32)         # (n_head, pos + 1)
    k, v = cache.k, cache.v
    scale = np.float32(1 / np.sqrt(hd))
    times = []
    for i in range(reps + 1):
        t0 = time.perf_counter()
        fused.attend(q, k.a, k.d, v.a, v.d, pos, scale, out, scores)
        if i:
            times.append(time.perf_counter() - t0)
    return times


def main(argv: list[str]) -> None:
    ctx, n_kv, group, hd = (list(map(int, argv)) + [4096, 4, 8, 64][len(argv):])[:4]
    rng = np.random.default_rng(0)
    kv = rng.standard_normal((ctx, n_kv, hd)).astype(np.float32)   # (ctx, n_kv, hd)
    q = rng.standard_normal((1, n_kv * group, hd)).astype(np.float32)
    print(f"decode attention, one layer: {ctx} positions, {n_kv} KV heads x {group} query heads, "
          f"head size {hd}\n")
    print("| cache type | MiB per layer | best us | median us | GB/s read |")
    print("|---|--:|--:|--:|--:|")
    for t in CACHE_TYPES:
        cache = kvcache.KVCache(ctx, n_kv, hd, type_k=t, type_v=t)
        cache.store(kv, kv, 0)
        times = time_attend(cache, q, ctx - 1)
        best = min(times)
        print(f"| {t} | {cache.nbytes / 2**20:.1f} | {best * 1e6:.0f} | {np.median(times) * 1e6:.0f} | "
              f"{cache.nbytes / best / 1e9:.1f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
