"""Before/after: `numallm bench` from two checkouts of numallm on the same files, interleaved.

    python benchmarks/bench_ab.py A_DIR B_DIR MODEL [MODEL...] [--rounds 3] [-- BENCH ARGS]

A_DIR / B_DIR are checkouts (a `git worktree add` of the old commit, and this one); each round
runs `python -m numallm bench MODEL --json BENCH ARGS` once with A's code, then once with B's
(the order flips every round, so a drifting machine favours neither), and the table gives per
test, threads and placement the mean t/s of each side over the rounds and B/A. The code is
imported from each checkout through a folder of links on PYTHONPATH (numallm, numallm_kernels),
so one virtualenv with the dependencies serves both. Run it alone on the machine.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def _shim(checkout: Path) -> str:
    d = Path(tempfile.mkdtemp(prefix="numallm-ab-"))
    (d / "numallm").symlink_to(checkout.resolve() / "numallm")
    (d / "numallm_kernels").symlink_to(checkout.resolve() / "kernels")
    return str(d)


def _bench(shim: str, model: str, extra: list[str]) -> list[dict]:
    env = dict(os.environ, PYTHONPATH=shim)
    r = subprocess.run([sys.executable, "-m", "numallm", "bench", model, "--json", *extra],
                       capture_output=True, text=True, env=env)
    if r.returncode:
        raise SystemExit(f"bench failed ({shim}): {r.stderr.strip().splitlines()[-1:]}")
    return json.loads(r.stdout)


def main(argv: list[str]) -> int:
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    rounds = 3
    if "--rounds" in argv:
        i = argv.index("--rounds")
        rounds = int(argv[i + 1])
        argv = argv[:i] + argv[i + 2:]
    if len(argv) < 3:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    a, b, models = Path(argv[0]), Path(argv[1]), argv[2:]
    shims = {"A": _shim(a), "B": _shim(b)}
    for model in models:
        got: dict[tuple, dict[str, list[float]]] = {}
        for r in range(rounds):
            for side in ("A", "B") if r % 2 == 0 else ("B", "A"):
                for row in _bench(shims[side], model, extra):
                    key = (row["model"], row["test"], row["threads"], row["numa"])
                    got.setdefault(key, {"A": [], "B": []})[side].append(row["tokens_per_s"])
        print(f"\n{Path(model).name}: A = {a}, B = {b}, {rounds} rounds, mean t/s of each round's mean")
        print(f"{'model':<24} {'test':<7} {'t':>2} {'numa':<8} {'A t/s':>9} {'B t/s':>9} {'B/A':>6}")
        for (label, test, t, numa), v in sorted(got.items(), key=lambda kv: kv[0][1:]):
            ma, mb = statistics.mean(v["A"]), statistics.mean(v["B"])
            print(f"{label:<24} {test:<7} {t:>2} {str(numa):<8} {ma:9.2f} {mb:9.2f} {mb / ma:6.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
