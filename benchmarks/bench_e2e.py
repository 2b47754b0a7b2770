"""End-to-end decode and prefill speed on a synthetic TinyLlama-1.1B-shape Q4_0 model.

Run:  .venv/bin/pytest benchmarks/bench_e2e.py --benchmark-enable -s
The model (~620 MB, ~30 s to write) is cached in $NUMALLM_SYNTH_CACHE, else in
<tmp>/numallm-synth. Each case prints tokens/s and the weight GB/s one forward streams;
compare with `numallm bench` (same forward) and the machine's read bandwidth. Not asserted:
timings on a shared machine are noisy.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pytest

import numallm
from numallm import synth, threads

N_PREFILL = 128
N_CTX = 256


@pytest.fixture(scope="module")
def llm():
    cache = Path(os.environ.get("NUMALLM_SYNTH_CACHE") or Path(tempfile.gettempdir()) / "numallm-synth")
    path = synth.cached_model(cache, qtype="Q4_0", shape="tinyllama-1.1b", vocab="spm")
    model = numallm.load(str(path), n_ctx=N_CTX, n_threads=1)
    yield model
    model.close()


def _report(benchmark, llm, label: str, tokens: int, passes: int) -> None:
    if benchmark.stats is None:   # --benchmark-disable: the step ran once, nothing measured
        return
    best = benchmark.stats.stats.min
    tps, gbs = tokens / best, llm.weight_bytes * passes / best / 1e9
    benchmark.extra_info.update({"tokens/s": round(tps, 2), "GB/s": round(gbs, 2)})
    print(f"\n{label}: {tps:.2f} tokens/s, {gbs:.2f} GB/s of weights (best of "
          f"{benchmark.stats.stats.rounds})")


@pytest.mark.parametrize("n_threads", [1, 2])
def test_decode(benchmark, llm, n_threads):
    ids = np.random.default_rng(0).integers(0, llm.args.n_vocab, 16, dtype=np.int64)  # (16,)
    pool = threads.RowPool(n_threads)
    try:
        with threads.activate(pool):
            llm.model(ids, llm.cache, 0)          # prompt, also warm-up (compile, page cache)
            # every round decodes at position 16, overwriting the same KV slot
            benchmark.pedantic(lambda: llm.model(ids[:1], llm.cache, 16), rounds=10,
                               iterations=1, warmup_rounds=1)
    finally:
        pool.close()
    _report(benchmark, llm, f"decode, {n_threads} threads", 1, 1)


@pytest.mark.parametrize("n_threads", [1, 2])
def test_prefill(benchmark, llm, n_threads):
    ids = np.random.default_rng(1).integers(0, llm.args.n_vocab, N_PREFILL, dtype=np.int64)
    pool = threads.RowPool(n_threads)
    try:
        with threads.activate(pool):
            llm.model(ids[:8], llm.cache, 0)      # warm-up: compile the batched kernels
            benchmark.pedantic(lambda: llm.model(ids, llm.cache, 0), rounds=3, iterations=1)
    finally:
        pool.close()
    _report(benchmark, llm, f"prefill {N_PREFILL}, {n_threads} threads", N_PREFILL, 1)
