"""The kernel chooser (numallm_kernels._calibrate) with injected timings: no test here times
anything it asserts on. The decode choice follows the end-to-end GB/s, never the from-cache
speed; the end-to-end timing runs on the engine's pool over more than the L3."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

import numallm_kernels as nk
from numallm import ops, threads  # noqa: F401 - ops registers the engine's dispatch
from numallm.gguf_file import GGMLQuantizationType as T
from numallm_kernels import _calibrate, _decode_timing


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NUMALLM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("NUMALLM_KERNEL", raising=False)


def test_decode_choice_follows_end_to_end_not_the_cache():
    # Zen 4 as issue 15 saw it: VNNI faster from the cache, slower end to end at both counts
    e2e = {"avx512vnni-x8": {1: 11.0, 2: 15.0}, "avx2-x8": {1: 13.0, 2: 19.0}}
    assert _calibrate.pick_decode(e2e, ["avx512vnni-x8", "avx2-x8"]) == "avx2-x8"


def test_decode_choice_minimises_the_worst_loss():
    # a wins at 1 thread by 2%, loses at 2 threads by 30%: b loses least anywhere
    e2e = {"a": {1: 10.2, 2: 14.0}, "b": {1: 10.0, 2: 20.0}}
    assert _calibrate.pick_decode(e2e, ["a", "b"]) == "b"
    # a variant not timed at some count loses there; ties go by the order given
    assert _calibrate.pick_decode({"a": {1: 10.0}, "b": {1: 9.0, 2: 18.0}}, ["a", "b"]) == "b"
    assert _calibrate.pick_decode({"a": {1: 10.0, 2: 20.0}, "b": {1: 10.0, 2: 20.0}},
                                  ["b", "a"]) == "b"


def test_only_variants_that_can_win_are_timed_end_to_end(monkeypatch):
    timed = []

    def fake(cycle, variants, counts):
        timed.append(list(variants))
        table = {"fast": {1: 12.0, 2: 20.0}, "close": {1: 12.5, 2: 19.0}, "slow": {1: 1.0, 2: 2.0}}
        return {v: dict(table[v]) for v in variants}

    monkeypatch.setattr(_decode_timing, "decode_gbs", fake)
    monkeypatch.setattr(_decode_timing, "DecodeCycle", lambda unit, nbytes, rng: None)
    monkeypatch.setattr(_decode_timing, "thread_counts", lambda: [1, 2])
    # from the cache "slow" is 10x behind "fast": never timed end to end; "close" (its from-cache
    # figure below fast's end-to-end one, as per-call costs can make it) still is, with "fast"
    got = _calibrate.measure_decode(SimpleNamespace(prefetches=False),
                                    {"fast": 11.0, "close": 9.0, "slow": 1.1})
    assert timed == [["fast", "close"]]
    assert set(got) == {"fast", "close"}
    assert _calibrate.pick_decode(got, ["fast", "close", "slow"]) == "fast"


def test_end_to_end_figures_are_cached_and_shown(monkeypatch):
    unit = nk.get(T.Q8_0)
    e2e = {"avx2-x8": {1: 9.5, 2: 17.25}}
    monkeypatch.setattr(_calibrate, "measure_decode", lambda u, cache_gbs: e2e)
    first = _calibrate.choose(unit)
    assert first.source == "measured" and first.e2e == e2e and first.matvec == "avx2-x8"
    again = _calibrate.choose(unit)
    assert again.source == "cached" and again.e2e == e2e
    monkeypatch.setattr(unit, "_choice", again)
    row = next(r for r in nk.describe(calibrate=False) if r["type"] == "Q8_0")
    assert row["e2e"] == {1: 9.5, 2: 17.25} and row["gbs"] == 17.25


def test_prefill_is_timed_with_blas_on_one_thread(monkeypatch):
    # the engine's workers run BLAS capped at one thread (threads.activate); timed uncapped, the
    # blas-tile variant had every core and won prefill it loses in the engine
    from threadpoolctl import threadpool_info

    unit = nk.get(T.Q8_0)
    seen = []
    real_run = unit.run

    def run(variant, w, x, out, r0, r1):
        if variant == "blas-tile" and x.shape[0] > 1:
            seen.append(max((i["num_threads"] for i in threadpool_info()
                             if i["user_api"] == "blas"), default=1))
        return real_run(variant, w, x, out, r0, r1)

    monkeypatch.setattr(unit, "run", run)
    monkeypatch.setattr(_calibrate, "measure_decode", lambda u, cache_gbs: {"avx2-x8": {1: 1.0}})
    _calibrate.measure(unit)
    assert seen and set(seen) == {1}


def test_cycle_exceeds_the_l3_within_bounds(tmp_path):
    for idx, (level, size) in enumerate([(1, "32K"), (2, "512K"), (3, "96M")]):
        d = tmp_path / f"index{idx}"
        d.mkdir()
        (d / "level").write_text(f"{level}\n")
        (d / "size").write_text(f"{size}\n")
    assert _decode_timing.l3_bytes(str(tmp_path)) == 96 << 20
    assert _decode_timing.l3_bytes(str(tmp_path / "absent")) == _decode_timing.DEFAULT_L3
    assert _decode_timing.cycle_bytes(96 << 20) in (192 << 20, _decode_timing.CYCLE_MIN_BYTES)
    assert _decode_timing.cycle_bytes(1 << 20) == _decode_timing.CYCLE_MIN_BYTES
    assert _decode_timing.cycle_bytes(4 << 30) <= _decode_timing.CYCLE_MAX_BYTES


def test_decode_timing_runs_on_the_engines_pool(monkeypatch):
    """The timing dispatches through numallm's RowPool at each registered thread count, every
    matrix of a cycle larger than one copy, and computes the product it times."""
    made = []

    def make_pool(n):
        made.append(n)
        return threads.RowPool(n)

    monkeypatch.setattr(_decode_timing, "ROUNDS", 1)
    monkeypatch.setitem(_decode_timing._dispatch, "make_pool", make_pool)
    unit = nk.get(T.Q8_0)
    cycle = _decode_timing.DecodeCycle(unit, 1 << 20, np.random.default_rng(0))
    assert cycle.copies >= 2 and cycle.nbytes >= 1 << 20
    got = _decode_timing.decode_gbs(cycle, ["avx2-x8"] if "avx2-x8" in unit.variants()
                                    else ["numba-f32"], [1, 2])
    assert made == [1, 2] and all(g > 0 for by in got.values() for g in by.values())
    ref = np.empty_like(cycle.out)
    unit.run("numba-f32", cycle.ws[-1], cycle.x, ref, 0, ref.shape[1])
    np.testing.assert_allclose(cycle.out, ref, rtol=2e-2, atol=2e-2 * np.abs(ref).max())


def test_kernels_command_times_decode_on_the_engines_pool(tmp_path):
    # `numallm kernels` may be the first calibration on a machine: it must time decode at every
    # thread count the engine uses, not only the 1-thread fallback of a bare numallm_kernels
    import subprocess
    import sys

    probe = ("import sys; from numallm.cli import main; main(['kernels', '--no-calibrate', '--json']); "
             "from numallm_kernels import _decode_timing; "
             "sys.exit(0 if 'counts' in _decode_timing._dispatch else 3)")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                       env={**__import__("os").environ, "NUMALLM_CACHE_DIR": str(tmp_path)})
    assert r.returncode == 0, r.stderr[-2000:]


def test_decode_prefetch_is_timed_both_ways_and_chosen(monkeypatch):
    # Zen 4 as measured: the record kernels' software prefetch costs a third end to end
    timed = []

    def fake(cycle, configs, counts):
        timed.append(list(configs))
        table = {"avx2-x8": {1: 23.5, 2: 35.3}, "avx2-x8+pf": {1: 21.8, 2: 32.2}}
        return {c: dict(table[c]) for c in configs}

    monkeypatch.setattr(_decode_timing, "decode_gbs", fake)
    monkeypatch.setattr(_decode_timing, "DecodeCycle", lambda unit, nbytes, rng: None)
    unit = nk.get(T.Q4_K)
    assert unit.prefetches
    got = _calibrate.measure_decode(unit, {"avx2-x8": 22.0, "numba-f32": 0.4})
    assert timed == [["avx2-x8", "avx2-x8+pf"]] and set(got) == set(timed[0])
    assert _calibrate.split_config(_calibrate.pick_decode(got, ["avx2-x8"])) == ("avx2-x8", 0)
    assert _calibrate.split_config("avx2-x8+pf") == ("avx2-x8", _calibrate._simd.PREFETCH_AHEAD)
    # a unit whose kernels take no distance is timed once per variant
    timed.clear()
    _calibrate.measure_decode(SimpleNamespace(prefetches=False), {"avx2-x8": 22.0})
    assert timed == [["avx2-x8"]]


def test_chosen_prefetch_is_cached_and_reaches_decode_tasks_only(monkeypatch):
    if not nk._native.available():
        pytest.skip("no native kernel tasks on this CPU (AVX2 missing)")
    unit = nk.get(T.Q4_K)
    e2e = {"avx2-x8": {1: 10.0, 2: 18.0}, "avx2-x8+pf": {1: 11.0, 2: 19.0}}
    monkeypatch.setattr(_calibrate, "measure_decode", lambda u, cache_gbs: e2e)
    first = _calibrate.choose(unit)
    assert (first.matvec, first.prefetch, first.decode) == ("avx2-x8", 2048, "avx2-x8+pf")
    again = _calibrate.choose(unit)
    assert again.source == "cached" and again.prefetch == first.prefetch
    monkeypatch.setattr(unit, "_choice", again)
    w = unit.prepare(unit.synthetic(16, 256, np.random.default_rng(0)))
    for n_t, pf in ((1, 2048), (4, 0)):
        acts = nk.Activations(np.ones((n_t, 256), np.float32))
        unit.prepare_x(acts)
        task = unit.native_task(w, acts, np.empty((n_t, 16), np.float32), 0, 16)
        row = np.zeros(nk._native.TASK_FIELDS, np.int64)
        nk._native.encode(row, *task)
        assert row[-1] == pf
    monkeypatch.setenv("NUMALLM_KERNEL", "q4_k:avx2-x8+pf")
    forced = _calibrate.choose(unit)
    assert (forced.matvec, forced.prefetch, forced.source) == ("avx2-x8", 2048, "forced")
    monkeypatch.setenv("NUMALLM_KERNEL", "q4_k:avx2-x8")
    assert _calibrate.choose(unit).prefetch == 0
