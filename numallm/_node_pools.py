"""NodePools: a RowPool per NUMA node and one leader per node (numallm.threads re-exports it;
import it from there)."""
from __future__ import annotations

import functools
import time
from typing import Callable, Sequence

import numpy as np

from . import threads
from .threads import RowPool, _encode, _local


class NodePools:
    """A pool per NUMA node (its threads pinned to the node's CPUs) and one leader per node.

    Two ways to run work over the nodes, each one cross-node synchronisation:
    - `run_tasks(shares)` with kernel tasks only (no Python callable) is *flat*: the caller
      hands every thread of every node its share at once as native tasks and waits for all, so
      no other thread runs Python and the GIL is never handed over (a decode step's products
      and attention go this way, `Placement`'s sharded decode);
    - `run_nodes(fns)` runs Python fns[i] on node i's leader with node i's pool current, so
      every op inside splits its rows over that node's threads only (a prefill's half-layers).
    Leader 0 is the caller (pinned by `activate`), leader i > 0 is a worker of `leaders` and
    thread 0 of `pools[i]`, so the pools add no threads: n_threads counts them all. To
    `activate` and to ops this is a pool like RowPool: `cpus[i]` is thread i's CPU set (node by
    node), `run_each` gives each thread its call, `encode` / `run_encoded` replay a flat
    dispatch.

    Every join adds to `joins`, `wall_s` (the caller's time from handing out to the last done)
    and `slowest_s` (the slowest thread's or node's own working time), so the cost of
    synchronising is wall - slowest (see placement.SyncStats).
    """

    def __init__(self, node_cpus: Sequence[Sequence[int]], n_threads: Sequence[int]):
        from numallm_kernels import _native

        self.pools = [RowPool(n, [tuple(c)] * n) for c, n in zip(node_cpus, n_threads)]
        self.leaders = RowPool(len(self.pools), [tuple(c) for c in node_cpus])
        for p in [self.leaders, *self.pools]:   # flat dispatches post to their threads natively
            p.claimable = False
        self.n_threads = sum(p.n_threads for p in self.pools)
        self.cpus = tuple(c for p in self.pools for c in p.cpus)
        # thread t (node by node) as (the RowPool that commands it, its index there); (., 0) of
        # node 0 is the caller, node i's thread 0 its leader
        self._threads = [(self.leaders if j == 0 else p, i if j == 0 else j)
                         for i, p in enumerate(self.pools) for j in range(p.n_threads)]
        self._nat = _native
        # the same per thread, for the native post/wait of a flat dispatch: each thread's
        # control array address and its slot there; gens: the generations just posted
        self._ctls = np.array([p._ctl.ctypes.data for p, _ in self._threads], np.int64)
        self._idx = np.array([i for _, i in self._threads], np.int64)
        self._gens = np.zeros(len(self._threads), np.int64)
        self._table = np.zeros((64, _native.TASK_FIELDS), np.int64)
        self._closed = False
        self.joins = 0
        self.wall_s = 0.0      # caller: dispatch to join, summed over joins
        self.slowest_s = 0.0   # the slowest node's (thread's) own time per join, summed
        self._busy = [0.0] * len(self.pools)   # (nodes,) seconds of the current join

    def native_ids(self, node: int) -> list[int]:
        """Kernel thread ids of node `node`'s threads other than the caller (for /proc checks)."""
        lead = [self.leaders._workers[node - 1].native_id] if node else []
        return lead + self.pools[node].native_ids

    def run_nodes(self, fns: Sequence[Callable[[], None] | None]) -> None:
        """Node i runs fns[i] (None: nothing to do) on its own threads; returns when all are done."""
        pools, busy = self.pools, self._busy

        def lead(i: int) -> None:
            fn = fns[i]
            if fn is None:
                busy[i] = 0.0
                return
            t0 = time.perf_counter()
            prev = getattr(_local, "pool", None)
            _local.pool = pools[i]        # ops inside split over this node's threads
            try:
                fn()
            finally:
                _local.pool = prev
                busy[i] = time.perf_counter() - t0

        t0 = time.perf_counter()
        self.leaders.run_each([lambda i=i: lead(i) for i in range(len(pools))])
        self.wall_s += time.perf_counter() - t0
        self.slowest_s += max(busy)
        self.joins += 1

    def tids(self, node: int) -> range:
        """The thread indices of node `node` (as `run_each` numbers them: node by node)."""
        first = sum(p.n_threads for p in self.pools[:node])
        return range(first, first + self.pools[node].n_threads)

    def run_each(self, calls: Sequence[Callable[[], None]]) -> None:
        """Thread i runs calls[i] (missing ones: nothing), each node on its own pool; returns when
        all are done (one cross-node join)."""
        per = [[calls[t] for t in self.tids(i) if t < len(calls)] for i in range(len(self.pools))]
        self.run_nodes([(lambda p=p, c=c: p.run_each(c)) if c else None
                        for p, c in zip(self.pools, per)])

    def run_tasks(self, shares: Sequence[Sequence]) -> None:
        """As RowPool.run_tasks: thread i (node by node) runs shares[i]. Kernel tasks only: one
        flat dispatch; with Python callables, each node's shares on its pool (run_nodes)."""
        if len(shares) > self.n_threads:
            raise ValueError(f"{len(shares)} shares for {self.n_threads} threads")
        if all(type(t) is tuple for s in shares for t in s):
            need = sum(len(s) for s in shares)
            if need > len(self._table):   # each command carries its table's address: safe to grow
                self._table = np.zeros((2 * need, self._nat.TASK_FIELDS), np.int64)
            self.run_encoded(self._table, _encode(self._nat, self._table, shares))
            return
        per = [[shares[t] for t in self.tids(i) if t < len(shares)] for i in range(len(self.pools))]
        self.run_nodes([(lambda p=p, c=c: p.run_tasks(c)) if any(c) else None
                        for p, c in zip(self.pools, per)])

    def encode(self, shares: Sequence[Sequence]) -> tuple[np.ndarray, np.ndarray] | None:
        """As RowPool.encode, for a flat dispatch over every node's threads."""
        if len(shares) > self.n_threads or not all(type(t) is tuple for s in shares for t in s):
            return None
        table = np.zeros((max(1, sum(len(s) for s in shares)), self._nat.TASK_FIELDS), np.int64)
        return table, np.array(_encode(self._nat, table, shares), np.int64).reshape(-1, 2)

    def bind_encoded(self, table: np.ndarray, spans) -> Callable[[], None]:
        """As RowPool.bind_encoded (here each run also adds to the join statistics)."""
        sp = np.ascontiguousarray(spans, dtype=np.int64).reshape(-1, 2)      # (threads, 2)
        return functools.partial(self.run_encoded, table, sp)

    def run_encoded(self, table: np.ndarray, spans) -> None:
        """Thread t runs rows spans[t] of the task table (the caller its own), all at once: one
        native call posts every thread's command, one waits for them all."""
        nat = self._nat
        spans = np.asarray(spans, dtype=np.int64).reshape(-1, 2)        # (threads, 2)
        if self._closed:
            raise RuntimeError("these NodePools are closed")
        t0 = time.perf_counter()
        n = len(spans)
        ctls, idx, gens = self._ctls[:n], self._idx[:n], self._gens[:n]
        nat.post_all(ctls, idx, table, spans, gens)
        c0 = time.perf_counter()
        self.leaders._run_tasks(table, spans[0, 0], spans[0, 1])
        caller = time.perf_counter() - c0
        spin = threads.WAIT_POLLS
        while (slowest_ns := nat.wait_all(ctls, idx, gens, spin, self.leaders._timespec)) < 0:
            spin = 0                                     # a long share (prefill): sleep
        self.wall_s += time.perf_counter() - t0
        self.slowest_s += max(caller, slowest_ns * 1e-9)
        self.joins += 1

    def close(self) -> None:
        self._closed = True
        for p in [self.leaders, *self.pools]:
            p.close()
