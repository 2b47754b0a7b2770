"""The one place numallm owns threads.

Matmuls split their output rows over a pool of worker threads; each worker calls a `nogil` Numba
kernel on its own rows, so the GIL is not a bottleneck. The pool in use is a thread-local set by
`activate(pool)` (the engine owns one pool; NUMA placement builds it with workers pinned per node);
model code never sees it. BLAS threads are capped inside the same context manager so nothing
oversubscribes the cores, and everything is restored on exit (threadpoolctl style).
"""
from __future__ import annotations

import contextlib
import functools
import numbers
import os
import threading
from typing import Callable, Sequence

import numpy as np
import psutil

from .errors import OptionError

# A split finer than this many rows costs more in dispatch than it saves.
MIN_ROWS_PER_THREAD = 64
# Spin budgets in polls (x86 `pause`, ~20-40 ns each on the AMD development VM, slower on Intel
# since Skylake) before a waiting thread sleeps in futex(2) (numallm_kernels._native): an idle
# worker after IDLE_POLLS, a caller waiting for a worker after WAIT_POLLS. A decode step leaves
# the workers idle while the caller runs its Python between products (norms, RoPE, the partial
# sums of a sharded layer), and a wake-up from futex costs ~20 us, so the workers spin through
# those gaps: 2-thread TinyLlama Q4_0 decode on the AMD VM, 3 rounds: 1000 polls 27.5-35.3
# ms/token, 5000 25.2-27.5, 20000 26.0-26.3; on the Intel Xeon VM, `numallm bench -n 64 -r 7
# --numa off,shard --virtual-nodes 2`: 10000 polls off 27.65 +- 1.56 t/s, shard 28.54 +- 1.21
# (sync 2.35 ms/token), 100000 off 28.80 +- 0.40, shard 29.56 +- 0.28 (sync 1.66). A spinning
# vCPU slows its sibling on some hosts (see _native), so this is not unbounded: an idle pool
# sleeps within a few ms. The caller, whose wait is the end of a share that started at the
# same time, spins WAIT_POLLS. WAIT_SLICE_S: the longest sleep before a waiting caller looks at
# Python signals again (Ctrl-C during a long prefill).
IDLE_POLLS = 100_000
WAIT_POLLS = 20_000
WAIT_SLICE_S = 0.05
# A replayed decode dispatch on a RowPool of several threads is claimed (bind_claimed): its
# rows cut into CLAIM_CHUNKS tasks per thread, each taken by whichever thread is free, so a late
# or descheduled thread costs at most the task it holds. CLAIM_SLEEP_S: the caller's sleep
# between looks once a claimed task's thread has kept it past WAIT_POLLS polls.
CLAIM_CHUNKS = 4
CLAIM_SLEEP_S = 20e-6


@functools.lru_cache(maxsize=4096)
def split_rows(n_rows: int, n_threads: int, multiple: int = 1) -> tuple[tuple[int, int], ...]:
    """Contiguous [a, b) ranges covering n_rows, one per thread that gets work: at least
    MIN_ROWS_PER_THREAD rows each, and cut at multiples of `multiple` (a kernel's row group), so
    no group is computed twice."""
    k = min(n_threads, max(1, n_rows // MIN_ROWS_PER_THREAD))
    step = -(-n_rows // k)
    step = -(-step // multiple) * multiple
    return tuple((a, min(a + step, n_rows)) for a in range(0, n_rows, step))


def usable_cpus() -> int:
    """Logical CPUs this process may run on (its affinity mask)."""
    return max(1, len(os.sched_getaffinity(0)))


def check_threads(n: int | None, label: str = "n_threads") -> tuple[int | None, str | None]:
    """A thread count option, checked: (count, note). None stays None (the default); zero,
    negative or non-integer counts raise OptionError; more than the usable CPUs is capped to
    them (more threads than CPUs only adds waiting), and `note` then says so for the caller to
    show. `label` names the option in messages ("-t" on the command line)."""
    if n is None:
        return None, None
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise OptionError(f"{label} {n!r} is not allowed: give a number of threads of at least 1")
    cpus = usable_cpus()
    if n > cpus:
        return cpus, f"{label} {n}: this process may use {cpus} CPUs; using {cpus} threads"
    return int(n), None


def physical_cores() -> int:
    """Physical cores this process may run on (hyperthreads do not add decode bandwidth)."""
    allowed = len(os.sched_getaffinity(0))
    phys = psutil.cpu_count(logical=False) or allowed
    return max(1, min(allowed, phys))


class RowPool:
    """Persistent workers that run their share of one operation: Python callables (`run_each`,
    `run`) or kernel tasks (`run_tasks`, the engine's products).

    The caller thread takes the first share itself, so a 1-thread pool has no overhead at all.
    A decode step hands work over ~90 times per token, so the hand-over avoids the GIL and
    thread wake-ups: each worker spins in a Numba loop (numallm_kernels._native) on its slot of a
    control array and runs kernel tasks there, without the GIL; the caller runs its own tasks and
    then spins (also without the GIL) until the workers' done generations catch up. A Python
    callable is handed to the worker as a PY command (the worker then takes the GIL to run it).
    A worker that saw no command for IDLE_POLLS polls sleeps in futex(2) until the next command
    (no GIL either way). `cpus[i]`, when given, is the CPU set thread i runs on: workers pin
    themselves at start, and `activate` pins the caller (thread 0) for the duration.
    """

    def __init__(self, n_threads: int, cpus: Sequence[Sequence[int]] | None = None):
        from numallm_kernels import _native

        self.n_threads = max(1, int(n_threads))
        if cpus is not None and len(cpus) != self.n_threads:
            raise ValueError(f"{len(cpus)} CPU sets for {self.n_threads} threads")
        self.cpus = None if cpus is None else tuple(tuple(c) for c in cpus)
        self._nat = _native
        self._run_tasks, self._worker_loop = _native.executors()
        self._ctl = np.zeros(self.n_threads * _native.CTL_STRIDE, np.int64)   # control slots
        # for post_all / wait_all: every thread's control array (this one) and slot, generations
        self._ctls = np.full(self.n_threads, self._ctl.ctypes.data, np.int64)
        self._idx = np.arange(self.n_threads, dtype=np.int64)
        self._gens = np.zeros(self.n_threads, np.int64)
        self._table = np.zeros((64, _native.TASK_FIELDS), np.int64)           # task rows
        self._sent: list = [None] * self.n_threads   # the table each worker's command reads
        self._gen = [0] * self.n_threads          # generation of the last command sent by `_send`
        self._py: list[Callable[[], None] | None] = [None] * self.n_threads
        self._errors: list[BaseException] = []
        self._closed = False
        self._timespec = np.array([0, int(WAIT_SLICE_S * 1e9)], np.int64)     # (s, ns)
        # claimed dispatches (bind_claimed): the pool's one descriptor, the caller's short
        # sleep, and whether workers may still be in a claimed dispatch (see _quiesce).
        # NodePools turn `claimable` off for their pools (they post to these threads natively)
        self.claimable = True
        self._desc = np.zeros(_native.DESC_LEN, np.int64)
        self._claim_sleep = np.array([0, int(CLAIM_SLEEP_S * 1e9)], np.int64)  # (s, ns)
        self._claimed = False
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
        nat = self._nat
        if self.cpus is not None:
            os.sched_setaffinity(0, self.cpus[index])   # 0: this thread only
        seen = 0
        while True:
            kind, seen = self._worker_loop(self._ctl, index, seen, IDLE_POLLS)
            if kind == nat.PY:
                try:
                    self._py[index]()
                except BaseException as e:  # noqa: BLE001 - handed to the caller
                    self._errors.append(e)
                nat.finish(self._ctl, index, seen)
            else:                                            # EXIT
                return

    def _quiesce(self) -> None:
        """Wait until no worker is still in a claimed dispatch (one that arrived late may be):
        every other command's fields must not change under a worker still reading them."""
        if self._claimed:
            n = self.n_threads
            while self._nat.wait_all(self._ctls[:n], self._idx[:n], self._gens[:n], WAIT_POLLS,
                                     self._timespec) < 0:
                pass
            self._claimed = False

    def claim_shares(self) -> int:
        """How many job lists a replayed dispatch cuts its rows into for `bind_claimed`: 0 when
        this pool does not claim (one thread, no native tasks, or part of NodePools)."""
        if self.n_threads == 1 or not self.claimable or not self._nat.available():
            return 0
        return self.n_threads * CLAIM_CHUNKS

    def bind_claimed(self, jobs: Sequence[Sequence]) -> Callable[[], None] | None:
        """Every task of `jobs` (kernel task tuples, from claim_shares() lists) in one table that
        all threads take rows of, one at a time (numallm_kernels._native_claim), as a call run
        again and again (the tasks' arrays must stay alive and in place); None if some job is
        not a kernel task."""
        tasks = [t for share in jobs for t in share]
        if not tasks or not all(type(t) is tuple for t in tasks):
            return None
        table = np.zeros((len(tasks), self._nat.TASK_FIELDS), np.int64)       # (tasks, fields)
        _encode(self._nat, table, [tasks])
        dispatch = self._nat.claimed_dispatch()
        n, desc, sleep = len(tasks), self._desc, self._claim_sleep
        ctls, idx, gens = self._ctls, self._idx, self._gens

        def run() -> None:
            if self._closed:
                raise RuntimeError("this RowPool is closed")
            self._claimed = True
            dispatch(desc, table, n, ctls, idx, gens, WAIT_POLLS, sleep)
        return run

    def _send(self, i: int, kind: int, table: np.ndarray | None = None, lo: int = 0, hi: int = 0) -> None:
        self._quiesce()
        # the next generation after the slot's last (NodePools may have posted to it natively)
        self._gen[i] = int(self._ctl[i * self._nat.CTL_STRIDE + self._nat.GO]) + 1
        table = self._table if table is None else table
        self._sent[i] = table                            # alive until the worker is done
        self._nat.post(self._ctl, i, kind, table, lo, hi, self._gen[i])

    def _wait(self, i: int) -> None:
        nat, spin = self._nat, WAIT_POLLS
        while not nat.wait_done(self._ctl, i, self._gen[i], spin, self._timespec):
            spin = 0                                     # a long share (prefill): sleep

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
        if self._closed:
            raise RuntimeError("this RowPool is closed")
        self._errors.clear()
        for i in range(1, len(calls)):
            self._py[i] = calls[i]
            self._send(i, self._nat.PY)
        try:
            calls[0]()
        finally:   # even if the caller's share failed: the workers still use their calls
            for i in range(1, len(calls)):
                self._wait(i)
                self._py[i] = None
        if self._errors:
            raise self._errors[0]

    def run_tasks(self, shares: Sequence[Sequence]) -> None:
        """Thread i runs shares[i] in order: kernel tasks (`KernelUnit.native_task` tuples) and
        Python callables. A worker whose share is all tasks runs it without the GIL; one with a
        callable gets the whole share as a Python call."""
        while len(shares) > 1 and not shares[-1]:
            shares = shares[:-1]
        if len(shares) > self.n_threads:
            raise ValueError(f"{len(shares)} shares for {self.n_threads} threads")
        native = [all(type(t) is tuple for t in share) for share in shares]
        need = sum(len(s) for s, n in zip(shares, native) if n)
        if need > len(self._table):    # each command carries its table's address: safe to grow
            self._table = np.zeros((2 * need, self._nat.TASK_FIELDS), np.int64)
        spans = _encode(self._nat, self._table, shares, native)
        self._run(self._table, shares, native, spans)

    def encode(self, shares: Sequence[Sequence]) -> tuple[np.ndarray, np.ndarray] | None:
        """The task table and per-thread row spans (int64 (threads, 2)) of shares made only of
        kernel tasks, for
        `run_encoded` (again and again: the tasks' arrays must then stay alive and in place);
        None if some share holds a Python callable."""
        if len(shares) > self.n_threads or not all(type(t) is tuple for s in shares for t in s):
            return None
        table = np.zeros((max(1, sum(len(s) for s in shares)), self._nat.TASK_FIELDS), np.int64)
        return table, np.array(_encode(self._nat, table, shares),
                               np.int64).reshape(-1, 2)

    def run_encoded(self, table: np.ndarray, spans) -> None:
        """Run what `encode` made: thread i the rows spans[i] of table."""
        self._run(table, [()] * len(spans), [True] * len(spans), spans)

    def bind_encoded(self, table: np.ndarray, spans) -> Callable[[], None]:
        """run_encoded(table, spans) as a call with everything but the run done now (a decode
        replay makes ~90 such runs per token: their Python is time outside the kernels)."""
        sp = np.ascontiguousarray(spans, dtype=np.int64).reshape(-1, 2)      # (threads, 2)
        run_tasks, n = self._run_tasks, len(sp)
        lo, hi = int(sp[0, 0]), int(sp[0, 1])
        if n == 1:
            return functools.partial(run_tasks, table, lo, hi)
        nat, ctls, idx, gens = self._nat, self._ctls[:n], self._idx[:n], self._gens[:n]
        post_all, wait_all, timespec = nat.post_all, nat.wait_all, self._timespec

        def run() -> None:
            if self._closed:
                raise RuntimeError("this RowPool is closed")
            self._quiesce()
            post_all(ctls, idx, table, sp, gens)
            run_tasks(table, lo, hi)
            spin = WAIT_POLLS
            while wait_all(ctls, idx, gens, spin, timespec) < 0:
                spin = 0                                 # a long share (prefill): sleep
        return run

    def _run(self, table, shares, native, spans) -> None:
        if len(spans) == 1:
            self._run_share(table, shares[0], native[0], spans[0])
            return
        if self._closed:
            raise RuntimeError("this RowPool is closed")
        if all(native):                  # one native call posts to all, one waits for all
            self._quiesce()
            sp = np.asarray(spans, dtype=np.int64).reshape(-1, 2)      # (threads, 2)
            n = len(sp)
            ctls, idx, gens = self._ctls[:n], self._idx[:n], self._gens[:n]
            self._nat.post_all(ctls, idx, table, sp, gens)
            self._run_tasks(table, sp[0, 0], sp[0, 1])
            spin = WAIT_POLLS
            while self._nat.wait_all(ctls, idx, gens, spin, self._timespec) < 0:
                spin = 0                                 # a long share (prefill): sleep
            return
        self._errors.clear()
        for i in range(1, len(spans)):
            if native[i]:
                self._send(i, self._nat.RUN, table, *spans[i])
            else:
                self._py[i] = lambda s=shares[i]: self._run_share(table, s, False, (0, 0))
                self._send(i, self._nat.PY)
        try:
            self._run_share(table, shares[0], native[0], spans[0])
        finally:
            for i in range(1, len(spans)):
                self._wait(i)
                self._py[i] = None
                self._sent[i] = None
        if self._errors:
            raise self._errors[0]

    def _run_share(self, table, share, native: bool, span: tuple[int, int]) -> None:
        if native:
            self._run_tasks(table, *span)
            return
        for t in share:
            if type(t) is tuple:                     # a task in a share that has callables too
                row = np.zeros((1, self._nat.TASK_FIELDS), np.int64)
                self._nat.encode(row[0], *t)
                self._run_tasks(row, 0, 1)
            else:
                t()

    def close(self) -> None:
        """Stop the workers (a parked one is woken to exit). Idempotent."""
        if self._closed:
            return
        self._closed = True
        for i in range(1, self.n_threads):
            self._send(i, self._nat.EXIT)


def _encode(nat, table: np.ndarray, shares: Sequence[Sequence],
            native: Sequence[bool] | None = None) -> list[tuple[int, int]]:
    """Write the tasks of every native share (all of them when `native` is None) into table,
    share after share: thread i's rows are spans[i] ((0, 0) for a share run as Python)."""
    spans, row = [], 0
    for i, share in enumerate(shares):
        if native is not None and not native[i]:
            spans.append((0, 0))
            continue
        for t in share:
            nat.encode(table[row], *t)
            row += 1
        spans.append((row - len(share), row))
    return spans


_local = threading.local()
_blas = None      # threadpoolctl.ThreadpoolController, made on first use (it scans loaded libraries)


def current() -> RowPool:
    """The pool matmuls use now (a 1-thread pool outside any `activate`)."""
    pool = getattr(_local, "pool", None)
    if pool is None:
        pool = _local.pool = RowPool(1)
    return pool


@contextlib.contextmanager
def activate(pool: RowPool):
    """Make `pool` the one matmuls use, with BLAS capped to one thread per worker (our workers
    already fill the cores). Restores the previous pool and BLAS limits on exit. Sessions enter
    it once per forward step, so the BLAS libraries are looked up once per process."""
    global _blas
    if _blas is None:
        from threadpoolctl import ThreadpoolController

        _blas = ThreadpoolController()
    prev = getattr(_local, "pool", None)
    prev_cpus = os.sched_getaffinity(0) if pool.cpus is not None else None
    _local.pool = pool
    try:
        if pool.cpus is not None:
            os.sched_setaffinity(0, pool.cpus[0])        # the caller is thread 0 of the pool
        with _blas.limit(limits=1):
            yield pool
    finally:
        _local.pool = prev
        if prev_cpus is not None:
            os.sched_setaffinity(0, prev_cpus)


# NodePools (a RowPool per NUMA node) lives in its own file; reach it here
from ._node_pools import NodePools  # noqa: E402,F401
