"""RowPool: the lock hand-over runs each call once on its own thread, waits for all of them,
passes errors on, and splits rows at the kernels' row multiples."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from numallm import ops, threads


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


def _q4_0_tasks(np, rng, n_tasks, n_t=1):
    """A Q4_0 matrix cut into n_tasks row ranges of 8 rows: (unit, w, acts, reference out)."""
    import numallm_kernels as nk
    from numallm.gguf_file import GGMLQuantizationType as T
    from numallm_kernels.base import Activations

    unit = nk.get(T.Q4_0)
    n, k = 8 * n_tasks, 256
    w = unit.prepare(unit.synthetic(n, k, rng))
    acts = Activations(rng.standard_normal((n_t, k)).astype(np.float32))
    unit.prepare_x(acts)
    ref = np.zeros((n_t, n), np.float32)
    unit.matmul_x(w, acts, ref, 0, n)
    return unit, w, acts, ref


def test_run_tasks_grows_its_table_under_running_workers():
    """More tasks than the pool's first table holds: the table is replaced while the workers
    wait in native code, and each command must carry the new table (not the one a worker
    started with)."""
    np = pytest.importorskip("numpy")
    from numallm import ops

    rng = np.random.default_rng(1)
    pool = threads.RowPool(2)
    try:
        for n_tasks in (4, 150, 400):            # the first table has 64 rows
            unit, w, acts, ref = _q4_0_tasks(np, rng, n_tasks)
            out = np.zeros_like(ref)
            if unit.native_task(w, acts, out, 0, 8) is None:
                pytest.skip("no native kernel tasks on this CPU")
            shares = [[ops.task(unit, w, acts, out, 8 * j, 8 * j + 8) for j in range(i, n_tasks, 2)]
                      for i in range(2)]
            pool.run_tasks(shares)
            np.testing.assert_array_equal(out.view(np.uint32), ref.view(np.uint32))
    finally:
        pool.close()


def test_a_sleeping_worker_wakes_for_the_next_command(monkeypatch):
    """A worker that found no command for IDLE_POLLS sleeps in futex(2); the next command
    (native or Python) must wake it, however long it slept."""
    np = pytest.importorskip("numpy")
    import time

    from numallm import ops

    monkeypatch.setattr(threads, "IDLE_POLLS", 1)        # sleep at once
    rng = np.random.default_rng(2)
    pool = threads.RowPool(2)
    try:
        unit, w, acts, ref = _q4_0_tasks(np, rng, 32)
        for pause in (0.0, 0.02, 0.2):
            time.sleep(pause)
            out = np.zeros_like(ref)
            pool.run_tasks([[ops.task(unit, w, acts, out, 0, 128)],
                            [ops.task(unit, w, acts, out, 128, 256)]])
            np.testing.assert_array_equal(out.view(np.uint32), ref.view(np.uint32))
            time.sleep(pause)
            ran = []
            pool.run_each([lambda: ran.append(0), lambda: ran.append(threading.get_ident())])
            assert len(ran) == 2 and ran[1] != threading.get_ident()
    finally:
        pool.close()


@pytest.mark.parametrize("n_threads", [1, 2])
def test_replayed_decode_dispatch_matches_a_fresh_one(n_threads):
    """ops.matmuls replays a decode dispatch (T = 1) from a table encoded once: new inputs give
    the products a fresh dispatch gives, and earlier results are not overwritten."""
    np = pytest.importorskip("numpy")
    import numallm_kernels as nk
    from numallm import ops
    from numallm.gguf_file import GGMLQuantizationType as T

    class Q:                                   # what ops.Linear reads from a GGUF tensor
        def __init__(self, qt, raw, name):
            self.qtype, self.data, self.name = qt, raw, name
            self.shape = (raw.shape[0], 512)
            self.nbytes = raw.nbytes

    rng = np.random.default_rng(3)
    lins = [ops.Linear(Q(qt, nk.get(qt).synthetic(n, 512, rng), f"m{i}"))
            for i, (qt, n) in enumerate([(T.Q4_0, 264), (T.Q4_K, 136), (T.Q8_0, 64)])]
    pool = threads.RowPool(n_threads)
    try:
        with threads.activate(pool):
            firsts, kept = None, []
            for step in range(4):
                x = rng.standard_normal((1, 512)).astype(np.float32)
                got = ops.matmuls(x, *lins)
                kept.append((x, [g.copy() for g in got], got))
                replays = lins[0]._replays or {}
                if step == 0:
                    firsts = dict(replays)
                else:                          # the same replay object every token
                    assert replays == firsts
            assert any(r.ok for r in firsts.values()) or not nk.get(T.Q4_0).native_slot
            for x, want_copy, got in kept:     # earlier outputs were not overwritten
                for a, b in zip(got, want_copy):
                    np.testing.assert_array_equal(a, b)
            ops.REPLAY_EPOCH += 1            # a fresh dispatch (and a fresh replay) again
            for x, want, _ in kept:
                fresh = [matmul_fresh(np, lin, x) for lin in lins]
                for a, b in zip(want, fresh):
                    np.testing.assert_array_equal(a.view(np.uint32), b.view(np.uint32))
    finally:
        pool.close()


def matmul_fresh(np, lin, x):
    """x @ W.T through the unit directly, one call over all rows."""
    from numallm_kernels.base import Activations

    acts = Activations(x)
    lin.unit.prepare_x(acts)
    out = np.zeros((1, lin.shape[0]), np.float32)
    lin.unit.matmul_x(lin.w, acts, out, 0, lin.shape[0])
    return out


def test_a_prefills_per_token_ops_split_over_threads_give_the_same_bits():
    # from ops.SPLIT_ROWS_MIN tokens on, the activation encodings of matmuls and SwiGLU run on
    # every thread of the pool, each its share of the token rows
    from numallm_kernels._kquant_common import q8_k_form
    from numallm_kernels.base import Activations
    from numallm_kernels.interleaved import q8_0_form

    rng = np.random.default_rng(3)
    n = ops.SPLIT_ROWS_MIN + 7
    x = rng.standard_normal((n, 512)).astype(np.float32)
    x[3, 5] = np.inf
    pool = threads.RowPool(2)
    try:
        assert ops._splits_rows(pool, n) and not ops._splits_rows(threads.RowPool(1), n)
        for form in (q8_0_form, q8_k_form):
            acts = Activations(x)
            acts.split = lambda fill, x, arrays: ops._on_rows(
                pool, n, lambda a, b: fill(x[a:b], *(r[a:b] for r in arrays)))
            for got, want in zip(acts.form("f", form), form(x)):
                np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8))
        gate, up = (rng.standard_normal((n, 300)).astype(np.float32) for _ in range(2))
        one = ops.swiglu(gate, up)
        with threads.activate(pool):
            two = ops.swiglu(gate, up)
        np.testing.assert_array_equal(two.view(np.uint32), one.view(np.uint32))
    finally:
        pool.close()
