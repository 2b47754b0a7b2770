"""NUMA execution cost: --numa shard over virtual nodes against --numa off on the same cores.

Run:  .venv/bin/pytest benchmarks/bench_numa.py --benchmark-enable -s
Uses the synthetic TinyLlama-1.1B-shape Q4_0 model of bench_e2e.py (cached in
$NUMALLM_SYNTH_CACHE, else <tmp>/numallm-synth). Cases:
  join:   one cross-node join with no work (NodePools.run_nodes round trip), the unit that
          placement.JOIN_COST_S stands for;
  decode: one token with off (one pool over the cores) and with shard (one pinned pool per
          virtual node), printing tokens/s, the sync ms per token the joins cost beyond the
          slowest node's work, and the ms per token during which no matrix kernel runs.
Needs as many cores as virtual nodes. Not asserted: timings on a shared machine are noisy.
"""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

import numallm
from numallm import synth, threads
from numallm import ops
from numallm.bench import busy_s

N_CTX = 256
N_NODES = 2
needs_cores = pytest.mark.skipif(len(os.sched_getaffinity(0)) < N_NODES,
                                 reason=f"needs {N_NODES} allowed CPUs")


@pytest.fixture(scope="module")
def path() -> str:
    cache = Path(os.environ.get("NUMALLM_SYNTH_CACHE") or Path(tempfile.gettempdir()) / "numallm-synth")
    return str(synth.cached_model(cache, qtype="Q4_0", shape="tinyllama-1.1b", vocab="spm"))


@needs_cores
def test_join(benchmark):
    cpus = sorted(os.sched_getaffinity(0))[:N_NODES]
    pools = threads.NodePools([(c,) for c in cpus], [1] * N_NODES)
    noop = [lambda: None] * N_NODES
    try:
        with threads.activate(pools):
            benchmark.pedantic(lambda: pools.run_nodes(noop), rounds=2000, iterations=1,
                               warmup_rounds=50)
    finally:
        pools.close()
    if benchmark.stats is not None:
        s = benchmark.stats.stats
        print(f"\njoin of {N_NODES} node leaders: median {1e6 * s.median:.1f} us, "
              f"mean {1e6 * s.mean:.1f} us")


@needs_cores
@pytest.mark.parametrize("numa", ["off", "shard"])
def test_decode(benchmark, path, numa):
    opts = {"numa": "shard", "virtual_nodes": N_NODES} if numa == "shard" else {"n_threads": N_NODES}
    llm = numallm.load(path, n_ctx=N_CTX, **opts)
    ids = np.random.default_rng(0).integers(0, llm.args.n_vocab, 16, dtype=np.int64)  # (16,)
    try:
        with threads.activate(llm.pool):
            llm.model(ids, llm.cache, 0)              # prompt, also warm-up (compile, page cache)
            before = llm.placement.sync_stats()
            # every round decodes at position 16, overwriting the same KV slot
            benchmark.pedantic(lambda: llm.model(ids[:1], llm.cache, 16), rounds=10, iterations=1,
                               warmup_rounds=1)
            after = llm.placement.sync_stats()
            with ops.timing([]) as spans:
                t0 = time.perf_counter()
                for _ in range(5):
                    llm.model(ids[:1], llm.cache, 16)
                wall = time.perf_counter() - t0
    finally:
        llm.close()
    if benchmark.stats is None:
        return
    best = benchmark.stats.stats.min
    rounds = benchmark.stats.stats.rounds + 1         # + the warm-up round, also counted by sync
    sync = "" if before is None else f", sync {1e3 * (after - before).sync_s / rounds:.2f} ms/token"
    other = 1e3 * (wall - busy_s(spans)) / 5
    benchmark.extra_info.update({"tokens/s": round(1 / best, 2), "non-kernel ms/token": round(other, 2)})
    print(f"\ndecode, numa {numa}: {1 / best:.2f} tokens/s (best of {rounds - 1}){sync}, "
          f"non-kernel {other:.2f} ms/token")
