"""Kernel calls as data: a table of int64 task rows that Numba code executes without the GIL.

A decode step hands ~90 products per token to the thread pool. When a worker runs a Python
callable, every hand-over costs two thread wake-ups and a GIL hand-off (the worker needs the GIL
to start its share while the caller still holds it), tens of microseconds each on a VM. Here a
worker instead spins in `worker_loop` (nogil) on its slot of a control array; the caller writes
the tasks into the table, bumps the slot's generation, runs its own share through `run_tasks`
(nogil), and spins in `wait_done` (nogil) until the worker's done generation catches up. Neither
side needs the GIL in between, and an idle worker falls back to Python (the pool then parks it
on a lock) after `spin` polls.

Task row (TASK_FIELDS int64): kernel slot, then for each array its address and shape:
    q (G, rec bytes) uint8 | xq (T, K) int8 | dx (T, nb) float32 | xaux (T, m) int32 or int16 |
    out (T, N) float32 | r0, r1
Slots 0..31 take an int32 xaux (the 32-element block types' code sums), 32..63 an int16 one (the
K-quants' per-16 sums). Slots ATTN..ATTN + 8 are decode attention over the KV heads a task is
given, one slot per pair of KV cache types (_native_attention.py). The arrays must stay
alive until the call that ran them returns (the pool's caller holds them).

Control slot of thread i (CTL_STRIDE int64 at i * CTL_STRIDE, a cache line each):
    GO: generation of the latest command, KIND: RUN / PY / EXIT, LO, HI: its task rows,
    TABLE: the address of the task table they are in (C-contiguous int64 (rows, TASK_FIELDS)),
    DONE: generation the worker finished, SLEEP: 1 while the worker sleeps on GO,
    WSLEEP: 1 while the caller sleeps on DONE, BUSY: nanoseconds the last RUN took (so the
    caller can tell a join's waiting from its work).

Sleeping: a waiter spins a short while (`pause`), then sleeps in futex(2) on the 32 low bits of
the word it waits for, after announcing it in SLEEP/WSLEEP; the other side stores the word, fences
and wakes it only if announced (both sides fence between their store and their load, so a wake-up
is never lost). Spinning longer is not free: on this 2-vCPU machine a spinning thread slowed the
other CPU's Python by ~40% and its kernels by ~20% (the vCPUs share a physical core's resources),
and sched_yield in the loop was worse still.
"""
from __future__ import annotations

import functools
import sys

import numpy as np
from llvmlite import ir
from numba import carray, njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from . import _simd
from .base import specialize

TASK_FIELDS = 16
CTL_STRIDE = 16                 # int64 per thread slot: 128 bytes (two cache lines, as prefetched)
GO, KIND, LO, HI, DONE, SLEEP, WSLEEP, TABLE, BUSY = 0, 1, 2, 3, 4, 5, 6, 7, 8
RUN, PY, EXIT, CLAIM_RUN = 1, 2, 3, 4    # CLAIM_RUN: take rows of the pool's claimed dispatch
SLOTS_PER_GROUP = 32            # kernel slots per xaux dtype
ATTN = 2 * SLOTS_PER_GROUP      # the attention tasks' first slot (_native_attention)


# -- intrinsics ----------------------------------------------------------------------------------

_LINUX = sys.platform.startswith("linux")
SYS_FUTEX = 202                  # x86-64
FUTEX_WAIT_PRIVATE, FUTEX_WAKE_PRIVATE = 128, 129


@intrinsic
def futex(typingctx, arr, idx, op, val, timeout):
    """futex(2) on the low 32 bits of int64 arr[idx]: op FUTEX_WAIT_PRIVATE sleeps while they
    equal val (timeout: address of a timespec, or 0), FUTEX_WAKE_PRIVATE wakes val sleepers.
    Through libc's syscall() as an external symbol, so the compiled code can be cached. Not on
    Linux: a sched_yield (the waits then spin, the wakes do nothing)."""
    sig = types.int64(arr, idx, types.int64, types.int64, types.int64)

    def codegen(context, builder, sig, args):
        i64 = ir.IntType(64)
        if not _LINUX:
            fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.IntType(32), []),
                                                "sched_yield")
            builder.call(fn, [])
            return ir.Constant(i64, 0)
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(i64, [i64], var_arg=True),
                                            "syscall")
        addr = builder.ptrtoint(_elem_ptr(context, builder, sig.args[0], args[0], args[1]), i64)
        return builder.call(fn, [ir.Constant(i64, SYS_FUTEX), addr, args[2], args[3], args[4],
                                 ir.Constant(i64, 0), ir.Constant(i64, 0)])

    return sig, codegen


@intrinsic
def fence(typingctx):
    """A full memory fence (mfence): orders a store before a later load (x86 alone does not)."""
    sig = types.none()

    def codegen(context, builder, sig, args):
        builder.fence("seq_cst")
        return context.get_dummy_value()

    return sig, codegen


def _elem_ptr(context, builder, aryty, ary, idx):
    data = context.make_array(aryty)(context, builder, ary).data
    return builder.gep(data, [idx])


@intrinsic
def load_acquire(typingctx, arr, idx):
    """arr[idx] of an int64 array, read with acquire ordering (never hoisted out of a loop)."""
    sig = types.int64(arr, idx)

    def codegen(context, builder, sig, args):
        return builder.load_atomic(_elem_ptr(context, builder, sig.args[0], *args), "acquire", 8)

    return sig, codegen


@intrinsic
def store_release(typingctx, arr, idx, val):
    """arr[idx] = val on an int64 array with release ordering (earlier writes visible first)."""
    sig = types.none(arr, idx, types.int64)

    def codegen(context, builder, sig, args):
        builder.store_atomic(args[2], _elem_ptr(context, builder, sig.args[0], args[0], args[1]),
                             "release", 8)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def cpu_relax(typingctx):
    """x86 `pause`: tells the core this is a spin loop (saves power, yields to the sibling)."""
    sig = types.none()

    def codegen(context, builder, sig, args):
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), []),
                                            "llvm.x86.sse2.pause")
        builder.call(fn, [])
        return context.get_dummy_value()

    return sig, codegen


CLOCK_MONOTONIC = 1


@intrinsic
def now_ns(typingctx):
    """CLOCK_MONOTONIC in nanoseconds, through libc's clock_gettime (the vDSO: ~20 ns)."""
    sig = types.int64()

    def codegen(context, builder, sig, args):
        i64 = ir.IntType(64)
        ts = cgutils.alloca_once(builder, ir.ArrayType(i64, 2))
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.IntType(32), [ir.IntType(32), ts.type]), "clock_gettime")
        builder.call(fn, [ir.Constant(ir.IntType(32), CLOCK_MONOTONIC), ts])
        sec = builder.load(builder.gep(ts, [ir.Constant(ir.IntType(32), 0), ir.Constant(ir.IntType(32), 0)]))
        nsec = builder.load(builder.gep(ts, [ir.Constant(ir.IntType(32), 0), ir.Constant(ir.IntType(32), 1)]))
        return builder.add(builder.mul(sec, ir.Constant(i64, 1_000_000_000)), nsec)

    return sig, codegen


def _ptr_intrinsic(dtype):
    @intrinsic
    def as_ptr(typingctx, addr):
        sig = types.CPointer(dtype)(types.int64)

        def codegen(context, builder, sig, args):
            return builder.inttoptr(args[0], context.get_value_type(sig.return_type))

        return sig, codegen

    return as_ptr


ptr_u8 = _ptr_intrinsic(types.uint8)
ptr_i8 = _ptr_intrinsic(types.int8)
ptr_i16 = _ptr_intrinsic(types.int16)
ptr_u16 = _ptr_intrinsic(types.uint16)
ptr_i32 = _ptr_intrinsic(types.int32)
ptr_f32 = _ptr_intrinsic(types.float32)
ptr_i64 = _ptr_intrinsic(types.int64)


# -- the task table --------------------------------------------------------------------------------

def address(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]


def encode(row: np.ndarray, slot: int, *args) -> None:
    """Write one task (a `KernelUnit.native_task` or `attention_task` tuple) into `row` (int64
    (TASK_FIELDS,))."""
    if slot >= ATTN:
        _encode_attention(row, *args)
        return
    q, xq, dx, xaux, out, r0, r1, *pf = args     # every array 2-D and C-contiguous
    row[:] = (slot, address(q), q.shape[0], q.shape[1], address(xq), xq.shape[1],
              address(dx), dx.shape[1], address(xaux), xaux.shape[1],
              address(out), out.shape[0], out.shape[1], r0, r1, pf[0] if pf else 0)


@intrinsic
def f32_from_bits(typingctx, b):
    """The float32 whose bits are the low 32 bits of int64 b."""
    sig = types.float32(types.int64)

    def codegen(context, builder, sig, args):
        return builder.bitcast(builder.trunc(args[0], ir.IntType(32)), ir.FloatType())

    return sig, codegen


# the attention tasks (their own file; they use the pointer intrinsics above)
from ._native_attention import (ATTN_POS0, _encode_attention, _run_attention,  # noqa: E402,F401
                                attention_task)
from . import _native_claim  # noqa: E402
from ._native_claim import DESC_LEN  # noqa: E402,F401
from ._native_tasks import _no_kernel, _run_tasks_t  # noqa: E402


@njit(nogil=True, cache=True, inline="always")
def _publish(ctl, at, value, sleeper_at):
    # ctl[at] = value, then wake whoever announced at ctl[sleeper_at] that it sleeps on ctl[at]
    store_release(ctl, at, value)
    fence()
    if load_acquire(ctl, sleeper_at):
        futex(ctl, at, FUTEX_WAKE_PRIVATE, 1, 0)


@njit(nogil=True, cache=True, inline="always")
def _sleep_on(ctl, at, seen, sleeper_at, timespec_addr):
    # Sleep while ctl[at] is still `seen` (announced at ctl[sleeper_at]); returns on a change,
    # a wake-up or the timeout (timespec_addr 0: none)
    store_release(ctl, sleeper_at, 1)
    fence()
    if load_acquire(ctl, at) == seen:
        futex(ctl, at, FUTEX_WAIT_PRIVATE, seen & 0xFFFFFFFF, timespec_addr)
    store_release(ctl, sleeper_at, 0)


def _worker_loop_t(ctl, me, seen, spin):
    # Wait on this thread's control slot (spin, then sleep); run RUN commands here, hand any
    # other command back to Python as (kind, generation).
    base = me * CTL_STRIDE
    polls = 0
    while True:
        gen = load_acquire(ctl, base + GO)
        if gen == seen:
            polls += 1
            if polls < spin:
                cpu_relax()
                continue
            _sleep_on(ctl, base + GO, seen, base + SLEEP, 0)
            polls = 0
            continue
        polls = 0
        seen = gen
        kind = ctl[base + KIND]
        if kind == CLAIM_RUN:            # TABLE: the pool's claim descriptor (_native_claim)
            RUN_CLAIMED(carray(ptr_i64(ctl[base + TABLE]), (DESC_LEN,)))  # noqa: F821
            finish(ctl, me, gen)
            continue
        if kind != RUN:
            return kind, gen
        hi = ctl[base + HI]
        table = carray(ptr_i64(ctl[base + TABLE]), (hi, TASK_FIELDS))
        t0 = now_ns()
        RUN_TASKS(table, ctl[base + LO], hi)  # noqa: F821 (template constant)
        ctl[base + BUSY] = now_ns() - t0
        finish(ctl, me, gen)


@njit(nogil=True, cache=True)
def finish(ctl, me, gen):
    """Worker `me` is done with generation gen: publish it, wake the caller if it sleeps."""
    base = me * CTL_STRIDE
    _publish(ctl, base + DONE, gen, base + WSLEEP)


@njit(nogil=True, cache=True)
def post(ctl, who, kind, table, lo, hi, gen):
    """Give thread `who` command `kind` (rows lo..hi of table) as generation gen; wake it if it
    sleeps."""
    base = who * CTL_STRIDE
    ctl[base + KIND] = kind
    ctl[base + TABLE] = table.ctypes.data
    ctl[base + LO] = lo
    ctl[base + HI] = hi
    _publish(ctl, base + GO, gen, base + SLEEP)


@njit(nogil=True, cache=True)
def wait_done(ctl, who, gen, spin, timespec):
    """Wait until thread `who` has finished generation gen: spin `spin` polls, then sleep.
    Returns False if it was still not done after one sleep of timespec (int64 (2,): seconds,
    nanoseconds), so the caller can go back to Python (signals) and call again."""
    base = who * CTL_STRIDE
    for n in range(spin):
        if load_acquire(ctl, base + DONE) >= gen:
            return True
        cpu_relax()
    done = load_acquire(ctl, base + DONE)
    if done < gen:
        _sleep_on(ctl, base + DONE, done, base + WSLEEP, timespec.ctypes.data)
    return load_acquire(ctl, base + DONE) >= gen


@njit(nogil=True, cache=True)
def post_all(ctls, idx, table, spans, gens):
    """One RUN command to each thread t >= 1 that has rows (spans int64 (n, 2): its rows of
    table): thread t's control slot is slot idx[t] of the int64 control array at address
    ctls[t] (threads of several pools). Each gets generation GO + 1 (written to gens[t]; 0 for a
    thread without rows). One call for all threads: a Python call per thread costs ~1 us, which
    a dispatch to many threads per node would pay ~140 times a token."""
    for t in range(1, len(ctls)):
        gens[t] = 0
        if spans[t, 1] <= spans[t, 0]:
            continue
        base = idx[t] * CTL_STRIDE
        ctl = carray(ptr_i64(ctls[t]), (base + CTL_STRIDE,))
        gen = ctl[base + GO] + 1
        ctl[base + KIND] = RUN
        ctl[base + TABLE] = table.ctypes.data
        ctl[base + LO] = spans[t, 0]
        ctl[base + HI] = spans[t, 1]
        _publish(ctl, base + GO, gen, base + SLEEP)
        gens[t] = gen


@njit(nogil=True, cache=True)
def wait_all(ctls, idx, gens, spin, timespec):
    """Wait until every thread t with gens[t] > 0 has finished generation gens[t] (as
    wait_done: spin, then one sleep of at most timespec per call). Returns the longest BUSY of
    them in nanoseconds, or -1 if some thread was still not done (call again)."""
    slowest = 0
    for t in range(1, len(ctls)):
        if gens[t] == 0:
            continue
        base = idx[t] * CTL_STRIDE
        ctl = carray(ptr_i64(ctls[t]), (base + CTL_STRIDE,))
        if not wait_done(ctl, idx[t], gens[t], spin, timespec):
            return -1
        slowest = max(slowest, ctl[base + BUSY])
    return slowest


@njit(nogil=True, cache=True)
def post_claim(ctls, idx, desc, gens):
    """A CLAIM_RUN command (desc: _native_claim) to every thread t >= 1, as post_all's RUN."""
    for t in range(1, len(ctls)):
        base = idx[t] * CTL_STRIDE
        ctl = carray(ptr_i64(ctls[t]), (base + CTL_STRIDE,))
        gen = ctl[base + GO] + 1
        ctl[base + KIND] = CLAIM_RUN
        ctl[base + TABLE] = desc.ctypes.data
        _publish(ctl, base + GO, gen, base + SLEEP)
        gens[t] = gen


_SLOTS: list[list] = [[], []]      # kernels by xaux dtype: [int32 ones, int16 ones]
_BUILT: dict = {}


def register_kernel(kernel, int16_sums: bool) -> int:
    """A slot for a record unit's kernel (call before the first `executors()`)."""
    if _BUILT:
        raise RuntimeError("native kernel slots are fixed once the executors are built")
    group = _SLOTS[int16_sums]
    if len(group) == SLOTS_PER_GROUP:
        raise RuntimeError("no free native kernel slot")
    group.append(kernel)
    return SLOTS_PER_GROUP * int16_sums + len(group) - 1


@njit(nogil=True, cache=True)
def _no_tasks(table, lo, hi):  # no kernel can run natively on this CPU
    pass


@functools.lru_cache(maxsize=None)
def available() -> bool:
    """Whether tasks run natively on this CPU (else run_tasks does nothing: the pools then get
    Python callables, as `KernelUnit.native_task` returns None)."""
    return _simd.has_avx2()


def executors():
    """(run_tasks, worker_loop): the Numba executors over every registered kernel (none where
    the CPU lacks AVX2: the record kernels' intrinsics must never be compiled there)."""
    if not _BUILT:
        n = SLOTS_PER_GROUP
        consts = {f"K{n * g + i}": (_SLOTS[g][i] if i < len(_SLOTS[g]) else _no_kernel)
                  for g in (0, 1) for i in range(n)}
        run_tasks = (specialize(_run_tasks_t, "native_run_tasks", **consts) if available()
                     else _no_tasks)
        _BUILT["run_tasks"] = run_tasks
        atomics = dict(load_acquire=load_acquire, store_release=store_release, cpu_relax=cpu_relax,
                       futex=futex, fence=fence, ptr_i64=ptr_i64, TASK_FIELDS=TASK_FIELDS,
                       FUTEX_WAIT_PRIVATE=FUTEX_WAIT_PRIVATE)
        claimed = specialize(_native_claim._run_claimed_t, "native_run_claimed",
                             RUN_TASKS=run_tasks, **atomics)
        _BUILT["claimed_dispatch"] = specialize(_native_claim._claimed_dispatch_t,
                                                "native_claimed_dispatch", RUN_CLAIMED=claimed,
                                                POST_CLAIM=post_claim, **atomics)
        _BUILT["worker_loop"] = specialize(_worker_loop_t, "native_worker_loop",
                                           RUN_TASKS=run_tasks, RUN_CLAIMED=claimed)
    return _BUILT["run_tasks"], _BUILT["worker_loop"]


def claimed_dispatch():
    """(desc, table, n, ctls, idx, gens, spin, timespec) -> None: _native_claim's dispatch."""
    executors()
    return _BUILT["claimed_dispatch"]
