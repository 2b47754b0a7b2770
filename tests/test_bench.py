"""numallm bench: the arithmetic (pure functions), the driver with a fake runner, and the CLI
end to end on a tiny synthetic model. No speed is asserted: the machine is shared."""
from __future__ import annotations

import json
import math
import os
import sys
from collections import Counter

import numpy as np
import pytest

from numallm import bench, llamacpp, synth
from numallm.bench import LLAMA_CPP, NUMALLM, BenchPlan, BenchRow, ModelInfo
from numallm.cli import main
from numallm.errors import NumallmError


def row(engine=NUMALLM, test="tg128", threads=1, ts=10.0, sd=0.5, gbps=1.0, frac=0.5, numa=None,
        sync=None, other=None):
    numa = ("off" if engine == NUMALLM else "") if numa is None else numa
    return BenchRow(engine, test, threads, 128, 128, (ts,), ts, sd, gbps, frac, numa, sync, other)


# -- arithmetic ----------------------------------------------------------------------------------

def test_mean_sd_is_the_sample_standard_deviation():
    xs = np.random.default_rng(3).uniform(1, 100, 7).tolist()
    m, sd = bench.mean_sd(xs)
    assert m == pytest.approx(np.mean(xs))
    assert sd == pytest.approx(np.std(xs, ddof=1))
    assert bench.mean_sd([2, 4, 4, 4, 5, 5, 7, 9]) == pytest.approx((5.0, math.sqrt(32 / 7)))
    assert bench.mean_sd([3.5]) == (3.5, 0.0)
    with pytest.raises(ValueError):
        bench.mean_sd([])


def test_summarize_decode_counts_one_pass_per_token():
    r = bench.summarize(NUMALLM, "tg4", 2, 4, 4, [0.5, 1.0], weight_bytes=3 * 10**9,
                        machine_gbps=36.0)
    assert r.samples == (8.0, 4.0)
    assert (r.tokens_per_s, r.stddev) == pytest.approx((6.0, math.sqrt(8)))
    assert r.gbps == pytest.approx(18.0)          # 3 GB per token, 6 tokens/s
    assert r.bw_fraction == pytest.approx(0.5)
    assert (r.engine, r.test, r.threads) == (NUMALLM, "tg4", 2)


def test_summarize_prefill_counts_forward_passes_not_tokens():
    one = bench.summarize(NUMALLM, "pp512", 1, 512, 1, [2.0], 10**9, 10.0)
    assert one.tokens_per_s == 256.0
    assert one.gbps == pytest.approx(0.5)         # one pass every 2 s
    two = bench.summarize(NUMALLM, "pp1024", 1, 1024, 2, [2.0], 10**9, 10.0)
    assert two.gbps == pytest.approx(1.0)         # two passes in 2 s
    assert math.isnan(bench.summarize(NUMALLM, "pp8", 1, 8, 1, [1.0], 10**9, 0.0).bw_fraction)


def test_gbps():
    assert bench.gbps(618_725_376, 6.0) == pytest.approx(3.712352256)


def test_ratios_pair_engines_by_test_and_threads():
    rows = [row(NUMALLM, "tg8", 1, ts=5.0), row(LLAMA_CPP, "tg8", 1, ts=20.0),
            row(NUMALLM, "tg8", 2, ts=9.0), row(NUMALLM, "pp8", 1, ts=30.0),
            row(LLAMA_CPP, "pp8", 1, ts=60.0)]
    assert bench.ratios(rows) == {("tg8", 1, "off"): 0.25, ("pp8", 1, "off"): 0.5}
    assert bench.ratios(rows[:1]) == {}
    shard = row(NUMALLM, "tg8", 1, ts=10.0, numa="shard")
    assert bench.ratios(rows + [shard])[("tg8", 1, "shard")] == 0.5


def _cells(table: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()]


def test_format_table_numallm_only():
    info = ModelInfo("llama Q4_0", 3 * 2**29, 1_100_048_384)
    lines = _cells(bench.format_table(info, [row(ts=49.123, sd=0.8, gbps=30.41, frac=0.4567)]))
    assert lines[0] == ["model", "size", "params", "numa", "threads", "test", "t/s", "GB/s", "% bw"]
    assert set(lines[1][0]) == {"-"} and lines[1][4].endswith(":")   # numbers right-aligned
    assert lines[2] == ["llama Q4_0", "1.50 GiB", "1.10 B", "off", "1", "tg128", "49.12 ± 0.80",
                        "30.41", "45.7"]
    widths = {len(line) for line in bench.format_table(info, [row(), row(ts=1234.5)]).splitlines()}
    assert len(widths) == 1                        # columns line up


def test_format_table_with_llama_cpp_adds_engine_and_ratio():
    info = ModelInfo("llama Q8_0", 5 * 2**20, 9_000_000)
    rows = [row(NUMALLM, ts=12.0), row(LLAMA_CPP, ts=48.0, frac=math.nan)]
    lines = _cells(bench.format_table(info, rows))
    assert lines[0][3] == "engine" and lines[0][-1] == "ratio"
    assert lines[2][:4] == ["llama Q8_0", "5.00 MiB", "9.00 M", "numallm"]
    assert lines[2][-1] == "0.25"
    assert lines[3][3] == "llama.cpp" and lines[3][-1] == "" and lines[3][-2] == "?"
    assert lines[3][4] == "-"                                        # no numallm placement


def test_format_table_numa_rows_add_sync_and_non_kernel_columns():
    info = ModelInfo("llama Q4_0", 2**30, 10**9)
    rows = [row(numa="off", other=3.25), row(numa="shard", sync=1.5, other=4.0),
            row(test="pp512", numa="shard", sync=0.125)]
    lines = _cells(bench.format_table(info, rows))
    assert lines[0][-3:] == ["% bw", "sync ms/t", "other ms/t"]
    assert [ln[3] for ln in lines[2:]] == ["off", "shard", "shard"]
    assert [ln[-2:] for ln in lines[2:]] == [["", "3.25"], ["1.50", "4.00"], ["0.12", ""]]


def test_summarize_numa_sync_and_non_kernel_per_token():
    r = bench.summarize(NUMALLM, "tg8", 2, 8, 8, [1.0, 1.0], 10**9, 10.0, "shard", [0.004, 0.012], 0.016)
    assert r.numa == "shard" and r.sync_ms == pytest.approx(1.0) and r.other_ms == pytest.approx(2.0)
    off = bench.summarize(NUMALLM, "tg8", 2, 8, 8, [1.0], 10**9, 10.0, "off", None, None)
    assert off.sync_ms is None and off.other_ms is None


def test_busy_s_is_the_union_of_spans():
    assert bench.busy_s([(0.0, 1.0), (0.5, 2.0), (3.0, 4.0), (3.5, 3.6)]) == 3.0
    assert bench.busy_s([]) == 0.0


def test_ops_timing_records_products_and_restores(tmp_path):
    """ops.timing sees each product (and its input's encoding) without touching the units."""
    from numallm import ops, threads
    from numallm.gguf_file import GGUFFile
    from numallm.synth import write_model

    path = write_model(tmp_path / "m.gguf", arch="llama", qtype="Q8_0", shape="tiny", seed=0)
    lin = ops.Linear(GGUFFile(path).tensor("blk.0.ffn_up.weight"))
    x = np.ones((3, lin.shape[1]), np.float32)
    with threads.activate(threads.RowPool(2)):
        with ops.timing([]) as spans:
            timed = ops.matmuls(x, lin)[0]
        assert len(spans) >= 3                      # the encoding and each thread's rows
        assert 0 < bench.busy_s(spans) <= sum(b - a for a, b in spans)
        assert ops._spans is None     # and nothing was patched onto the kernel unit:
        assert not {"prepare_x", "matmul_x", "matvec", "matmul", "native_task"} & set(vars(lin.unit))
        np.testing.assert_array_equal(timed, ops.matmuls(x, lin)[0])


def test_json_rows():
    info = ModelInfo("llama Q4_0", 1000, 10)
    rows = [row(NUMALLM, ts=12.0, frac=math.nan), row(LLAMA_CPP, ts=48.0)]
    out = json.loads(json.dumps(bench.to_json_rows(info, rows, {1: 20.0})))
    assert [o["engine"] for o in out] == [NUMALLM, LLAMA_CPP]
    assert out[0]["bw_fraction"] is None and out[1]["bw_fraction"] == 0.5
    assert out[0]["ratio_vs_llama_cpp"] == 0.25 and out[1]["ratio_vs_llama_cpp"] is None
    assert out[0]["machine_gbps"] == 20.0 and out[0]["samples"] == [12.0]
    assert out[0]["numa"] == "off" and out[1]["numa"] is None
    assert out[0]["sync_ms_per_token"] is None and out[0]["non_kernel_ms_per_token"] is None


def test_parse_threads():
    assert bench.parse_threads("1,2,4") == [1, 2, 4]
    assert bench.parse_threads("2,1,2") == [2, 1]
    for bad in ("", "0", "1,-2", "a", "1,,2"):
        with pytest.raises(NumallmError, match="thread list"):
            bench.parse_threads(bad)


def test_model_label():
    assert bench.model_label("llama", 15, Counter({"Q4_K": 5, "Q6_K": 1})) == "llama Q4_K_M"
    assert bench.model_label("qwen2", None, Counter({"Q4_K": 5, "Q6_K": 9})) == "qwen2 Q6_K"
    assert bench.model_label("llama", 999, Counter({"Q8_0": 1})) == "llama Q8_0"


def test_read_bandwidth_is_positive_and_buffer_is_touched():
    buf = bench.bandwidth_buffer(8 << 20)
    assert buf.nbytes == 8 << 20 and int(buf.sum()) == buf.size
    for t in (1, 2, 3):
        g = bench.read_bandwidth(t, buf, repeats=1)
        assert 0 < g < math.inf


def test_plan_tokens_are_seeded_and_below_vocab():
    plan = BenchPlan(64, 16, (1,), 1, seed=5)
    pp, prompt, gen = bench.plan_tokens(plan, 100)
    assert (pp.shape, prompt.shape, gen.shape) == ((64,), (bench.TG_PROMPT,), (16,))
    assert pp.dtype == np.int64 and max(pp.max(), prompt.max(), gen.max()) < 100
    assert all(np.array_equal(a, b) for a, b in zip(bench.plan_tokens(plan, 100), (pp, prompt, gen)))
    other = bench.plan_tokens(BenchPlan(64, 16, (1,), 1, seed=6), 100)[0]
    assert not np.array_equal(other, pp)
    assert plan.n_ctx == 64 and BenchPlan(8, 100, (1,), 1).n_ctx == bench.TG_PROMPT + 100


class FakeRunner:
    """Records calls in a shared log; each prefill takes `pp_s` s in 1 pass, each decode 4 s."""

    numa = "off"
    last_sync_s = None

    def __init__(self, engine, calls, pp_s=2.0):
        self.engine, self.calls, self.pp_s = engine, calls, pp_s

    def non_kernel_s(self, prompt, tokens):
        self.calls.append((self.engine, "non_kernel", len(prompt), len(tokens)))
        return None

    def prefill(self, tokens):
        self.calls.append((self.engine, "prefill", len(tokens)))
        return self.pp_s, 1

    def decode(self, prompt, tokens):
        self.calls.append((self.engine, "decode", len(prompt), len(tokens)))
        return 4.0


def test_run_tests_warms_up_then_repeats_each_test():
    calls, log = [], []
    rows = bench.run_tests([FakeRunner(NUMALLM, calls)], BenchPlan(32, 8, (2,), 3), 2, 1000,
                           10**9, 4.0, log.append)
    assert calls == [(NUMALLM, "decode", bench.WARMUP_TOKENS, 2), (NUMALLM, "prefill", 32)] + \
        [(NUMALLM, "prefill", 32)] * 3 + [(NUMALLM, "decode", bench.TG_PROMPT, 8)] * 3 + \
        [(NUMALLM, "non_kernel", bench.TG_PROMPT, 8)]
    pp, tg = rows
    assert (pp.test, pp.engine, pp.threads, pp.tokens_per_s, pp.stddev) == ("pp32", NUMALLM, 2, 16.0, 0.0)
    assert pp.gbps == pytest.approx(0.5) and tg.gbps == pytest.approx(2.0)   # 1 pass/2 s; 2 tok/s
    assert tg.test == "tg8" and tg.bw_fraction == pytest.approx(0.5) and len(log) == 2
    only_tg = bench.run_tests([FakeRunner(NUMALLM, [])], BenchPlan(0, 8, (1,), 1), 1, 10, 1, 1.0,
                              log.append)
    assert [r.test for r in only_tg] == ["tg8"]
    long_pp = []                    # the pp test's warm-up stops at WARMUP_PREFILL tokens
    bench.run_tests([FakeRunner(NUMALLM, long_pp)], BenchPlan(300, 0, (1,), 1), 1, 1000, 1, 1.0,
                    log.append)
    assert long_pp[1:] == [(NUMALLM, "prefill", bench.WARMUP_PREFILL), (NUMALLM, "prefill", 300)]


def test_run_tests_interleaves_engines_repetition_by_repetition():
    calls = []
    runners = [FakeRunner(NUMALLM, calls, pp_s=2.0), FakeRunner(LLAMA_CPP, calls, pp_s=1.0)]
    rows = bench.run_tests(runners, BenchPlan(16, 0, (1,), 2), 1, 100, 10**9, 1.0, lambda s: None)
    assert [c[:2] for c in calls] == [(NUMALLM, "decode"), (NUMALLM, "prefill"),
                                      (LLAMA_CPP, "decode"), (LLAMA_CPP, "prefill")] + \
        [(NUMALLM, "prefill"), (LLAMA_CPP, "prefill")] * 2
    assert [(r.engine, r.tokens_per_s) for r in rows] == [(NUMALLM, 8.0), (LLAMA_CPP, 16.0)]
    assert bench.ratios(rows) == {("pp16", 1, "off"): 0.5}


class DepthRunner(FakeRunner):
    """A FakeRunner that can fill a depth first and run the tests there."""

    def prime(self, tokens):
        self.calls.append((self.engine, "prime", len(tokens)))

    def prefill(self, tokens, pos0=0):
        self.calls.append((self.engine, "prefill", len(tokens), pos0))
        return self.pp_s, 1

    def decode_at(self, pos0, tokens):
        self.calls.append((self.engine, "decode_at", pos0, len(tokens)))
        return 4.0

    def non_kernel_s(self, prompt, tokens, pos0=0):
        self.calls.append((self.engine, "non_kernel", prompt, pos0, len(tokens)))
        return None


def test_depth_fills_once_then_runs_the_tests_there():
    """-d D (llama-bench's): the depth's tokens prefilled once per runner after the warm-up, the
    tests at position D each repetition, named as llama-bench names them."""
    calls = []
    plan = BenchPlan(16, 8, (1,), 2, depth=40)
    assert plan.n_ctx == 56 and len(bench.plan_tokens(plan, 100)[1]) == 40
    rows = bench.run_tests([DepthRunner(NUMALLM, calls)], plan, 1, 100, 10**9, 1.0, lambda s: None)
    assert calls == [(NUMALLM, "decode", bench.WARMUP_TOKENS, 2), (NUMALLM, "prefill", 16, 0),
                     (NUMALLM, "prime", 40)] + \
        [(NUMALLM, "prefill", 16, 40)] * 2 + [(NUMALLM, "decode_at", 40, 8)] * 2 + \
        [(NUMALLM, "non_kernel", None, 40, 8)]
    assert [r.test for r in rows] == ["pp16 @ d40", "tg8 @ d40"]


# -- CLI end to end ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    return str(synth.cached_model(tmp_path_factory.mktemp("bench"), qtype="Q4_0", shape="tiny"))


def _bench_json(capsys, argv: list[str]) -> list[dict]:
    assert main(["bench", *argv, "--json", "--bw-mib", "16"]) == 0
    return json.loads(capsys.readouterr().out)


def test_cli_json(tiny_model, capsys):
    out = _bench_json(capsys, [tiny_model, "-p", "16", "-n", "4", "-r", "1", "-t", "1"])
    assert [(o["engine"], o["test"], o["threads"]) for o in out] == \
        [(NUMALLM, "pp16", 1), (NUMALLM, "tg4", 1)]
    for o in out:
        assert o["tokens_per_s"] > 0 and o["stddev"] == 0.0 and o["model"] == "llama Q4_0"
        # a prefill pass reads every matrix, a decoded token all but the (untied) embedding table
        read = o["size_bytes"] if o["test"].startswith("pp") else o["active_bytes"]
        assert o["gbps"] == pytest.approx(read * o["tokens_per_s"] * o["n_passes"]
                                          / o["n_tokens"] / 1e9)
        assert o["active_bytes"] < o["size_bytes"]
        assert o["bw_fraction"] == pytest.approx(o["gbps"] / o["machine_gbps"])
    assert out[0]["n_passes"] == 1 and out[1]["n_passes"] == 4


def test_cli_vs_llama_cpp(tiny_model, capsys):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    if llamacpp.problem():
        pytest.skip(llamacpp.problem())
    out = _bench_json(capsys, [tiny_model, "-p", "16", "-n", "4", "-r", "1", "-t", "1",
                               "--vs-llama-cpp"])
    by = {(o["engine"], o["test"]): o for o in out}
    assert sorted(by) == sorted((e, t) for e in (NUMALLM, LLAMA_CPP) for t in ("pp16", "tg4"))
    for t in ("pp16", "tg4"):
        assert by[(LLAMA_CPP, t)]["tokens_per_s"] > 0
        assert by[(NUMALLM, t)]["ratio_vs_llama_cpp"] == pytest.approx(
            by[(NUMALLM, t)]["tokens_per_s"] / by[(LLAMA_CPP, t)]["tokens_per_s"])


def test_cli_depth_with_a_q8_0_cache_vs_llama_cpp(tiny_model, capsys):
    """Both engines at a depth, each with a q8_0 KV cache (llama.cpp's needs flash attention)."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    if llamacpp.problem():
        pytest.skip(llamacpp.problem())
    out = _bench_json(capsys, [tiny_model, "-p", "8", "-n", "4", "-d", "24", "-r", "1", "-t", "1",
                               "-ctk", "q8_0", "-ctv", "q8_0", "--vs-llama-cpp"])
    assert sorted((o["engine"], o["test"]) for o in out) == \
        sorted((e, t) for e in (NUMALLM, LLAMA_CPP) for t in ("pp8 @ d24", "tg4 @ d24"))
    assert all(o["tokens_per_s"] > 0 for o in out)


def test_cli_table_with_repetitions(tiny_model, capsys):
    assert main(["bench", tiny_model, "-p", "8", "-n", "0", "-r", "2", "-t", "2",
                 "--bw-mib", "16"]) == 0
    lines = _cells(capsys.readouterr().out.strip())
    assert len(lines) == 3 and lines[0][0] == "model"
    assert lines[2][3:6] == ["auto:off", "2", "pp8"] and " ± " in lines[2][6]


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 allowed CPUs")
def test_cli_numa_placements_side_by_side(tiny_model, capsys):
    out = _bench_json(capsys, [tiny_model, "-p", "8", "-n", "4", "-r", "2", "-t", "2",
                               "--numa", "off,shard", "--virtual-nodes", "2"])
    by = {(o["numa"], o["test"]): o for o in out}
    assert sorted(by) == [("off", "pp8"), ("off", "tg4"), ("shard", "pp8"), ("shard", "tg4")]
    assert by[("off", "tg4")]["sync_ms_per_token"] is None
    assert by[("shard", "tg4")]["sync_ms_per_token"] > 0 and by[("shard", "pp8")]["sync_ms_per_token"] > 0
    for numa in ("off", "shard"):
        o = by[(numa, "tg4")]
        assert 0 < o["non_kernel_ms_per_token"] < 1e3 / o["tokens_per_s"] * 2


def test_cli_bad_numa_list_is_a_usage_error(tiny_model, capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", tiny_model, "--numa", "off,spread"])
    assert e.value.code == 2 and "give strategies from auto, off" in capsys.readouterr().err


@pytest.mark.parametrize("argv, msg", [
    (["-t", "0"], "thread list"),
    (["-p", "0", "-n", "0"], "nothing to measure"),
    (["-r", "0"], "repetition"),
    (["-d", "-1"], "-d -1: give a depth"),
])
def test_cli_bad_flags_are_one_line_errors(tiny_model, capsys, argv, msg):
    assert main(["bench", tiny_model, *argv]) == 1
    err = capsys.readouterr().err.strip()
    assert msg in err and len(err.splitlines()) == 1


def test_cli_missing_model_and_missing_llama_cpp(tmp_path, tiny_model, capsys, monkeypatch):
    assert main(["bench", str(tmp_path / "nope.gguf")]) == 1
    assert "no such model file" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "llama_cpp", None)   # import llama_cpp now fails
    assert main(["bench", tiny_model, "-p", "8", "-n", "0", "-r", "1", "--vs-llama-cpp"]) == 1
    err = capsys.readouterr().err.strip()
    assert "llama-cpp-python" in err and len(err.splitlines()) == 1


def test_llamacpp_problem_names_an_amx_crash_and_the_rebuild(monkeypatch):
    """An AMX build whose tiny evaluation dies in the child process gives one line with the
    signal and the rebuild command; a clean child exit gives None."""
    import subprocess

    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    monkeypatch.setattr(llamacpp, "has_amx_kernels", lambda: True)
    for rc, want in ((-11, "signal 11"), (0, None)):
        llamacpp.problem.cache_clear()
        monkeypatch.setattr(subprocess, "run",
                            lambda *a, rc=rc, **k: subprocess.CompletedProcess(a, rc, b"", b""))
        got = llamacpp.problem()
        if want is None:
            assert got is None
        else:
            assert want in got and "-DGGML_AMX_INT8=OFF" in got and "\n" not in got
    llamacpp.problem.cache_clear()
