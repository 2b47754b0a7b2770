"""The task executor's kernel call: one int64 task row (`_native`'s TASK_FIELDS) -> the call of
the record kernel in its slot, or of decode attention. A template: `_native.executors()` fills
K0..K63 with the registered kernels (an if-ladder, as Numba cannot call through a table of
functions without the GIL)."""
from __future__ import annotations

from numba import carray, njit

from ._native import ATTN, SLOTS_PER_GROUP, ptr_f32, ptr_i8, ptr_i16, ptr_i32, ptr_u8
from ._native_attention import _run_attention


@njit(nogil=True, cache=True)
def _no_kernel(q, xq, dx, xaux, out, r0, r1, pf):  # an unused slot
    pass


def _run_tasks_t(table, lo, hi):
    # slots 0..31: K0..K31 (int32 xaux), 32..63: K32..K63 (int16 xaux), ATTN..: attention; the
    # K constants are the registered kernels (template constants, see executors)
    for t in range(lo, hi):
        f = table[t]
        slot = f[0]
        if slot >= ATTN:
            _run_attention(f)
            continue
        n_t = f[11]
        q = carray(ptr_u8(f[1]), (f[2], f[3]))
        xq = carray(ptr_i8(f[4]), (n_t, f[5]))
        dx = carray(ptr_f32(f[6]), (n_t, f[7]))
        out = carray(ptr_f32(f[10]), (n_t, f[12]))
        if slot < SLOTS_PER_GROUP:
            xa = carray(ptr_i32(f[8]), (n_t, f[9]))
            if slot == 0:
                K0(q, xq, dx, xa, out, f[13], f[14], f[15])  # noqa: F821
            elif slot == 1:
                K1(q, xq, dx, xa, out, f[13], f[14], f[15])  # noqa: F821
            elif slot == 2:
                K2(q, xq, dx, xa, out, f[13], f[14], f[15])  # noqa: F821
            elif slot == 3:
                K3(q, xq, dx, xa, out, f[13], f[14], f[15])  # noqa: F821
            elif slot == 4:
                K4(q, xq, dx, xa, out, f[13], f[14], f[15])  # noqa: F821
            elif slot == 5:
                K5(q, xq, dx, xa, out, f[13], f[14], f[15])  # noqa: F821
            elif slot == 6:
                K6(q, xq, dx, xa, out, f[13], f[14], f[15])  # noqa: F821
            elif slot == 7:
                K7(q, xq, dx, xa, out, f[13], f[14], f[15])  # noqa: F821
            elif slot == 8:
                K8(q, xq, dx, xa, out, f[13], f[14], f[15])  # noqa: F821
            elif slot == 9:
                K9(q, xq, dx, xa, out, f[13], f[14], f[15])  # noqa: F821
            elif slot == 10:
                K10(q, xq, dx, xa, out, f[13], f[14], f[15])  # noqa: F821
            elif slot == 11:
                K11(q, xq, dx, xa, out, f[13], f[14], f[15])  # noqa: F821
            elif slot == 12:
                K12(q, xq, dx, xa, out, f[13], f[14], f[15])  # noqa: F821
            elif slot == 13:
                K13(q, xq, dx, xa, out, f[13], f[14], f[15])  # noqa: F821
            elif slot == 14:
                K14(q, xq, dx, xa, out, f[13], f[14], f[15])  # noqa: F821
            elif slot == 15:
                K15(q, xq, dx, xa, out, f[13], f[14], f[15])  # noqa: F821
            elif slot == 16:
                K16(q, xq, dx, xa, out, f[13], f[14], f[15])  # noqa: F821
            elif slot == 17:
                K17(q, xq, dx, xa, out, f[13], f[14], f[15])  # noqa: F821
            elif slot == 18:
                K18(q, xq, dx, xa, out, f[13], f[14], f[15])  # noqa: F821
            elif slot == 19:
                K19(q, xq, dx, xa, out, f[13], f[14], f[15])  # noqa: F821
            elif slot == 20:
                K20(q, xq, dx, xa, out, f[13], f[14], f[15])  # noqa: F821
            elif slot == 21:
                K21(q, xq, dx, xa, out, f[13], f[14], f[15])  # noqa: F821
            elif slot == 22:
                K22(q, xq, dx, xa, out, f[13], f[14], f[15])  # noqa: F821
            elif slot == 23:
                K23(q, xq, dx, xa, out, f[13], f[14], f[15])  # noqa: F821
            elif slot == 24:
                K24(q, xq, dx, xa, out, f[13], f[14], f[15])  # noqa: F821
            elif slot == 25:
                K25(q, xq, dx, xa, out, f[13], f[14], f[15])  # noqa: F821
            elif slot == 26:
                K26(q, xq, dx, xa, out, f[13], f[14], f[15])  # noqa: F821
            elif slot == 27:
                K27(q, xq, dx, xa, out, f[13], f[14], f[15])  # noqa: F821
            elif slot == 28:
                K28(q, xq, dx, xa, out, f[13], f[14], f[15])  # noqa: F821
            elif slot == 29:
                K29(q, xq, dx, xa, out, f[13], f[14], f[15])  # noqa: F821
            elif slot == 30:
                K30(q, xq, dx, xa, out, f[13], f[14], f[15])  # noqa: F821
            else:
                K31(q, xq, dx, xa, out, f[13], f[14], f[15])  # noqa: F821
        else:
            xb = carray(ptr_i16(f[8]), (n_t, f[9]))
            if slot == 32:
                K32(q, xq, dx, xb, out, f[13], f[14], f[15])  # noqa: F821
            elif slot == 33:
                K33(q, xq, dx, xb, out, f[13], f[14], f[15])  # noqa: F821
            elif slot == 34:
                K34(q, xq, dx, xb, out, f[13], f[14], f[15])  # noqa: F821
            elif slot == 35:
                K35(q, xq, dx, xb, out, f[13], f[14], f[15])  # noqa: F821
            elif slot == 36:
                K36(q, xq, dx, xb, out, f[13], f[14], f[15])  # noqa: F821
            elif slot == 37:
                K37(q, xq, dx, xb, out, f[13], f[14], f[15])  # noqa: F821
            elif slot == 38:
                K38(q, xq, dx, xb, out, f[13], f[14], f[15])  # noqa: F821
            elif slot == 39:
                K39(q, xq, dx, xb, out, f[13], f[14], f[15])  # noqa: F821
            elif slot == 40:
                K40(q, xq, dx, xb, out, f[13], f[14], f[15])  # noqa: F821
            elif slot == 41:
                K41(q, xq, dx, xb, out, f[13], f[14], f[15])  # noqa: F821
            elif slot == 42:
                K42(q, xq, dx, xb, out, f[13], f[14], f[15])  # noqa: F821
            elif slot == 43:
                K43(q, xq, dx, xb, out, f[13], f[14], f[15])  # noqa: F821
            elif slot == 44:
                K44(q, xq, dx, xb, out, f[13], f[14], f[15])  # noqa: F821
            elif slot == 45:
                K45(q, xq, dx, xb, out, f[13], f[14], f[15])  # noqa: F821
            elif slot == 46:
                K46(q, xq, dx, xb, out, f[13], f[14], f[15])  # noqa: F821
            elif slot == 47:
                K47(q, xq, dx, xb, out, f[13], f[14], f[15])  # noqa: F821
            elif slot == 48:
                K48(q, xq, dx, xb, out, f[13], f[14], f[15])  # noqa: F821
            elif slot == 49:
                K49(q, xq, dx, xb, out, f[13], f[14], f[15])  # noqa: F821
            elif slot == 50:
                K50(q, xq, dx, xb, out, f[13], f[14], f[15])  # noqa: F821
            elif slot == 51:
                K51(q, xq, dx, xb, out, f[13], f[14], f[15])  # noqa: F821
            elif slot == 52:
                K52(q, xq, dx, xb, out, f[13], f[14], f[15])  # noqa: F821
            elif slot == 53:
                K53(q, xq, dx, xb, out, f[13], f[14], f[15])  # noqa: F821
            elif slot == 54:
                K54(q, xq, dx, xb, out, f[13], f[14], f[15])  # noqa: F821
            elif slot == 55:
                K55(q, xq, dx, xb, out, f[13], f[14], f[15])  # noqa: F821
            elif slot == 56:
                K56(q, xq, dx, xb, out, f[13], f[14], f[15])  # noqa: F821
            elif slot == 57:
                K57(q, xq, dx, xb, out, f[13], f[14], f[15])  # noqa: F821
            elif slot == 58:
                K58(q, xq, dx, xb, out, f[13], f[14], f[15])  # noqa: F821
            elif slot == 59:
                K59(q, xq, dx, xb, out, f[13], f[14], f[15])  # noqa: F821
            elif slot == 60:
                K60(q, xq, dx, xb, out, f[13], f[14], f[15])  # noqa: F821
            elif slot == 61:
                K61(q, xq, dx, xb, out, f[13], f[14], f[15])  # noqa: F821
            elif slot == 62:
                K62(q, xq, dx, xb, out, f[13], f[14], f[15])  # noqa: F821
            else:
                K63(q, xq, dx, xb, out, f[13], f[14], f[15])  # noqa: F821
