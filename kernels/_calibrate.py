"""Pick each unit's variant by timing it on this machine, once, and remember the choice.

On first use of a calibrated unit (`KernelUnit.calibrated`), every variant the CPU can run is
timed on a synthetic weight for decode (T = 1) and for a few prefill lengths (T in
PREFILL_TOKENS); the fastest wins in each case. The result is cached per CPU model and type in
$NUMALLM_CACHE_DIR/kernels.json (default ~/.cache/numallm/), so later processes skip the timing.

NUMALLM_KERNEL forces a choice: `NUMALLM_KERNEL=blas-tile` (every type that offers it) or
`NUMALLM_KERNEL=q4_0:numba-f32,q8_0:avx2-x8`. A forced variant the unit lacks, or this CPU
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

from . import _simd

CACHE_VERSION = 1
PREFILL_TOKENS = (8, 32, 128)
# Synthetic weight for timing: big enough that a call takes ~1 ms, small enough that all
# variants together stay well under a second per type.
CAL_ROWS, CAL_COLS = 512, 2048

_file_lock = threading.Lock()


@dataclass(frozen=True)
class Choice:
    """A unit's chosen variants. `prefill`: (min T, variant) ascending; `gbs`: decode GB/s of
    each timed variant (weight bytes per second); `source`: measured / cached / forced."""

    matvec: str
    prefill: tuple[tuple[int, str], ...]
    gbs: dict[str, float] = field(default_factory=dict)
    source: str = "measured"

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
        if (v if colon else t) not in allowed:
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
    matvec = min(dec, key=dec.get)
    prefill = []
    for n_t in PREFILL_TOKENS:
        times = {v: timer(v, n_t) for v in variants}
        prefill.append((n_t, min(times, key=times.get)))
    gbs = {v: round(raw.nbytes / t / 1e9, 2) for v, t in dec.items()}
    return Choice(matvec, tuple(prefill), gbs, "measured")


def _load_cache() -> dict:
    try:
        data = json.loads((cache_dir() / "kernels.json").read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) and data.get("version") == CACHE_VERSION else {}


def _store(key: str, type_name: str, choice: Choice) -> None:
    entry = {"matvec": choice.matvec, "prefill": [list(p) for p in choice.prefill],
             "gbs": choice.gbs}
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
        choice = Choice(str(entry["matvec"]), prefill,
                        {str(k): float(v) for k, v in entry.get("gbs", {}).items()}, "cached")
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
        if forced not in unit.variants():
            raise _bad_force(unit, forced)
        return Choice(forced, ((2, forced),), {}, "forced")
    key = cpu_key()
    choice = _from_cache(unit, key)
    if choice is None:
        choice = measure(unit)
        _store(key, name, choice)
    return choice
