"""`numallm kernels`: per GGML type, the kernel variant chosen on this machine and why."""
from __future__ import annotations

import json


def register(sub) -> None:
    p = sub.add_parser("kernels", help="list the matmul kernel chosen per quant type, its ISA needs and GB/s")
    p.add_argument("--no-calibrate", action="store_true",
                   help="do not time uncalibrated types now (show only cached choices)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    import numallm_kernels
    from numallm_kernels import _calibrate

    from .. import ops  # noqa: F401 - registers the engine's pool, so decode is timed at every count
    from .common import announce_first_run

    if not args.no_calibrate:
        announce_first_run(args)

    rows = numallm_kernels.describe(calibrate=not args.no_calibrate)
    if args.json:
        print(json.dumps({"cpu": _calibrate.cpu_key(), "kernels": rows}))
        return 0
    print(f"cpu: {_calibrate.cpu_key()}  (force a variant with NUMALLM_KERNEL=type:variant)")
    print("decode GB/s: the chosen variant end to end (weights from DRAM, the engine's pool), "
          "by thread count; +pf: decode prefetches the weights in software")
    print(f"{'type':<8} {'decode variant':<18} {'GB/s':>14}  {'source':<10} {'needs':<22} prefill")
    for r in rows:
        gbs = " / ".join(f"{g:.1f} ({n}t)" for n, g in r["e2e"].items()) if r["e2e"] else "-"
        pre = ", ".join(f"T>={t}: {v}" for t, v in r["prefill"]) if r["prefill"] else "-"
        print(f"{r['type']:<8} {r['decode'] or '(not measured)':<18} {gbs:>14}  {r['source']:<10} "
              f"{','.join(r['features']) or '-':<22} {pre}")
    return 0
