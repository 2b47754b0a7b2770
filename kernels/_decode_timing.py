"""Time a unit's variants the way decode runs them, for `_calibrate`.

A decode step reads every weight matrix once, from DRAM (a model is far larger than the L3),
split over the engine's threads, each product one dispatch to the pool: the activation encoded
on the caller, then each thread's row range as a task. A matrix small enough to stay in the
cache, timed on one thread, measures compute instead: on AMD Zen 4 that picked a variant that
was faster from the cache and slower end to end. So `decode_gbs` times a cycle of decode-sized
matrices whose total exceeds twice the L3, each matrix one dispatch on a pool of the real thread
count (the engine's pool where numallm registered it, `register_dispatch`), and reports the
weight bytes per second of the whole cycle.

Bounded: at most CYCLE_MAX_BYTES of weights are prepared (once per unit, shared by the
variants), and each variant gets at most ROUNDS passes within ROUND_BUDGET_S per thread count.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .base import Activations

# one decode-sized matrix (rows, cols): TinyLlama's ffn_up, a 1-8B model's typical product
MATRIX_ROWS, MATRIX_COLS = 5632, 2048
CYCLE_MIN_BYTES = 64 << 20       # even where the L3 is small or unknown
CYCLE_MAX_BYTES = 1 << 30        # bounds the memory and time of a calibration (and 1/8 of free RAM)
ROUNDS = 7                       # passes over the cycle per variant and thread count (best kept)
ROUND_BUDGET_S = 0.6             # at most this long per variant and thread count
DEFAULT_L3 = 32 << 20

_dispatch: dict = {}


def register_dispatch(make_pool: Callable[[int], object], thread_counts: Callable[[], Sequence[int]]) -> None:
    """How the engine dispatches a product: make_pool(n) -> a pool with `n_threads`,
    `run_tasks(shares)` (thread i runs shares[i]: native task tuples or callables), `encode`,
    `run_encoded` and `close` (numallm.threads.RowPool); thread_counts() -> the counts to time
    (numallm: 1 and the physical cores). Without it, one thread on the caller."""
    _dispatch["make_pool"], _dispatch["counts"] = make_pool, thread_counts


class _CallerPool:
    """One thread, the caller: what decode_gbs uses when no engine registered its pool."""

    n_threads = 1

    def run_tasks(self, shares) -> None:
        from . import _native

        run_tasks, _ = _native.executors()
        for t in shares[0]:
            if type(t) is tuple:
                row = np.zeros((1, _native.TASK_FIELDS), np.int64)
                _native.encode(row[0], *t)
                run_tasks(row, 0, 1)
            else:
                t()

    def encode(self, shares):
        return None

    def close(self) -> None:
        pass


def thread_counts() -> list[int]:
    counts = _dispatch.get("counts")
    return sorted(set(counts())) if counts else [1]


def _make_pool(n: int):
    make = _dispatch.get("make_pool")
    return make(n) if make else _CallerPool()


def l3_bytes(sysfs: str = "/sys/devices/system/cpu/cpu0/cache") -> int:
    """The largest level-3 cache this CPU reports (sysfs), else DEFAULT_L3."""
    best = 0
    for idx in Path(sysfs).glob("index*"):
        try:
            if (idx / "level").read_text().strip() != "3":
                continue
            s = (idx / "size").read_text().strip().upper()
        except OSError:
            continue
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(s[-1:], 1)
        try:
            best = max(best, int(s.rstrip("KMG")) * mult)
        except ValueError:
            continue
    return best or DEFAULT_L3


def cycle_bytes(l3: int) -> int:
    """Weight bytes the timing cycles over: twice the L3, within [CYCLE_MIN, CYCLE_MAX] and at
    most an eighth of the memory available now."""
    try:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        free = 8 * CYCLE_MAX_BYTES
    return max(CYCLE_MIN_BYTES, min(CYCLE_MAX_BYTES, free // 8, 2 * l3))


class DecodeCycle:
    """Prepared copies of one synthetic decode-sized matrix, enough to pass `nbytes` of raw
    weights; each copy its own memory, so a pass over them all streams from DRAM."""

    def __init__(self, unit, nbytes: int, rng: np.random.Generator):
        raw = unit.synthetic(MATRIX_ROWS, MATRIX_COLS, rng)            # (N, row_bytes) uint8
        self.unit = unit
        self.copies = max(2, -(-nbytes // raw.nbytes))
        self.ws = [unit.prepare(raw if unit.repacks else raw.copy()) for _ in range(self.copies)]
        self.nbytes = raw.nbytes * self.copies                          # weight bytes per pass
        self.x = rng.standard_normal((1, MATRIX_COLS)).astype(np.float32)  # (1, K)
        self.out = np.empty((1, MATRIX_ROWS), np.float32)               # (1, N)


def _split(n_rows: int, n_threads: int, multiple: int) -> list[tuple[int, int]]:
    step = -(-n_rows // n_threads)
    step = -(-step // multiple) * multiple
    return [(a, min(a + step, n_rows)) for a in range(0, n_rows, step)]


def _dispatches(cycle: DecodeCycle, config: str, pool) -> list[Callable[[], None]]:
    """One callable per matrix of the cycle: refill the activation, run every thread's rows of
    that matrix on `pool` (a pre-encoded task table, as ops' decode replays, where the variant
    has native tasks). config: a variant, or "VARIANT+pf" for decode's software prefetch."""
    from ._calibrate import split_config

    variant, pf = split_config(config)
    unit = cycle.unit
    acts = Activations(cycle.x.copy())
    unit.prepare_variant_x(variant, acts)
    ranges = _split(MATRIX_ROWS, pool.n_threads, unit.row_multiple)
    calls = []
    for w in cycle.ws:
        shares = []
        for a, b in ranges:
            task = unit.variant_task(variant, w, acts, cycle.out, a, b, pf)
            shares.append([task if task is not None else
                           (lambda w=w, a=a, b=b: unit.run_x(variant, w, acts, cycle.out, a, b))])
        enc = pool.encode(shares) if acts.refillable else None
        if enc is not None:
            calls.append(lambda enc=enc: (acts.refill(cycle.x), pool.run_encoded(*enc)))
        else:
            calls.append(lambda shares=shares: (acts.refill(cycle.x), pool.run_tasks(shares))
                         if acts.refillable else pool.run_tasks(shares))
    return calls


def decode_gbs(cycle: DecodeCycle, variants: Sequence[str],
               counts: Sequence[int]) -> dict[str, dict[int, float]]:
    """{variant: {threads: GB/s}}: weight bytes per second of the best pass over the cycle, the
    variants taking turns round by round (a load change on a shared machine hits all alike)."""
    got: dict[str, dict[int, float]] = {v: {} for v in variants}
    for n in counts:
        pool = _make_pool(n)
        try:
            runs = {}
            for v in variants:
                calls = _dispatches(cycle, v, pool)
                for c in calls[:2]:      # warm-up: compile, first touch of the pool
                    c()
                runs[v] = calls
            best = {v: float("inf") for v in runs}
            start = time.perf_counter()
            for r in range(ROUNDS):
                for v, calls in runs.items():
                    t0 = time.perf_counter()
                    for c in calls:
                        c()
                    best[v] = min(best[v], time.perf_counter() - t0)
                if r >= 2 and time.perf_counter() - start > ROUND_BUDGET_S * max(1, len(runs)):
                    break
            for v, s in best.items():
                got[v][n] = round(cycle.nbytes / s / 1e9, 2)
        finally:
            pool.close()
    return got

