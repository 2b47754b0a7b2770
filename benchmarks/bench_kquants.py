"""Decode (matvec) throughput of the Q4_K and Q6_K kernels on >= 256 MB weights, 1 and 2 threads.

Not asserted: decode is memory-bandwidth bound, so the number to compare is GB/s of weight bytes
read against the machine's bandwidth (llama.cpp Q4_K_M decode runs close to it).

    .venv/bin/pytest benchmarks/bench_kquants.py --benchmark-enable   # GB/s in extra_info
    .venv/bin/python benchmarks/bench_kquants.py                       # quick table
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import numallm_kernels as nk
from numallm.gguf_file import GGMLQuantizationType as T
from numallm.gguf_file import quant_sizes

K = 4096
TARGET_BYTES = 256 << 20
F16_FIELDS = {T.Q4_K: (0, 2), T.Q6_K: (208,)}  # byte offsets of the f16 super-scales


def make_weights(qtype, nbytes=TARGET_BYTES, seed=0):
    """Random valid blocks, (N, row_bytes) with N * row_bytes >= nbytes; f16 scales kept sane."""
    bs, ts = quant_sizes(qtype)
    nb = K // bs
    n = -(-nbytes // (nb * ts))
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (n, nb, ts), dtype=np.uint8)
    for off in F16_FIELDS[qtype]:
        f = rng.uniform(1e-4, 1e-2, (n, nb, 1)).astype(np.float16)
        raw[:, :, off:off + 2] = f.view(np.uint8)
    raw = raw.reshape(n, nb * ts)
    raw.flags.writeable = False  # like a GGUF memmap view
    return raw


class Decode:
    """One matvec over all rows, split into `threads` contiguous row ranges."""

    def __init__(self, qtype, threads):
        self.unit = nk.get(qtype)
        self.raw = make_weights(qtype)
        self.w = self.unit.prepare(self.raw)
        self.n = self.raw.shape[0]
        self.x = np.random.default_rng(1).standard_normal(K).astype(np.float32)
        self.out = np.zeros(self.n, np.float32)  # (N,)
        cuts = np.linspace(0, self.n, threads + 1).astype(int)
        self.ranges = list(zip(cuts[:-1], cuts[1:]))
        self.pool = ThreadPoolExecutor(threads) if threads > 1 else None

    def __call__(self):
        if self.pool is None:
            self.unit.matvec(self.w, self.x, self.out, 0, self.n)
        else:
            futs = [self.pool.submit(self.unit.matvec, self.w, self.x, self.out, a, b)
                    for a, b in self.ranges]
            for f in futs:
                f.result()

    @property
    def nbytes(self) -> int:
        return self.raw.nbytes

    def close(self):
        if self.pool is not None:
            self.pool.shutdown()


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q6_K], ids=lambda t: t.name)
def test_decode_gbs(benchmark, qtype, threads):
    run = Decode(qtype, threads)
    try:
        run()  # compile / warm the caches outside the timing
        benchmark.pedantic(run, rounds=5, iterations=1)
        if benchmark.stats is not None:  # None under --benchmark-disable
            best = benchmark.stats.stats.min
            benchmark.extra_info["GB/s"] = round(run.nbytes / best / 1e9, 2)
        benchmark.extra_info["weight_bytes"] = run.nbytes
        benchmark.extra_info["variant"] = run.unit.variant
    finally:
        run.close()


if __name__ == "__main__":
    for qt in (T.Q4_K, T.Q6_K):
        for th in (1, 2):
            r = Decode(qt, th)
            r()
            times = []
            for _ in range(7):
                t0 = time.perf_counter()
                r()
                times.append(time.perf_counter() - t0)
            r.close()
            gbs = [r.nbytes / t / 1e9 for t in times]
            print(f"{qt.name} {r.unit.variant} {th} thread(s), {r.nbytes / 2**20:.0f} MiB: "
                  f"best {max(gbs):.1f} GB/s, median {np.median(gbs):.1f} GB/s")
