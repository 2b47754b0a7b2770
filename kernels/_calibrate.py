"""Pick each unit's variant by timing it on this machine, once, and remember the choice.

On first use of a calibrated unit (`KernelUnit.calibrated`), every variant the CPU can run is
timed, and the result is cached per CPU model and type in $NUMALLM_CACHE_DIR/kernels.json
(default ~/.cache/numallm/), so later processes skip the timing.

- Prefill (T in PREFILL_TOKENS): a small weight that stays in the cache, one thread, BLAS
  capped at one thread as the engine's workers run it (uncapped, the blas-tile variant got
  every core and won T=128 on a 2-core Xeon where it loses by 25% in the engine); the fastest
  wins per T (prefill is compute-bound: each weight is reused T times).
- Decode (T = 1) is timed as decode runs (`_decode_timing`): a cycle of decode-sized matrices
  over twice the L3, one dispatch per matrix on the engine's pool, at 1 thread and at the
  physical core count. `pick_decode` then takes the variant whose worst loss to the best at any
  thread count is smallest, so a variant that loses end to end is not chosen however fast it is
  from the cache. Variants more than PRUNE_RATIO times slower than the fastest from the cache
  (the portable float ones) are not timed end to end.
  Bounded: the cycle is at most 1 GiB and each variant gets at most 7 passes per thread
  count (see _decode_timing).
- Decode's software prefetch (units with `prefetches`): each record variant is timed end to end
  twice, as "VARIANT" (no prefetch) and "VARIANT+pf" (lines `_simd.PREFETCH_AHEAD` bytes
  ahead), and the pair that loses least wins: the same prefetches that gain 7-16% on a
  Sapphire-Rapids-class Xeon cost AMD Zen 4 a third of its decode speed.

NUMALLM_KERNEL forces a choice: `NUMALLM_KERNEL=blas-tile` (every type that offers it) or
`NUMALLM_KERNEL=q4_0:numba-f32,q8_0:avx2-x8` (add `+pf` to a record variant for decode's
prefetch: `q4_k:avx2-x8+pf`). A forced variant the unit lacks, or this CPU
cannot run, is an error (never a silent fallback).
"""
from __future__ import annotations

import functools
import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from . import _decode_timing, _simd

CACHE_VERSION = 9   # 3: prefill timed with BLAS capped at one thread; 4: decode prefetch chosen;
                    # 5: the avx512vnni-x16 variant; 6: Q6_K records one sub-block per step;
                    # 7: avx512vnni-x16 for Q4_0 and Q8_0; 8: the avx512-iq variant;
                    # 9: token tiles for the IQ types and Q6_K (avx512vnni-t16), T = 16 timed
PF = "+pf"          # suffix of a decode configuration with software prefetch
PREFILL_TOKENS = (8, 16, 32, 128)   # 16: an MoE expert's share of a prefill chunk (e.g. 512
                                    # tokens x top-8 / 256 experts), where the 16-token tiles
                                    # (avx512vnni-t16) fill their lanes and 8 tokens do not
# Synthetic weight for the from-cache timing: big enough that a call takes ~1 ms, small enough
# that all variants together stay well under a second per type.
CAL_ROWS, CAL_COLS = 512, 2048

_file_lock = threading.Lock()


@dataclass(frozen=True)
class Choice:
    """A unit's chosen variants. `prefill`: (min T, variant) ascending; `gbs`: one-thread
    matvec GB/s of each variant from the cache (weight bytes per second); `e2e`: decode GB/s
    end to end ({variant: {threads: GB/s}}, the variants timed so); `source`: measured /
    cached / forced; `prefetch`: decode's software prefetch distance in bytes (0: none)."""

    matvec: str
    prefill: tuple[tuple[int, str], ...]
    gbs: dict[str, float] = field(default_factory=dict)
    source: str = "measured"
    e2e: dict[str, dict[int, float]] = field(default_factory=dict)
    prefetch: int = 0

    @property
    def decode(self) -> str:
        """The decode configuration as calibration and NUMALLM_KERNEL name it ("avx2-x8+pf")."""
        return self.matvec + (PF if self.prefetch else "")

    def for_tokens(self, n_tokens: int) -> str:
        if n_tokens <= 1:
            return self.matvec
        best = self.prefill[0][1] if self.prefill else self.matvec
        for t_min, variant in self.prefill:
            if n_tokens >= t_min:
                best = variant
        return best


def cache_dir() -> Path:
    env = os.environ.get("NUMALLM_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "numallm"


def cpu_key() -> str:
    """CPU model name + LLVM's name for it + the ISA features that matter to the variants."""
    model = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import llvmlite.binding as llvm

    feats = sorted(f for f in ("avx2", "fma", "f16c", "avx512f", "avx512vl", "avx512vnni", "avxvnni")
                   if f in _simd.host_features())
    return f"{model} | {llvm.get_host_cpu_name()} | {'+'.join(feats)}"


def first_run() -> bool:
    """True when this CPU has no calibration cached yet: the next model load compiles the kernels
    and times their variants (tens of seconds, once per CPU). For the CLI's announcement; nothing
    here prints."""
    return cpu_key() not in _load_cache().get("cpus", {})


def remember_cpu() -> None:
    """Record this CPU in the cache even where no calibrated type was used (an F32 model), so
    first_run() is true once per CPU."""
    key = cpu_key()
    if first_run():
        _write(lambda data: data.setdefault("cpus", {}).setdefault(key, {}))


def forced_variant(type_name: str) -> str | None:
    spec = os.environ.get("NUMALLM_KERNEL", "").strip()
    if not spec:
        return None
    general = None
    for item in spec.split(","):
        item = item.strip()
        if ":" in item:
            t, v = item.split(":", 1)
            if t.strip().lower() == type_name.lower():
                return v.strip()
        elif item:
            general = item
    return general


class KernelChoiceError(ValueError):
    """NUMALLM_KERNEL names a variant that cannot run here, or a type or variant that does not
    exist (numallm reports it as a user error; this package imports nothing from numallm)."""


def check_spec() -> None:
    """KernelChoiceError when NUMALLM_KERNEL names a type without selectable kernels or a variant
    no unit has: a typo would otherwise be ignored for every type it does not match."""
    spec = os.environ.get("NUMALLM_KERNEL", "").strip()
    if spec:
        _check_spec(spec)


@functools.lru_cache(maxsize=8)
def _check_spec(spec: str) -> None:
    from gguf import GGMLQuantizationType

    from .base import get, registered_types

    units = {u.qtype.name.lower(): u for u in map(get, registered_types()) if u.calibrated}
    known = {name: set(u.features) | set(u.variants()) for name, u in units.items()}
    every = set().union(*known.values())
    ggml = {q.name.lower() for q in GGMLQuantizationType}
    for item in filter(None, (i.strip() for i in spec.split(","))):
        t, colon, v = (x.strip() for x in item.partition(":"))
        if colon and t.lower() not in ggml:
            raise KernelChoiceError(f"NUMALLM_KERNEL={spec}: {t!r} is not a GGML type (types with "
                                    f"selectable kernels: {', '.join(sorted(known))}); change or unset it")
        allowed = known.get(t.lower(), every) if colon else every
        if split_config(v if colon else t)[0] not in allowed:
            raise KernelChoiceError(f"NUMALLM_KERNEL={spec}: no variant {(v if colon else t)!r}"
                                    f"{' for ' + t if colon else ''} (known: {', '.join(sorted(allowed))}); "
                                    f"`numallm kernels` lists them; change or unset it")


def _bad_force(unit, variant: str) -> Exception:
    return KernelChoiceError(
        f"NUMALLM_KERNEL asks for variant {variant!r} of {unit.qtype.name}, which this CPU cannot "
        f"run or the unit lacks (available: {', '.join(unit.variants())}); change or unset it")


def _time(fn, min_reps: int = 3, budget_s: float = 0.05) -> float:
    """Best-of wall time of fn() after one warm-up call (which also compiles)."""
    fn()
    best = float("inf")
    reps = 0
    start = time.perf_counter()
    while reps < min_reps or (time.perf_counter() - start < budget_s and reps < 50):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
        reps += 1
    return best


def split_config(config: str) -> tuple[str, int]:
    """"avx2-x8+pf" -> ("avx2-x8", PREFETCH_AHEAD); "avx2-x8" -> ("avx2-x8", 0)."""
    if config.endswith(PF):
        return config[:-len(PF)], _simd.PREFETCH_AHEAD
    return config, 0


def pick_decode(e2e: dict[str, dict[int, float]], order: list[str]) -> str:
    """The decode variant from end-to-end GB/s ({variant: {threads: GB/s}}): the one whose worst
    ratio of the best GB/s at a thread count to its own is smallest (a variant not timed at a
    count loses there), ties broken by the sum of those ratios, then by `order`."""
    counts = sorted({n for g in e2e.values() for n in g})
    best = {n: max(g.get(n, 0.0) for g in e2e.values()) for n in counts}

    def losses(v):
        r = [best[n] / e2e[v][n] if e2e[v].get(n, 0.0) > 0 else float("inf") for n in counts]
        return (max(r), sum(r), order.index(v) if v in order else len(order))
    return min(e2e, key=losses)


def measure(unit) -> Choice:
    rng = np.random.default_rng(0)
    raw = unit.synthetic(CAL_ROWS, CAL_COLS, rng)
    w = unit.prepare(raw)
    x = rng.standard_normal((max(PREFILL_TOKENS), CAL_COLS)).astype(np.float32)
    out = np.empty((max(PREFILL_TOKENS), CAL_ROWS), np.float32)
    variants = unit.variants()

    def timer(variant, n_t):
        return _time(lambda: unit.run(variant, w, x[:n_t], out[:n_t], 0, CAL_ROWS))

    dec = {v: timer(v, 1) for v in variants}
    prefill = []
    with threadpool_limits(limits=1):
        for n_t in PREFILL_TOKENS:
            times = {v: timer(v, n_t) for v in variants}
            prefill.append((n_t, min(times, key=times.get)))
    gbs = {v: round(raw.nbytes / t / 1e9, 2) for v, t in dec.items()}
    e2e = measure_decode(unit, gbs)
    matvec, pf = split_config(pick_decode(e2e, variants))
    return Choice(matvec, tuple(prefill), gbs, "measured", e2e, pf)


# variants slower than the fastest from the cache by more than this factor are not timed end
# to end (numba-f32 and blas-tile run 20-1000x slower than the SIMD variants): the from-cache
# figure carries the per-call costs of a small matrix, so it is no strict bound of the
# end-to-end speed, but a factor this large is beyond what those costs explain
PRUNE_RATIO = 4.0


def measure_decode(unit, cache_gbs: dict[str, float]) -> dict[str, dict[int, float]]:
    """End-to-end decode GB/s ({config: {threads: GB/s}}) of every variant within PRUNE_RATIO
    of the fastest from the cache, the variants taking turns; a unit that `prefetches` has each
    variant timed without and with decode's prefetch ("VARIANT", "VARIANT+pf")."""
    top = max(cache_gbs.values())
    order = sorted((v for v, g in cache_gbs.items() if g * PRUNE_RATIO >= top),
                   key=cache_gbs.get, reverse=True)
    if unit.prefetches:
        order = [c for v in order for c in (v, v + PF)]
    cycle = _decode_timing.DecodeCycle(unit, _decode_timing.cycle_bytes(_decode_timing.l3_bytes()),
                                       np.random.default_rng(1))
    return _decode_timing.decode_gbs(cycle, order, _decode_timing.thread_counts())


def _load_cache() -> dict:
    try:
        data = json.loads((cache_dir() / "kernels.json").read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) and data.get("version") == CACHE_VERSION else {}


def _store(key: str, type_name: str, choice: Choice) -> None:
    entry = {"matvec": choice.matvec, "prefetch": choice.prefetch,
             "prefill": [list(p) for p in choice.prefill],
             "gbs": choice.gbs, "e2e": {v: {str(n): g for n, g in by.items()}
                                        for v, by in choice.e2e.items()}}
    _write(lambda data: data.setdefault("cpus", {}).setdefault(key, {}).__setitem__(type_name, entry))


def _write(change) -> None:
    """Apply change(data) to the cache file's dict and write it back."""
    path = cache_dir() / "kernels.json"
    with _file_lock:
        data = _load_cache() or {"version": CACHE_VERSION, "cpus": {}}
        change(data)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
            os.replace(tmp, path)  # atomic: concurrent processes never see half a file
        except OSError:
            pass  # a read-only home only costs a re-calibration next time


def _from_cache(unit, key: str) -> Choice | None:
    entry = _load_cache().get("cpus", {}).get(key, {}).get(unit.qtype.name)
    if not isinstance(entry, dict):
        return None
    try:
        prefill = tuple((int(t), str(v)) for t, v in entry["prefill"])
        e2e = {str(v): {int(n): float(g) for n, g in by.items()}
               for v, by in entry.get("e2e", {}).items()}
        choice = Choice(str(entry["matvec"]), prefill,
                        {str(k): float(v) for k, v in entry.get("gbs", {}).items()}, "cached", e2e,
                        int(entry.get("prefetch", 0)))
    except (KeyError, TypeError, ValueError):
        return None
    usable = set(unit.variants())
    if choice.matvec not in usable or any(v not in usable for _, v in prefill):
        return None
    if not usable <= set(choice.gbs):   # a variant added since (e.g. avx512vnni-x8): time again
        return None
    return choice


def choose(unit) -> Choice:
    """The unit's variants: forced by NUMALLM_KERNEL, else cached, else measured now."""
    name = unit.qtype.name
    check_spec()
    forced = forced_variant(name)
    if forced is not None:
        variant, pf = split_config(forced)
        if variant not in unit.variants() or (pf and not unit.prefetches):
            raise _bad_force(unit, forced)
        return Choice(variant, ((2, variant),), {}, "forced", prefetch=pf)
    key = cpu_key()
    choice = _from_cache(unit, key)
    if choice is None:
        choice = measure(unit)
        _store(key, name, choice)
    return choice
