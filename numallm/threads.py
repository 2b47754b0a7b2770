"""The one place numallm owns threads.

Matmuls split their output rows over a pool of worker threads; each worker calls a `nogil` Numba
kernel on its own rows, so the GIL is not a bottleneck. The pool in use is a context variable set
by `use_threads(n)` (or later by the NUMA placement, with one pool per node); model code never
sees it. Numba's own threading and BLAS threads are capped inside the same context manager so
nothing oversubscribes the cores, and everything is restored on exit (threadpoolctl style).
"""
from __future__ import annotations

import contextlib
import os
import threading
from typing import Callable

import psutil

# A split finer than this many rows costs more in dispatch than it saves.
MIN_ROWS_PER_THREAD = 64


def physical_cores() -> int:
    """Physical cores this process may run on (hyperthreads do not add decode bandwidth)."""
    allowed = len(os.sched_getaffinity(0))
    phys = psutil.cpu_count(logical=False) or allowed
    return max(1, min(allowed, phys))


class RowPool:
    """Persistent workers that run `fn(r0, r1)` over disjoint row ranges of one operation.

    Workers wait on a condition; the caller thread takes the first range itself, so a 1-thread
    pool has no overhead at all.
    """

    def __init__(self, n_threads: int):
        self.n_threads = max(1, int(n_threads))
        self._cv = threading.Condition()
        self._job: tuple[Callable[[int, int], None], list[tuple[int, int]]] | None = None
        self._gen = 0
        self._pending = 0
        self._errors: list[BaseException] = []
        self._closed = False
        self._workers = [threading.Thread(target=self._loop, args=(i,), daemon=True,
                                          name=f"numallm-worker-{i}")
                         for i in range(1, self.n_threads)]
        for t in self._workers:
            t.start()

    def _loop(self, index: int) -> None:
        seen = 0
        while True:
            with self._cv:
                while self._gen == seen and not self._closed:
                    self._cv.wait()
                if self._closed:
                    return
                seen = self._gen
                fn, ranges = self._job
            if index < len(ranges):
                try:
                    fn(*ranges[index])
                except BaseException as e:  # noqa: BLE001 - handed to the caller
                    self._errors.append(e)
            with self._cv:
                self._pending -= 1
                if self._pending == 0:
                    self._cv.notify_all()

    def run(self, fn: Callable[[int, int], None], n_rows: int) -> None:
        """Call fn over [0, n_rows) split into one contiguous range per thread."""
        k = min(self.n_threads, max(1, n_rows // MIN_ROWS_PER_THREAD))
        if k == 1:
            fn(0, n_rows)
            return
        step = -(-n_rows // k)
        ranges = [(a, min(a + step, n_rows)) for a in range(0, n_rows, step)]
        with self._cv:
            self._job = (fn, ranges)
            self._pending = len(self._workers)
            self._errors.clear()
            self._gen += 1
            self._cv.notify_all()
        fn(*ranges[0])
        with self._cv:
            while self._pending:
                self._cv.wait()
        if self._errors:
            raise self._errors[0]

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()


_local = threading.local()


def current() -> RowPool:
    """The pool matmuls use now (a 1-thread pool outside any `use_threads`)."""
    pool = getattr(_local, "pool", None)
    if pool is None:
        pool = _local.pool = RowPool(1)
    return pool


@contextlib.contextmanager
def activate(pool: RowPool):
    """Make `pool` the one matmuls use, with BLAS capped to one thread per worker (our workers
    already fill the cores). Restores the previous pool and BLAS limits on exit."""
    from threadpoolctl import threadpool_limits

    prev = getattr(_local, "pool", None)
    _local.pool = pool
    try:
        with threadpool_limits(limits=1):
            yield pool
    finally:
        _local.pool = prev


@contextlib.contextmanager
def use_threads(n_threads: int | None = None):
    """A fresh pool of `n_threads` workers (default: physical cores), active inside the block."""
    pool = RowPool(n_threads or physical_cores())
    try:
        with activate(pool):
            yield pool
    finally:
        pool.close()
