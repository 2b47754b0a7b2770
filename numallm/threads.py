"""The one place numallm owns threads.

Matmuls split their output rows over a pool of worker threads; each worker calls a `nogil` Numba
kernel on its own rows, so the GIL is not a bottleneck. The pool in use is a thread-local set by
`activate(pool)` (the engine owns one pool; NUMA placement builds it with workers pinned per node);
model code never sees it. BLAS threads are capped inside the same context manager so nothing
oversubscribes the cores, and everything is restored on exit (threadpoolctl style).
"""
from __future__ import annotations

import contextlib
import os
import threading
from typing import Callable, Sequence

import psutil

# A split finer than this many rows costs more in dispatch than it saves.
MIN_ROWS_PER_THREAD = 64


def split_rows(n_rows: int, n_threads: int, multiple: int = 1) -> list[tuple[int, int]]:
    """Contiguous [a, b) ranges covering n_rows, one per thread that gets work: at least
    MIN_ROWS_PER_THREAD rows each, and cut at multiples of `multiple` (a kernel's row group), so
    no group is computed twice."""
    k = min(n_threads, max(1, n_rows // MIN_ROWS_PER_THREAD))
    step = -(-n_rows // k)
    step = -(-step // multiple) * multiple
    return [(a, min(a + step, n_rows)) for a in range(0, n_rows, step)]


def physical_cores() -> int:
    """Physical cores this process may run on (hyperthreads do not add decode bandwidth)."""
    allowed = len(os.sched_getaffinity(0))
    phys = psutil.cpu_count(logical=False) or allowed
    return max(1, min(allowed, phys))


class RowPool:
    """Persistent workers that run `fn(r0, r1)` over disjoint row ranges of one operation.

    Workers wait on a condition; the caller thread takes the first range itself, so a 1-thread
    pool has no overhead at all. `cpus[i]`, when given, is the CPU set thread i runs on: workers
    pin themselves at start, and `activate` pins the caller (thread 0) for the duration.
    """

    def __init__(self, n_threads: int, cpus: Sequence[Sequence[int]] | None = None):
        self.n_threads = max(1, int(n_threads))
        if cpus is not None and len(cpus) != self.n_threads:
            raise ValueError(f"{len(cpus)} CPU sets for {self.n_threads} threads")
        self.cpus = None if cpus is None else tuple(tuple(c) for c in cpus)
        self._cv = threading.Condition()
        self._job: list[Callable[[], None]] = []
        self._gen = 0
        self._pending = 0
        self._errors: list[BaseException] = []
        self._closed = False
        self._workers = [threading.Thread(target=self._loop, args=(i,), daemon=True,
                                          name=f"numallm-worker-{i}")
                         for i in range(1, self.n_threads)]
        for t in self._workers:
            t.start()

    @property
    def native_ids(self) -> list[int]:
        """Kernel thread ids of the workers 1.. (for reading /proc/self/task/<id>)."""
        return [t.native_id for t in self._workers]

    def _loop(self, index: int) -> None:
        if self.cpus is not None:
            os.sched_setaffinity(0, self.cpus[index])   # 0: this thread only
        seen = 0
        while True:
            with self._cv:
                while self._gen == seen and not self._closed:
                    self._cv.wait()
                if self._closed:
                    return
                seen = self._gen
                job = self._job
            if index < len(job):
                try:
                    job[index]()
                except BaseException as e:  # noqa: BLE001 - handed to the caller
                    self._errors.append(e)
            with self._cv:
                self._pending -= 1
                if self._pending == 0:
                    self._cv.notify_all()

    def run(self, fn: Callable[[int, int], None], n_rows: int, multiple: int = 1) -> None:
        """Call fn over [0, n_rows) split into one contiguous range per thread (see split_rows)."""
        ranges = split_rows(n_rows, self.n_threads, multiple)
        if len(ranges) == 1:
            fn(0, n_rows)
            return
        self.run_each([lambda a=a, b=b: fn(a, b) for a, b in ranges])

    def run_each(self, calls: Sequence[Callable[[], None]]) -> None:
        """Thread i runs calls[i] (the caller runs calls[0]); returns when all are done."""
        if len(calls) > self.n_threads:
            raise ValueError(f"{len(calls)} calls for {self.n_threads} threads")
        if len(calls) == 1:
            calls[0]()
            return
        with self._cv:
            self._job = list(calls)
            self._pending = len(self._workers)
            self._errors.clear()
            self._gen += 1
            self._cv.notify_all()
        calls[0]()
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
    """The pool matmuls use now (a 1-thread pool outside any `activate`)."""
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
    prev_cpus = os.sched_getaffinity(0) if pool.cpus is not None else None
    _local.pool = pool
    try:
        if pool.cpus is not None:
            os.sched_setaffinity(0, pool.cpus[0])        # the caller is thread 0 of the pool
        with threadpool_limits(limits=1):
            yield pool
    finally:
        _local.pool = prev
        if prev_cpus is not None:
            os.sched_setaffinity(0, prev_cpus)

