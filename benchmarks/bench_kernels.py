"""Decode (matvec) bandwidth of the 32-element block kernels on weights >= 256 MB.

Run:  .venv/bin/pytest benchmarks/bench_kernels.py --benchmark-enable -s
Each case prints the weight bytes streamed per second (GB/s); decode is memory-bound, so compare
with the machine's read bandwidth. Threads are a ThreadPoolExecutor over row halves, as the
engine splits rows. Not asserted: timings on a shared machine are noisy.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import numallm_kernels as nk
from numallm.gguf_file import GGMLQuantizationType as T

K = 4096
TARGET_BYTES = 256 << 20


@pytest.fixture(scope="module", params=[T.Q4_0, T.Q8_0], ids=lambda q: q.name)
def weight(request):
    unit = nk.get(request.param)
    n = -(-TARGET_BYTES // (K // 32 * unit.type_size))
    n = (n + 7) // 8 * 8
    w = unit.prepare(unit.synthetic(n, K, np.random.default_rng(0)))
    return unit, w


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("variant", ["avx2-q8act", "numba-f32", "blas-tile"])
def test_matvec_bandwidth(benchmark, weight, variant, threads):
    unit, w = weight
    if variant not in unit.variants():
        pytest.skip(f"{variant} cannot run on this CPU")
    n = w.shape[0]
    x = np.random.default_rng(1).standard_normal((1, K)).astype(np.float32)
    out = np.empty((1, n), np.float32)
    pool = ThreadPoolExecutor(threads)
    cuts = [n * i // threads for i in range(threads + 1)]

    def step():
        futures = [pool.submit(unit.run, variant, w, x, out, a, b) for a, b in zip(cuts, cuts[1:])]
        for f in futures:
            f.result()

    step()  # compile / load from cache outside the timing
    benchmark.pedantic(step, rounds=7, iterations=1)
    pool.shutdown()
    if benchmark.stats is not None:
        gbs = w.nbytes / benchmark.stats.stats.min / 1e9
        benchmark.extra_info["GB/s"] = round(gbs, 2)
        print(f"\n{unit.qtype.name} {variant} threads={threads}: {gbs:.1f} GB/s "
              f"({w.nbytes / 2**20:.0f} MiB)")
