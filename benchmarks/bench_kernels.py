"""Decode (matvec) bandwidth of the hot kernels on weights >= 256 MB, against the machine's.

    .venv/bin/pytest benchmarks/bench_kernels.py --benchmark-enable -s   # pytest-benchmark
    .venv/bin/python benchmarks/bench_kernels.py [Q4_0,Q8_0,...] [1,2] [MiB]    # quick table

MiB (or NUMALLM_BENCH_MIB) sets the weight size, 256 by default; this Xeon VM reports a 480 MiB
L3, so 1024 checks that 256 MiB is not served from a cache.

Decode is memory-bound: each case reports the weight bytes streamed per second (GB/s) and that as
a share of the read bandwidth measured here with the same number of threads (numallm.bench's
numpy-sum figure). Rows are split over a numallm RowPool exactly as the engine splits them (the
unit's row_multiple respected) and run as the engine runs them (native kernel tasks, no GIL), x
is encoded once per call (prepare_x) as the engine does. This machine's read bandwidth drifts
by 10-20% from minute to minute (27-34 GB/s with 2 threads here), so the quick table measures
it again beside every kernel, in alternating rounds, and gives each kernel's best against the
best bandwidth of the same rounds. Not asserted: timings on a shared machine are noisy.
"""
from __future__ import annotations

import os
import sys
import time

import numpy as np
import pytest

import numallm_kernels as nk
from numallm import ops, threads
from numallm.bench import bandwidth_buffer, read_bandwidth
from numallm.gguf_file import GGMLQuantizationType as T
from numallm.gguf_file import quant_sizes
from numallm_kernels.base import Activations

K = 4096
TARGET_BYTES = int(os.environ.get("NUMALLM_BENCH_MIB", "256")) << 20
TYPES = [T.Q4_0, T.Q8_0, T.Q4_K, T.Q5_K, T.Q6_K]
# byte offsets of the f16 scales inside one block (kept sane; every other bit pattern is valid)
F16_FIELDS = {T.Q4_0: (0,), T.Q8_0: (0,), T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,)}


def make_weights(qtype, nbytes=TARGET_BYTES, seed=0):
    """Random valid blocks, (N, row_bytes) with N * row_bytes >= nbytes, N a multiple of 8."""
    bs, ts = quant_sizes(qtype)
    nb = K // bs
    n = -(-nbytes // (nb * ts))
    n = -(-n // 8) * 8
    rng = np.random.default_rng(seed)
    if qtype in F16_FIELDS:
        raw = rng.integers(0, 256, (n, nb, ts), dtype=np.uint8)
        for off in F16_FIELDS[qtype]:
            f = rng.uniform(1e-4, 1e-2, (n, nb, 1)).astype(np.float16)
            raw[:, :, off:off + 2] = f.view(np.uint8)
        raw = raw.reshape(n, nb * ts)
    else:   # the other calibrated units know their own valid random blocks (the IQ types)
        raw = nk.get(qtype).synthetic(n, K, rng)
    raw.flags.writeable = False  # like a GGUF memmap view
    return raw


class Decode:
    """One matvec over all rows of a >= 256 MB matrix on a `threads`-thread RowPool."""

    def __init__(self, qtype, n_threads, nbytes=None):
        self.unit = nk.get(qtype)
        raw = make_weights(qtype, nbytes or TARGET_BYTES)
        self.nbytes, self.n = raw.nbytes, raw.shape[0]
        self.w = self.unit.prepare(raw)
        del raw
        self.x = np.random.default_rng(1).standard_normal((1, K)).astype(np.float32)
        self.out = np.zeros((1, self.n), np.float32)  # (1, N)
        self.pool = threads.RowPool(n_threads)

    def __call__(self):
        acts = Activations(self.x)
        self.unit.prepare_x(acts)
        self.pool.run_tasks([[ops.task(self.unit, self.w, acts, self.out, a, b)] for a, b in
                             threads.split_rows(self.n, self.pool.n_threads, self.unit.row_multiple)])

    def best_seconds(self, passes: int = 10) -> float:
        self()  # compile / warm up outside the timing
        best = float("inf")
        for _ in range(passes):
            t0 = time.perf_counter()
            self()
            best = min(best, time.perf_counter() - t0)
        return best

    def close(self):
        self.pool.close()


@pytest.fixture(scope="module")
def machine_gbs():
    buf = bandwidth_buffer()
    return {t: read_bandwidth(t, buf) for t in (1, 2)}


@pytest.mark.parametrize("n_threads", [1, 2])
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_decode_gbs(benchmark, machine_gbs, qtype, n_threads):
    run = Decode(qtype, n_threads)
    try:
        with threads.activate(run.pool):
            run()
            benchmark.pedantic(run, rounds=7, iterations=1)
        if benchmark.stats is not None:  # None under --benchmark-disable
            gbs = run.nbytes / benchmark.stats.stats.min / 1e9
            benchmark.extra_info.update({"GB/s": round(gbs, 2),
                                         "share_of_read_bw": round(gbs / machine_gbs[n_threads], 3)})
            print(f"\n{qtype.name} {run.unit.variant} threads={n_threads}: {gbs:.1f} GB/s, "
                  f"{100 * gbs / machine_gbs[n_threads]:.0f}% of {machine_gbs[n_threads]:.1f} GB/s")
        benchmark.extra_info["weight_bytes"] = run.nbytes
        benchmark.extra_info["variant"] = run.unit.variant
    finally:
        run.close()


ROUNDS = 5


if __name__ == "__main__":
    types = [T[n] for n in sys.argv[1].split(",")] if len(sys.argv) > 1 else TYPES
    counts = [int(t) for t in sys.argv[2].split(",")] if len(sys.argv) > 2 else [1, 2]
    size = (int(sys.argv[3]) << 20) if len(sys.argv) > 3 else TARGET_BYTES
    buf = bandwidth_buffer()
    print("| type | variant | threads | MiB | GB/s | read GB/s | share |")
    print("|---|---|--:|--:|--:|--:|--:|")
    for qt in types:
        for th in counts:
            r = Decode(qt, th, size)
            bw, s = 0.0, float("inf")
            with threads.activate(r.pool):
                for _ in range(ROUNDS):      # alternate, so a bandwidth drift hits both alike
                    bw = max(bw, read_bandwidth(th, buf, repeats=3))
                    s = min(s, r.best_seconds(5))
            r.close()
            g = r.nbytes / s / 1e9
            print(f"| {qt.name} | {r.unit.variant} | {th} | {r.nbytes / 2**20:.0f} | {g:.1f} | "
                  f"{bw:.1f} | {100 * g / bw:.0f}% |", flush=True)
