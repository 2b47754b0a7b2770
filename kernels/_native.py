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
Slots 0..7 take an int32 xaux (the 32-element block types' code sums), 8..15 an int16 one (the
K-quants' per-16 sums). The arrays must stay alive until the call that ran them returns (the
pool's caller holds them).

Control slot of thread i (CTL_STRIDE int64 at i * CTL_STRIDE, a cache line each):
    GO: generation of the latest command, KIND: RUN / PY / EXIT, LO, HI: its task rows,
    DONE: generation the worker finished.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import carray, njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from . import _simd
from .base import specialize

TASK_FIELDS = 16
CTL_STRIDE = 8                  # int64 per thread slot: 64 bytes
GO, KIND, LO, HI, DONE = 0, 1, 2, 3, 4
RUN, PY, EXIT = 1, 2, 3
IDLE = 0                         # worker_loop's answer when it stopped spinning
N_SLOTS = 16


# -- intrinsics ----------------------------------------------------------------------------------

@intrinsic
def sched_yield(typingctx):
    """sched_yield(2): a spinning thread gives its CPU to any other runnable thread there, e.g.
    the one it waits for when the OS put both on one CPU (a busy machine); spinning alone burnt
    whole timeslices, ~8 ms per hand-over measured with the other CPU taken by other work. An
    external symbol (not a ctypes pointer), so the compiled code can be cached."""
    sig = types.int32()

    def codegen(context, builder, sig, args):
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.IntType(32), []),
                                            "sched_yield")
        return builder.call(fn, [])

    return sig, codegen


# polls between two sched_yield calls while spinning
YIELD_EVERY = 16

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
ptr_i32 = _ptr_intrinsic(types.int32)
ptr_f32 = _ptr_intrinsic(types.float32)


# -- the task table --------------------------------------------------------------------------------

def address(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]


def encode(row: np.ndarray, slot: int, q, xq, dx, xaux, out, r0: int, r1: int) -> None:
    """Write one task into `row` (int64 (TASK_FIELDS,)); every array 2-D and C-contiguous."""
    row[:] = (slot, address(q), q.shape[0], q.shape[1], address(xq), xq.shape[1],
              address(dx), dx.shape[1], address(xaux), xaux.shape[1],
              address(out), out.shape[0], out.shape[1], r0, r1, 0)


@njit(nogil=True, cache=True)
def _no_kernel(q, xq, dx, xaux, out, r0, r1):  # an unused slot
    pass


def _run_tasks_t(table, lo, hi):
    for t in range(lo, hi):
        f = table[t]
        slot = f[0]
        n_t = f[11]
        q = carray(ptr_u8(f[1]), (f[2], f[3]))
        xq = carray(ptr_i8(f[4]), (n_t, f[5]))
        dx = carray(ptr_f32(f[6]), (n_t, f[7]))
        out = carray(ptr_f32(f[10]), (n_t, f[12]))
        if slot < 8:
            xa = carray(ptr_i32(f[8]), (n_t, f[9]))
            if slot == 0:
                K0(q, xq, dx, xa, out, f[13], f[14])  # noqa: F821 (template constants K0..K15)
            elif slot == 1:
                K1(q, xq, dx, xa, out, f[13], f[14])  # noqa: F821
            elif slot == 2:
                K2(q, xq, dx, xa, out, f[13], f[14])  # noqa: F821
            elif slot == 3:
                K3(q, xq, dx, xa, out, f[13], f[14])  # noqa: F821
            elif slot == 4:
                K4(q, xq, dx, xa, out, f[13], f[14])  # noqa: F821
            elif slot == 5:
                K5(q, xq, dx, xa, out, f[13], f[14])  # noqa: F821
            elif slot == 6:
                K6(q, xq, dx, xa, out, f[13], f[14])  # noqa: F821
            else:
                K7(q, xq, dx, xa, out, f[13], f[14])  # noqa: F821
        else:
            xb = carray(ptr_i16(f[8]), (n_t, f[9]))
            if slot == 8:
                K8(q, xq, dx, xb, out, f[13], f[14])  # noqa: F821
            elif slot == 9:
                K9(q, xq, dx, xb, out, f[13], f[14])  # noqa: F821
            elif slot == 10:
                K10(q, xq, dx, xb, out, f[13], f[14])  # noqa: F821
            elif slot == 11:
                K11(q, xq, dx, xb, out, f[13], f[14])  # noqa: F821
            elif slot == 12:
                K12(q, xq, dx, xb, out, f[13], f[14])  # noqa: F821
            elif slot == 13:
                K13(q, xq, dx, xb, out, f[13], f[14])  # noqa: F821
            elif slot == 14:
                K14(q, xq, dx, xb, out, f[13], f[14])  # noqa: F821
            else:
                K15(q, xq, dx, xb, out, f[13], f[14])  # noqa: F821


def _worker_loop_t(ctl, table, me, seen, spin):
    # Spin on this thread's control slot; run RUN commands here, hand anything else back to
    # Python as (kind, generation). After `spin` polls with no command: (IDLE, seen).
    base = me * CTL_STRIDE
    polls = 0
    while True:
        gen = load_acquire(ctl, base + GO)
        if gen == seen:
            polls += 1
            if polls >= spin:
                return IDLE, seen
            if polls % YIELD_EVERY == 0:
                sched_yield()
            else:
                cpu_relax()
            continue
        polls = 0
        seen = gen
        kind = ctl[base + KIND]
        if kind != RUN:
            return kind, gen
        RUN_TASKS(table, ctl[base + LO], ctl[base + HI])  # noqa: F821 (template constant)
        store_release(ctl, base + DONE, gen)


@njit(nogil=True, cache=True)
def wait_done(ctl, who, gen, spin):
    """Spin until thread `who` has finished generation `gen` (True), or `spin` polls (False)."""
    base = who * CTL_STRIDE
    for n in range(spin):
        if load_acquire(ctl, base + DONE) >= gen:
            return True
        if n % YIELD_EVERY == YIELD_EVERY - 1:
            sched_yield()
        else:
            cpu_relax()
    return load_acquire(ctl, base + DONE) >= gen


_SLOTS: list[list] = [[], []]      # kernels by xaux dtype: [int32 ones, int16 ones]
_BUILT: dict = {}


def register_kernel(kernel, int16_sums: bool) -> int:
    """A slot for a record unit's kernel (call before the first `executors()`)."""
    if _BUILT:
        raise RuntimeError("native kernel slots are fixed once the executors are built")
    group = _SLOTS[int16_sums]
    if len(group) == 8:
        raise RuntimeError("no free native kernel slot")
    group.append(kernel)
    return 8 * int16_sums + len(group) - 1


@njit(nogil=True, cache=True)
def _no_tasks(table, lo, hi):  # no kernel can run natively on this CPU
    pass


def executors():
    """(run_tasks, worker_loop): the Numba executors over every registered kernel (none where
    the CPU lacks AVX2: the record kernels' intrinsics must never be compiled there)."""
    if not _BUILT:
        consts = {f"K{8 * g + i}": (_SLOTS[g][i] if i < len(_SLOTS[g]) else _no_kernel)
                  for g in (0, 1) for i in range(8)}
        run_tasks = (specialize(_run_tasks_t, "native_run_tasks", **consts) if _simd.has_avx2()
                     else _no_tasks)
        _BUILT["run_tasks"] = run_tasks
        _BUILT["worker_loop"] = specialize(_worker_loop_t, "native_worker_loop",
                                           RUN_TASKS=run_tasks)
    return _BUILT["run_tasks"], _BUILT["worker_loop"]
