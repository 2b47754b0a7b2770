"""Claimed dispatch: the rows of a task table taken one at a time by whichever thread is free.

A static split (each thread its own rows, `_native.post_all`) makes the caller wait for the
slowest share: on a VM whose host takes a vCPU away for a time slice, or when one core reads
its rows slower, the whole product waits, ~90 times a token. Here every thread of the pool
(the caller included) claims the next unclaimed row of one shared table with an atomic
compare-and-swap, so a thread that is late or descheduled takes fewer rows, and a thread that
never arrives takes none: the caller waits only for rows already claimed (at most one task per
other thread), never for a thread to start.

A pool owns one descriptor (int64 (DESC_LEN,)), so a worker that arrives late never reads
freed memory: CLAIM (dispatch sequence << 32 | next row), DONE (rows finished, on its own cache
line), TABLE and N (the table's address and row count). The caller publishes a dispatch like a
seqlock: CLAIM gets an odd sequence (being written), TABLE, N and DONE are written, then CLAIM
gets the next even sequence with row 0. A worker reads CLAIM, TABLE, N and CLAIM again and
retries until both reads show the same even sequence, so it never runs rows of one table
against another's counter; its claims are compare-and-swaps on the whole word, which fail once
the sequence has moved on. Results do not depend on which thread runs a row (each row of an
output is computed by one task, the same arithmetic whatever thread runs it).
"""
from __future__ import annotations

from numba import carray, types
from numba.extending import intrinsic

DESC_LEN = 24
CLAIM, DONE, TABLE, N = 0, 8, 16, 17      # DONE on the second cache line of the descriptor


def _ptr(context, builder, aryty, ary, idx):
    data = context.make_array(aryty)(context, builder, ary).data
    return builder.gep(data, [idx])


@intrinsic
def fetch_add(typingctx, arr, idx, val):
    """Atomically arr[idx] += val on an int64 array; returns the old value."""
    sig = types.int64(arr, idx, types.int64)

    def codegen(context, builder, sig, args):
        return builder.atomic_rmw("add", _ptr(context, builder, sig.args[0], args[0], args[1]),
                                  args[2], "seq_cst")

    return sig, codegen


@intrinsic
def compare_swap(typingctx, arr, idx, old, new):
    """Atomically: if arr[idx] == old, arr[idx] = new. Returns whether it did (int64 array)."""
    sig = types.boolean(arr, idx, types.int64, types.int64)

    def codegen(context, builder, sig, args):
        res = builder.cmpxchg(_ptr(context, builder, sig.args[0], args[0], args[1]), args[2],
                              args[3], "seq_cst", "seq_cst")
        return builder.extract_value(res, 1)

    return sig, codegen


def _run_claimed_t(desc):
    # take rows of the descriptor's current dispatch until none is left (or a newer dispatch
    # was published); RUN_TASKS, TASK_FIELDS, ptr_i64, load_acquire: template constants
    while True:
        w = load_acquire(desc, CLAIM)  # noqa: F821
        seq = w >> 32
        if seq & 1:                    # being published
            cpu_relax()  # noqa: F821
            continue
        addr = load_acquire(desc, TABLE)  # noqa: F821
        n = load_acquire(desc, N)  # noqa: F821
        if load_acquire(desc, CLAIM) >> 32 != seq:  # noqa: F821
            continue
        break
    table = carray(ptr_i64(addr), (max(n, 1), TASK_FIELDS))  # noqa: F821
    while True:
        w = load_acquire(desc, CLAIM)  # noqa: F821
        i = w & 0xFFFFFFFF
        if w >> 32 != seq or i >= n:
            return
        if compare_swap(desc, CLAIM, w, w + 1):
            RUN_TASKS(table, i, i + 1)  # noqa: F821
            fetch_add(desc, DONE, 1)


def _claimed_dispatch_t(desc, table, n, ctls, idx, gens, spin, timespec):
    # the caller's side: publish (seqlock), wake the workers with a CLAIM command, take rows
    # itself, then wait until every claimed row is done; RUN_CLAIMED, POST_CLAIM, fence,
    # cpu_relax, futex, store_release, load_acquire: template constants
    seq = (load_acquire(desc, CLAIM) >> 32) + 1  # noqa: F821
    seq += seq & 1                                # next even sequence
    store_release(desc, CLAIM, (seq - 1) << 32)  # noqa: F821
    fence()                                       # noqa: F821 (the odd sequence first)
    desc[TABLE] = table.ctypes.data
    desc[N] = n
    desc[DONE] = 0
    store_release(desc, CLAIM, seq << 32)  # noqa: F821
    POST_CLAIM(ctls, idx, desc, gens)  # noqa: F821
    RUN_CLAIMED(desc)  # noqa: F821
    polls = 0
    while load_acquire(desc, DONE) < n:  # noqa: F821
        polls += 1
        if polls < spin:
            cpu_relax()  # noqa: F821
        else:                            # a claimed row's thread was descheduled: sleep a bit
            futex(desc, DONE, FUTEX_WAIT_PRIVATE, load_acquire(desc, DONE) & 0xFFFFFFFF,  # noqa: F821
                  timespec.ctypes.data)
