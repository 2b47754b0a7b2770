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


@pytest.mark.parametrize("mixed", [False, True])
def test_run_tasks_native_kernel_tasks_match_one_call(mixed):
    """Kernel tasks run on the workers without the GIL give the bytes of one direct call; a share
    that also holds a Python callable runs as a Python call."""
    np = pytest.importorskip("numpy")
    import numallm_kernels as nk
    from numallm import ops
    from numallm.gguf_file import GGMLQuantizationType as T
    from numallm_kernels.base import Activations

    rng = np.random.default_rng(0)
    pool = threads.RowPool(2)
    try:
        for qt in (T.Q4_0, T.Q4_K):
            unit = nk.get(qt)
            n, k = 203, 512
            w = unit.prepare(unit.synthetic(n, k, rng))
            for n_t in (1, 3):
                acts = Activations(rng.standard_normal((n_t, k)).astype(np.float32))
                unit.prepare_x(acts)
                one = np.zeros((n_t, n), np.float32)
                unit.matmul_x(w, acts, one, 0, n)
                two = np.zeros((n_t, n), np.float32)
                shares = [[ops.task(unit, w, acts, two, a, b)]
                          for a, b in threads.split_rows(n, 2, unit.row_multiple)]
                if unit.native_task(w, acts, two, 0, n) is not None:
                    assert all(type(s[0]) is tuple for s in shares)
                hit = []
                if mixed:
                    shares[1].append(lambda: hit.append(threading.get_ident()))
                pool.run_tasks(shares)
                np.testing.assert_array_equal(two.view(np.uint32), one.view(np.uint32))
                if mixed:                 # the worker ran its share, callable included, once
                    assert len(hit) == 1 and hit[0] != threading.get_ident()
                else:
                    assert hit == []
    finally:
        pool.close()
