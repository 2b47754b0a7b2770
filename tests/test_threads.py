"""RowPool: the lock hand-over runs each call once on its own thread, waits for all of them,
passes errors on, and splits rows at the kernels' row multiples."""
from __future__ import annotations

import threading

import pytest

from numallm import threads


def test_run_each_runs_every_call_on_its_own_thread_and_waits():
    pool = threads.RowPool(3)
    try:
        for n_calls in (3, 2, 3, 1):       # fewer calls than threads leave the rest idle
            seen = []
            done = threading.Event()

            def call(i):
                if i == 1:
                    done.wait(5)           # the caller must wait for this one
                seen.append((i, threading.get_ident()))

            calls = [lambda i=i: call(i) for i in range(n_calls)]
            if n_calls > 1:
                threading.Timer(0.05, done.set).start()
            pool.run_each(calls)
            assert sorted(i for i, _ in seen) == list(range(n_calls))
            assert len({t for _, t in seen}) == n_calls
            assert dict(seen)[0] == threading.get_ident()   # calls[0] runs on the caller
    finally:
        pool.close()


def test_errors_reach_the_caller_after_every_call_finished():
    pool = threads.RowPool(2)
    try:
        finished = []

        def slow_ok():
            threading.Event().wait(0.05)
            finished.append("worker")

        def boom():
            raise ValueError("caller share failed")

        with pytest.raises(ValueError, match="caller share"):
            pool.run_each([boom, slow_ok])
        assert finished == ["worker"]      # not abandoned mid-call

        def worker_boom():
            raise KeyError("worker share failed")

        with pytest.raises(KeyError, match="worker share"):
            pool.run_each([lambda: None, worker_boom])
        pool.run_each([lambda: None, lambda: finished.append("again")])   # still usable
        assert finished == ["worker", "again"]
    finally:
        pool.close()
    pool.close()                           # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        pool.run_each([lambda: None, lambda: None])


def test_split_rows_respects_minimum_and_multiple():
    assert threads.split_rows(1000, 2, 8) == ((0, 504), (504, 1000))
    assert threads.split_rows(100, 2) == ((0, 100),)          # under 2 x MIN_ROWS_PER_THREAD
    assert threads.split_rows(256, 4, 8) == ((0, 64), (64, 128), (128, 192), (192, 256))
    for n, k, m in ((5632, 2, 8), (2049, 3, 8), (37, 2, 1)):
        parts = threads.split_rows(n, k, m)
        assert parts[0][0] == 0 and parts[-1][1] == n
        assert all(b == c for (_, b), (c, _) in zip(parts, parts[1:]))
        assert all(a % m == 0 for a, _ in parts)
