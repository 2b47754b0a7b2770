"""Resident-memory budgets shared by the memory tests: a probe process prints its /proc status
before loading ("base"), after loading ("loaded") and after running ("after"), and the growth at
each point must stay within 1.1x the weights plus the KV cache."""
from __future__ import annotations

MIB = 2 ** 20


def check_growth(m: dict, weights: int, label: str, resident_share: float) -> None:
    """Assert RSS growth at load, after running and at the peak (VmHWM) <= 1.1 x (weights + KV),
    and that at least `resident_share` of the weights became resident at load (they really are
    copies in memory, not a mapping the test never touched)."""
    base, budget = m["base"]["VmRSS"], 1.1 * (weights + m["kv"])
    grown = {"load": m["loaded"]["VmRSS"] - base, "run": m["after"]["VmRSS"] - base,
             "peak": m["after"]["VmHWM"] - base}
    print(f"\n{label}: weights {weights / MIB:.0f} MiB, KV {m['kv'] / MIB:.0f} MiB; RSS growth at "
          f"load {grown['load'] / MIB:.0f} MiB, after running {grown['run'] / MIB:.0f} MiB, peak "
          f"{grown['peak'] / MIB:.0f} MiB (budget {budget / MIB:.0f} MiB; process RSS "
          f"{m['after']['VmRSS'] / MIB:.0f} MiB)")
    for what, n in grown.items():
        assert n <= budget, (f"RSS grew {n / MIB:.0f} MiB ({what}), over 1.1x weights + KV "
                             f"({budget / MIB:.0f} MiB)")
    assert grown["load"] >= resident_share * m["weights"]
