"""Throughput measurement behind `numallm bench` (llama-bench style), importable.

Tests, per thread count:
    ppN  prefill of N random tokens into a fresh context, in forwards of PREFILL_CHUNK tokens;
    tgN  decode of N tokens one forward at a time, after an untimed TG_PROMPT-token prompt.
With a depth D (llama-bench's -d), each runner first fills D positions of its context (untimed,
once), and the tests run there, named "ppN @ dD" / "tgN @ dD": decode at a long context, where
attention reads the KV cache of all D positions per token (what the KV cache type changes).
Each test runs `reps` times; tokens/s is the mean over repetitions of N / seconds, with the
sample standard deviation. GB/s counts the weight bytes one forward streams (every matrix once)
times forwards per second, and % bw sets that against the machine's read bandwidth, measured
here with the same number of threads (numpy sums over a buffer far larger than L3).

NUMA: each --numa strategy is loaded as its own runner and they take turns like engines; per
row, `sync ms/t` is the time per token the cross-node joins cost beyond the slowest node's work
(placement.SyncStats: dispatch, wake-ups, joins, reduces), and `other ms/t` (tg only) the time
per token during which no thread runs a matrix kernel (ops.timing): Python, the small ops
(norms, RoPE, attention), dispatch and joins. sync comes from the timed repetitions; other
from one extra decode with timing on (its wrappers cost well under a microsecond per call).

The pure arithmetic (mean_sd, gbps, summarize, ratios, format_table, to_json_rows) is separate
from the runners (NumallmRunner, LlamaCppRunner) and the driver (run_benchmark) so that it can
be tested without timing anything.
"""
from __future__ import annotations

import math
import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from . import ops
from .cache_types import DEFAULT_CACHE_TYPE
from .errors import NumallmError
from .llamacpp import LlamaCppRunner

TG_PROMPT = 8           # tokens prefilled (untimed) before a tg test, like a short prompt
WARMUP_TOKENS = 8       # tokens of the untimed warm-up prefill (Numba compile, page cache)
# and of the untimed warm-up of the pp test (at most): the kernels calibration picked for the
# largest prefill size it times (128) serve every size above, so their compile (or load from
# Numba's cache) is not timed in the first repetition
WARMUP_PREFILL = 128
BW_BYTES = 1 << 30      # read-bandwidth buffer: much larger than any L3
BW_REPEATS = 8          # bandwidth passes (~50 ms each); the best is kept, the rest is noise
NUMALLM, LLAMA_CPP = "numallm", LlamaCppRunner.engine

# llama.cpp's general.file_type values (llama.h, enum llama_ftype) for the model label
_FTYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1",
           10: "Q2_K", 11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M",
           16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K", 25: "IQ4_NL", 30: "IQ4_XS", 32: "BF16"}


# -- pure arithmetic ---------------------------------------------------------------------------

def mean_sd(xs: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1); sd is 0 for a single value."""
    if not xs:
        raise ValueError("mean_sd of no values")
    m = math.fsum(xs) / len(xs)
    if len(xs) == 1:
        return m, 0.0
    return m, math.sqrt(math.fsum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def gbps(weight_bytes: int, passes_per_s: float) -> float:
    """GB/s (1e9 bytes) of weights read when every forward pass streams `weight_bytes`."""
    return weight_bytes * passes_per_s / 1e9


@dataclass(frozen=True)
class BenchRow:
    """One test at one thread count for one engine."""

    engine: str            # "numallm" | "llama.cpp"
    test: str              # "pp512", "tg128"
    threads: int
    n_tokens: int
    n_passes: int          # forward passes per repetition
    samples: tuple[float, ...]  # tokens/s of each repetition
    tokens_per_s: float    # mean of samples
    stddev: float
    gbps: float            # weight GB/s at the mean rate
    bw_fraction: float     # gbps / the machine's read GB/s at this thread count (nan: unknown)
    numa: str = ""         # numallm's placement ("off", "shard", "auto:off"...); "" for llama.cpp
    sync_ms: float | None = None     # cross-node sync per token (mean over repetitions)
    other_ms: float | None = None    # per token with no matrix kernel running (tg, one pass)


def summarize(engine: str, test: str, threads: int, n_tokens: int, n_passes: int,
              seconds: Sequence[float], weight_bytes: int, machine_gbps: float, numa: str = "",
              sync_s: Sequence[float] | None = None, other_s: float | None = None) -> BenchRow:
    """A BenchRow from the wall times of each repetition of a test of n_tokens / n_passes;
    sync_s: the sync seconds of each repetition, other_s: non-kernel seconds of one pass."""
    samples = tuple(n_tokens / s for s in seconds)
    ts, sd = mean_sd(samples)
    rate = gbps(weight_bytes, ts * n_passes / n_tokens)
    frac = rate / machine_gbps if machine_gbps > 0 else math.nan
    sync = 1e3 * mean_sd(sync_s)[0] / n_tokens if sync_s else None
    other = 1e3 * other_s / n_tokens if other_s is not None else None
    return BenchRow(engine, test, threads, n_tokens, n_passes, samples, ts, sd, rate, frac, numa,
                    sync, other)


def ratios(rows: Sequence[BenchRow]) -> dict[tuple[str, int, str], float]:
    """numallm / llama.cpp tokens/s for each (test, threads, numallm's numa) both engines ran."""
    ref = {(r.test, r.threads): r.tokens_per_s for r in rows if r.engine == LLAMA_CPP}
    return {(r.test, r.threads, r.numa): r.tokens_per_s / ref[(r.test, r.threads)]
            for r in rows if r.engine == NUMALLM and ref.get((r.test, r.threads), 0) > 0}


def human_bytes(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.2f} MiB"


def human_params(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"


@dataclass(frozen=True)
class ModelInfo:
    label: str          # e.g. "llama Q4_0"
    weight_bytes: int   # bytes of every weight matrix (the size column)
    params: int         # elements of every tensor
    active_bytes: int = 0   # what one decode step streams (MoE: the used experts' share); 0: all


def format_table(model: ModelInfo, rows: Sequence[BenchRow]) -> str:
    """The markdown table; engine and ratio columns appear only when llama.cpp rows are present."""
    compare = any(r.engine == LLAMA_CPP for r in rows)
    sync = any(r.sync_ms is not None for r in rows)
    other = any(r.other_ms is not None for r in rows)
    ratio = ratios(rows)
    head = ["model", "size", "params"] + (["engine"] if compare else []) + \
        ["numa", "threads", "test", "t/s", "GB/s", "% bw"] + (["sync ms/t"] if sync else []) + \
        (["other ms/t"] if other else []) + (["ratio"] if compare else [])
    body = []

    def ms(v: float | None) -> str:
        return "" if v is None else f"{v:.2f}"
    for r in rows:
        size = human_bytes(model.weight_bytes)
        if model.active_bytes and model.active_bytes != model.weight_bytes:
            size += f" ({human_bytes(model.active_bytes)} active)"     # MoE: what a token reads
        cells = [model.label, size, human_params(model.params)]
        cells += [r.engine] if compare else []
        bw = "?" if math.isnan(r.bw_fraction) else f"{100 * r.bw_fraction:.1f}"
        cells += [r.numa or "-", str(r.threads), r.test, f"{r.tokens_per_s:.2f} ± {r.stddev:.2f}",
                  f"{r.gbps:.2f}", bw]
        cells += [ms(r.sync_ms)] if sync else []
        cells += [ms(r.other_ms)] if other else []
        if compare:
            q = ratio.get((r.test, r.threads, r.numa)) if r.engine == NUMALLM else None
            cells.append("" if q is None else f"{q:.2f}")
        body.append(cells)
    widths = [max(len(c) for c in col) for col in zip(head, *body)]
    right = {"size", "params", "threads", "test", "t/s", "GB/s", "% bw", "sync ms/t", "other ms/t",
             "ratio"}

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.rjust(w) if h in right else c.ljust(w)
                                 for c, w, h in zip(cells, widths, head)) + " |"

    rule = "| " + " | ".join(("-" * (w - 1) + ":") if h in right else "-" * w
                             for w, h in zip(widths, head)) + " |"
    return "\n".join([line(head), rule] + [line(c) for c in body])


def to_json_rows(model: ModelInfo, rows: Sequence[BenchRow],
                 machine_gbps: dict[int, float]) -> list[dict]:
    """JSON-ready dicts, one per row (bw_fraction None when the bandwidth is unknown)."""
    ratio = ratios(rows)
    out = []
    for r in rows:
        out.append({
            "model": model.label, "size_bytes": model.weight_bytes, "params": model.params,
            "active_bytes": model.active_bytes or model.weight_bytes,
            "engine": r.engine, "test": r.test, "threads": r.threads, "n_tokens": r.n_tokens,
            "n_passes": r.n_passes, "samples": list(r.samples), "tokens_per_s": r.tokens_per_s,
            "stddev": r.stddev, "gbps": r.gbps,
            "bw_fraction": None if math.isnan(r.bw_fraction) else r.bw_fraction,
            "machine_gbps": machine_gbps.get(r.threads),
            "ratio_vs_llama_cpp": ratio.get((r.test, r.threads, r.numa)) if r.engine == NUMALLM else None,
            "numa": r.numa or None, "sync_ms_per_token": r.sync_ms,
            "non_kernel_ms_per_token": r.other_ms,
        })
    return out


def parse_threads(spec: str) -> list[int]:
    """"1,2,4" -> [1, 2, 4]; a one-line error for anything else."""
    try:
        out = [int(p) for p in spec.split(",")]
    except ValueError:
        out = []
    if not out or any(t < 1 for t in out):
        raise NumallmError(f"bad thread list -t {spec!r}; give positive counts like -t 1,2,4")
    return list(dict.fromkeys(out))


def model_label(arch: str, file_type: int | None, qtypes: Counter) -> str:
    """"llama Q4_K_M": the architecture and llama.cpp's ftype name, else the dominant weight type."""
    name = _FTYPES.get(file_type) if file_type is not None else None
    if name is None:
        name = qtypes.most_common(1)[0][0] if qtypes else "?"
    return f"{arch} {name}"


# -- machine read bandwidth ----------------------------------------------------------------------

def read_bandwidth(n_threads: int, buf: np.ndarray, repeats: int = BW_REPEATS) -> float:
    """Best GB/s of summing `buf` (1-D, contiguous) split into n_threads parts, one Python
    thread each (numpy's reductions release the GIL, so the parts run in parallel)."""
    parts = np.array_split(buf, n_threads)
    best = 0.0
    with ThreadPoolExecutor(n_threads) as ex:
        for _ in range(repeats):
            t0 = time.perf_counter()
            list(ex.map(np.sum, parts))
            best = max(best, buf.nbytes / (time.perf_counter() - t0) / 1e9)
    return best


def bandwidth_buffer(nbytes: int = BW_BYTES) -> np.ndarray:
    # int64: numpy's integer sum streams ~10% faster than its pairwise float sum, so one
    # thread is less compute-bound and the figure is closer to what the memory can give
    buf = np.empty(nbytes // 8, dtype=np.int64)   # (nbytes/8,)
    buf.fill(1)   # touch every page, so the timing sees RAM and not page faults
    return buf


# -- runners ---------------------------------------------------------------------------------------

def busy_s(spans: list[tuple[float, float]]) -> float:
    """Length of the union of (start, end) spans: the time during which at least one thread ran
    a kernel (ops.timing records them)."""
    total, end = 0.0, -math.inf
    for a, b in sorted(spans):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


class NumallmRunner:
    """Times numallm's raw forward: the model loaded with n_threads, run on its own pool
    (`llm.pool`, which the placement built) as the engine runs it. `numa` labels the placement
    (the strategy `auto` chose, after it); `last_sync_s` is the sync time of the last call."""

    engine = NUMALLM

    def __init__(self, path: str, n_threads: int, n_ctx: int, numa: str = "off", **load_options):
        from .engine import load

        self.llm = load(path, n_ctx=n_ctx, n_threads=n_threads, numa=numa, **load_options)
        got = self.llm.placement.strategy
        self.numa = got if got == numa else f"{numa}:{got}"
        self.last_sync_s: float | None = None

    def info(self) -> tuple[ModelInfo, int]:
        """What the table says about the model, and its vocab size."""
        f, qtypes = self.llm.file, Counter()
        for m in self.llm.model.linears() + self.llm.model.experts():
            qtypes[m.qtype.name] += m.nbytes
        label = model_label(f.architecture, f.get("general.file_type"), qtypes)
        params = int(sum(t.n_elements for t in f.tensors.values()))
        return (ModelInfo(label, self.llm.weight_bytes, params, self.llm.active_bytes),
                self.llm.args.n_vocab)

    def _forward(self, tokens: np.ndarray, pos0: int) -> int:
        from .engine import PREFILL_CHUNK

        passes = 0
        for a in range(0, len(tokens), PREFILL_CHUNK):
            self.llm.model(tokens[a:a + PREFILL_CHUNK], self.llm.cache, pos0 + a, last_only=True)
            passes += 1
        return passes

    def _sync_s(self) -> float | None:
        st = self.llm.placement.sync_stats()
        return None if st is None else st.sync_s

    def prefill(self, tokens: np.ndarray, pos0: int = 0) -> tuple[float, int]:
        """Seconds and forward passes to prefill `tokens` from position pos0 (0: a fresh context;
        else after `prime`)."""
        from .threads import activate

        with activate(self.llm.pool):
            s0 = self._sync_s()
            t0 = time.perf_counter()
            passes = self._forward(tokens, pos0)
            dt = time.perf_counter() - t0
        self.last_sync_s = None if s0 is None else self._sync_s() - s0
        return dt, passes

    def decode(self, prompt: np.ndarray, tokens: np.ndarray) -> float:
        """Seconds to decode `tokens` one at a time after an untimed prefill of `prompt`."""
        self.prime(prompt)
        return self.decode_at(len(prompt), tokens)

    def prime(self, tokens: np.ndarray) -> None:
        """Fill positions 0..len(tokens)-1 of the context (untimed; the depth of later tests)."""
        from .threads import activate

        with activate(self.llm.pool):
            self._forward(tokens, 0)

    def decode_at(self, pos0: int, tokens: np.ndarray) -> float:
        """Seconds to decode `tokens` one at a time from position pos0 (after `prime`)."""
        from .threads import activate

        with activate(self.llm.pool):
            s0 = self._sync_s()
            dt = self._decode(pos0, tokens)
        self.last_sync_s = None if s0 is None else self._sync_s() - s0
        return dt

    def _decode(self, pos0: int, tokens: np.ndarray) -> float:
        t0 = time.perf_counter()
        for i in range(len(tokens)):
            self.llm.model(tokens[i:i + 1], self.llm.cache, pos0 + i, last_only=True)
        return time.perf_counter() - t0

    def non_kernel_s(self, prompt: np.ndarray | None, tokens: np.ndarray, pos0: int = 0) -> float:
        """Seconds of one more decode (as `decode`; prompt None: as `decode_at(pos0)`) during
        which no thread ran a matrix kernel."""
        from .threads import activate

        with activate(self.llm.pool):
            if prompt is not None:
                self._forward(prompt, 0)
                pos0 = len(prompt)
            with ops.timing([]) as spans:
                wall = self._decode(pos0, tokens)
        return wall - busy_s(spans)

    def close(self) -> None:
        self.llm.close()


# -- driver ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BenchPlan:
    n_prompt: int          # pp test size (0: no pp test)
    n_gen: int             # tg test size (0: no tg test)
    threads: tuple[int, ...]
    reps: int
    seed: int = 0
    depth: int = 0         # positions filled before the tests (llama-bench's -d; 0: none)

    @property
    def n_ctx(self) -> int:
        if self.depth:
            return max(self.depth + self.n_prompt, self.depth + self.n_gen, WARMUP_TOKENS + 2)
        return max(self.n_prompt, TG_PROMPT + self.n_gen, WARMUP_TOKENS + 1)

    def name(self, test: str) -> str:
        """"tg128", or "tg128 @ d4096" at a depth (llama-bench's names)."""
        return f"{test} @ d{self.depth}" if self.depth else test


def plan_tokens(plan: BenchPlan, n_vocab: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random ids below n_vocab (fixed seed), the same for every engine:
    pp (n_prompt,), tg prompt (TG_PROMPT, or the depth's tokens), tg tokens (n_gen,), all int64."""
    rng = np.random.default_rng(plan.seed)
    return (rng.integers(0, n_vocab, plan.n_prompt, dtype=np.int64),
            rng.integers(0, n_vocab, plan.depth or TG_PROMPT, dtype=np.int64),
            rng.integers(0, n_vocab, plan.n_gen, dtype=np.int64))


def run_tests(runners: Sequence, plan: BenchPlan, n_threads: int, n_vocab: int,
              weight_bytes: int, machine_gbps: float, log: Callable[[str], None],
              tg_bytes: int | None = None) -> list[BenchRow]:
    """Warm up each runner, then time pp and tg `plan.reps` times each. The engines take turns
    repetition by repetition, so a load change on a shared machine hits both alike. GB/s:
    weight_bytes per prefill pass (a chunk of tokens routes to nearly every expert), tg_bytes
    (default weight_bytes) per decoded token (MoE: the used experts' share)."""
    pp, prompt, gen = plan_tokens(plan, n_vocab)
    for r in runners:
        r.decode(prompt[:WARMUP_TOKENS], gen[:2])   # untimed: compile, page cache, pool start
        if plan.n_prompt:
            r.prefill(pp[:WARMUP_PREFILL])          # untimed: the prefill sizes' kernels
    d = plan.depth
    if d:                                           # the depth, filled once per runner
        for r in runners:
            r.prime(prompt)
        prefill, decode = (lambda r: r.prefill(pp, d)), (lambda r: r.decode_at(d, gen))
        non_kernel = lambda r: r.non_kernel_s(None, gen, d)     # noqa: E731
    else:
        prefill, decode = (lambda r: r.prefill(pp)), (lambda r: r.decode(prompt, gen))
        non_kernel = lambda r: r.non_kernel_s(prompt, gen)      # noqa: E731
    rows = []

    def timed(call, r):
        """(result of call(r), r's sync seconds in it) for one runner and repetition."""
        out = call(r)
        return out, r.last_sync_s

    def syncs(runs, i):
        got = [rep[i][1] for rep in runs]
        return None if None in got else got
    if plan.n_prompt:
        runs = [[timed(prefill, r) for r in runners] for _ in range(plan.reps)]
        rows += [summarize(r.engine, plan.name(f"pp{plan.n_prompt}"), n_threads, plan.n_prompt,
                           runs[0][i][0][1], [rep[i][0][0] for rep in runs], weight_bytes,
                           machine_gbps, r.numa, syncs(runs, i))
                 for i, r in enumerate(runners)]
    if plan.n_gen:
        runs = [[timed(decode, r) for r in runners] for _ in range(plan.reps)]
        other = [non_kernel(r) for r in runners]
        rows += [summarize(r.engine, plan.name(f"tg{plan.n_gen}"), n_threads, plan.n_gen, plan.n_gen,
                           [rep[i][0] for rep in runs], tg_bytes or weight_bytes, machine_gbps,
                           r.numa, syncs(runs, i), other[i])
                 for i, r in enumerate(runners)]
    for r in rows:
        extra = "".join(f", {k} {v:.2f} ms/token" for k, v in
                        (("sync", r.sync_ms), ("non-kernel", r.other_ms)) if v is not None)
        log(f"{r.engine}{f' numa={r.numa}' if r.numa else ''} threads={r.threads} {r.test}: "
            f"{r.tokens_per_s:.2f} ± {r.stddev:.2f} t/s{extra}")
    return rows


@dataclass(frozen=True)
class BenchReport:
    model: ModelInfo
    rows: tuple[BenchRow, ...]
    machine_gbps: dict[int, float]   # threads -> read GB/s


def run_benchmark(path: str, plan: BenchPlan, vs_llama_cpp: bool = False,
                  bw_bytes: int = BW_BYTES, log: Callable[[str], None] = lambda s: None,
                  numa: Sequence[str] = ("off",), **load_options) -> BenchReport:
    """Measure the machine's read bandwidth, then numallm (and llama.cpp) on the GGUF at `path`.
    numa: one numallm runner per placement strategy; load_options go to numallm.load for each
    (nodes, threads_per_node, virtual_nodes)."""
    if vs_llama_cpp:
        try:
            import llama_cpp  # noqa: F401 - checked before the long numallm part
        except ImportError:
            raise NumallmError("--vs-llama-cpp needs llama-cpp-python, which is not importable "
                               "here; pip install llama-cpp-python, or drop the flag") from None
    load_avg = os.getloadavg()[0]
    buf = bandwidth_buffer(bw_bytes)
    machine = {t: read_bandwidth(t, buf) for t in plan.threads}
    del buf
    for t, g in machine.items():
        log(f"read bandwidth, {t} thread{'s' if t > 1 else ''}: {g:.2f} GB/s")
    rows: list[BenchRow] = []
    for t in plan.threads:
        # numallm's weights are views of the file's mmap (placement may copy them), and
        # llama.cpp maps the same file: both engines share the page cache
        runners = []
        try:
            for strategy in numa:
                runners.append(NumallmRunner(path, t, plan.n_ctx, strategy, **load_options))
            if vs_llama_cpp:
                runners.append(LlamaCppRunner(path, t, plan.n_ctx, (
                    load_options.get("cache_type_k", DEFAULT_CACHE_TYPE),
                    load_options.get("cache_type_v", DEFAULT_CACHE_TYPE))))
            info, n_vocab = runners[0].info()
            rows += run_tests(runners, plan, t, n_vocab, info.weight_bytes, machine[t], log,
                              info.active_bytes or None)
        finally:
            for r in runners:
                r.close()
    log(f"load average (1 min) before: {load_avg:.2f}, after: {os.getloadavg()[0]:.2f} "
        f"on {os.cpu_count()} CPUs (other work skews the figures)")
    return BenchReport(info, tuple(rows), machine)
