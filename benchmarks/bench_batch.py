"""Aggregate decode tokens/s with 1, 2, 4, 8 sequences decoding together, on one model file: in
the library (LoadedModel.decode, the step `numallm serve`'s scheduler runs), through
`numallm serve --parallel N`, and through llama.cpp's `llama-server --parallel N` on the same
file with the same threads, each answering N concurrent OpenAI clients (or, where no
llama-server was built, llama-cpp-python's server, which answers one request at a time:
`pip install -e '.[bench]'`).

Run:  python benchmarks/bench_batch.py MODEL.gguf [--streams 1 2 4 8] [--tokens 32] [--threads N]
      [--repeat 3] [--server] [--llama-server PATH] [--llama-cpp-python] [--no-library]
      [--slots N] [--markdown FILE]

Library: that many sessions prefill a short prompt each and sample their first token, then
`--tokens` - 1 batched decode steps (greedy, end-of-text ignored): "library" is the decode rate
(streams x steps / their seconds), "library e2e" every token over the time from the first
prefill on (the servers' definition, less HTTP). Rounds interleave the stream counts, so a burst
of other load hits them alike. With --threads 1 --cpu-time the
seconds are the calling thread's CPU time (it does all the work with one thread), which other
processes on a busy machine inflate far less than wall time.

Servers: N concurrent non-streaming completions of `--tokens` tokens; tokens/s = their
completion tokens (usage) / the wall time from sending the first to the last answer (the
prefill of the short prompts and HTTP included). Time to first token under load: N concurrent
completions of one token each, sent at once (every prompt's prefill queued together); the
median and the slowest answer's latency. llama-server is asked to ignore end-of-text (its
greedy text may reach it sooner); numallm's prompts are chosen so its greedy answers run the
whole length. Not asserted: timings on a shared machine are noisy (run it alone, under flock).
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import os
import platform
import socket
import statistics
import subprocess
import sys
import time

import numallm

PROMPTS = ["Once upon a time", "The quick brown fox", "In a galaxy far away", "Hello world",
           "The meaning of life", "A long time ago", "My favourite food", "Rain in Spain"]


def library(loaded, streams: int, tokens: int, clock=time.perf_counter) -> tuple[float, float]:
    """(decode tok/s, end-to-end tok/s) of `streams` sequences of `tokens` tokens each: decode
    counts the batched steps after every first token; end to end counts every token from the
    first prefill on, as the servers' rates do (less HTTP)."""
    t0 = clock()
    gens = []
    for i in range(streams):
        g = loaded.session().start(PROMPTS[i % len(PROMPTS)], tokens, temperature=0,
                                   stop_tokens=[])
        while not g.prefill():
            pass
        g.emit()
        gens.append(g)
    t1 = clock()
    for _ in range(tokens - 1):
        loaded.decode(gens)
        for g in gens:
            g.emit()
    t2 = clock()
    return streams * (tokens - 1) / (t2 - t1), streams * tokens / (t2 - t0)


def long_prompts(loaded, n: int, tokens: int) -> list[str]:
    """n prompts whose greedy answers run `tokens` tokens without an end-of-text: numallm's
    server cannot be told to ignore it, and a stream that stops early would not be measured."""
    out = [p for p in PROMPTS
           if loaded.session().generate(p, tokens, temperature=0).finish_reason == "length"]
    if not out:
        raise SystemExit(f"every prompt ends before {tokens} tokens on this model; try --tokens 8")
    return [out[i % len(out)] for i in range(n)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def started(cmd: list[str], port: int):
    """Run a server command; yield an openai client once it answers /v1/models."""
    import openai

    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0,
                          timeout=900)
        for _ in range(1200):
            if proc.poll() is not None:
                raise SystemExit(f"server exited with {proc.returncode}: {' '.join(cmd)}")
            try:
                c.models.list()
                break
            except openai.APIError:       # not listening yet, or 503 while loading
                time.sleep(0.5)
        yield c
    finally:
        proc.terminate()
        proc.wait(30)


def numallm_server(path: str, n: int, threads: int | None):
    port = _free_port()
    cmd = [sys.executable, "-m", "numallm", "serve", path, "--port", str(port), "-c", "256",
           "--parallel", str(n), "--numa", "off"] + (["-t", str(threads)] if threads else [])
    return started(cmd, port)


def llama_server(binary: str, path: str, n: int, threads: int | None):
    port = _free_port()
    cmd = [binary, "-m", path, "--port", str(port), "-c", str(256 * n), "--parallel", str(n),
           "--cont-batching", "-t", str(threads or os.cpu_count())]
    return started(cmd, port)


def llama_cpp_python_server(path: str, n: int, threads: int | None):
    port = _free_port()
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", path, "--port", str(port),
           "--n_ctx", "256", "--n_threads", str(threads or os.cpu_count()), "--verbose", "False"]
    return started(cmd, port)


def measure(c, prompts: list[str], tokens: int, repeat: int, extra: dict) -> tuple[list, list]:
    """(tok/s of each round, latencies of the one-token requests) for len(prompts) clients."""
    n = len(prompts)
    c.completions.create(model="x", prompt="warm", max_tokens=2, temperature=0, extra_body=extra)

    # non-streaming: numallm's HTTP layer sends a chunk only for new text, and a synthetic
    # model's tokens may decode to none; usage counts every token
    def one(i, max_tokens=tokens):
        t0 = time.perf_counter()
        r = c.completions.create(model="x", prompt=prompts[i], max_tokens=max_tokens,
                                 temperature=0, extra_body=extra)
        return r.usage.completion_tokens, time.perf_counter() - t0

    rates, ttft = [], []
    with cf.ThreadPoolExecutor(n) as ex:
        for _ in range(repeat):
            t0 = time.perf_counter()
            done = sum(k for k, _ in ex.map(one, range(n)))
            rates.append(done / (time.perf_counter() - t0))
        for _ in range(repeat):
            ttft += [s for _, s in ex.map(lambda i: one(i, 1), range(n))]
    return rates, ttft


def report(label: str, rates: dict[int, list[float]], ttft: dict | None = None) -> list[str]:
    one = max(rates[min(rates)])
    rows = []
    for n, r in rates.items():
        lat = ""
        if ttft:
            lat = f", first token median {statistics.median(ttft[n]) * 1e3:.0f} ms max " \
                  f"{max(ttft[n]) * 1e3:.0f} ms"
        print(f"{label:12} {n} streams: best {max(r):7.2f} tok/s ({max(r) / one:.2f}x one stream), "
              f"median {statistics.median(r):7.2f}, rounds {' '.join(f'{x:.1f}' for x in r)}{lat}",
              flush=True)
        rows.append(f"| {label} | {n} | {max(r):.2f} | {statistics.median(r):.2f} | "
                    f"{max(r) / one:.2f}x | " + (f"{statistics.median(ttft[n]) * 1e3:.0f} / "
                                                 f"{max(ttft[n]) * 1e3:.0f}" if ttft else "") + " |")
    return rows


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--server", action="store_true", help="also through numallm serve")
    ap.add_argument("--llama-server", default=None, help="llama-server binary to compare with")
    ap.add_argument("--llama-cpp-python", action="store_true",
                    help="compare with llama-cpp-python's server (one request at a time)")
    ap.add_argument("--no-library", action="store_true")
    ap.add_argument("--cpu-time", action="store_true",
                    help="library tok/s per second of the calling thread's CPU time (needs "
                         "--threads 1, where it does all the work): robust to other load")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--slots", type=int, default=None,
                    help="start each server once with this many slots (--parallel) and measure "
                         "every stream count on it, rather than one server per count (a large "
                         "model's load time)")
    ap.add_argument("--markdown", default=None, help="append the table to this file")
    a = ap.parse_args()
    if a.slots is not None and a.slots < max(a.streams):
        ap.error(f"--slots {a.slots} is fewer than the {max(a.streams)} streams measured")
    if a.cpu_time and a.threads != 1:
        ap.error("--cpu-time measures the calling thread only: use it with --threads 1")
    clock = time.thread_time if a.cpu_time else time.perf_counter
    head = (f"{os.path.basename(a.model)}: {cpu_name()}, "
            f"cpus {os.cpu_count()}, threads {a.threads or 'default'}, {a.tokens} tokens per "
            f"stream{', library in thread CPU time' if a.cpu_time else ''}, "
            f"server slots {a.slots or 'as streams'}, "
            f"load {os.getloadavg()[0]:.2f}")
    print(head, flush=True)
    rows = []
    loaded = numallm.LoadedModel(a.model, n_ctx=256, n_threads=a.threads, numa="off",
                                 n_seq=max(a.streams))
    rates: dict[int, list[float]] = {n: [] for n in a.streams}
    e2e: dict[int, list[float]] = {n: [] for n in a.streams}
    for n in [] if a.no_library else a.streams:
        library(loaded, n, 3, clock)                  # warm: the first batched steps of this size
    for _ in range(0 if a.no_library else a.repeat):
        for n in a.streams:
            dec, whole = library(loaded, n, a.tokens, clock)
            rates[n].append(dec)
            e2e[n].append(whole)
    if not a.no_library:
        rows += report("library", rates) + report("library e2e", e2e)
    prompts = long_prompts(loaded, max(a.streams), a.tokens) \
        if a.server or a.llama_server or a.llama_cpp_python else []
    loaded.close()
    servers = ([("numallm serve", lambda n: numallm_server(a.model, n, a.threads), {})] if a.server
               else []) + ([("llama-server", lambda n: llama_server(a.llama_server, a.model, n,
                                                                     a.threads),
                             {"ignore_eos": True})] if a.llama_server else []) \
        + ([("llama-cpp-python", lambda n: llama_cpp_python_server(a.model, n, a.threads), {})]
           if a.llama_cpp_python else [])
    for label, start, extra in servers:
        got, lat = {}, {}
        if a.slots:                       # one server with that many slots for every concurrency
            with start(a.slots) as c:
                for n in a.streams:
                    got[n], lat[n] = measure(c, prompts[:n], a.tokens, a.repeat, extra)
        else:
            for n in a.streams:
                with start(n) as c:
                    got[n], lat[n] = measure(c, prompts[:n], a.tokens, a.repeat, extra)
        rows += report(label, got, lat)
    tail = f"load after: {os.getloadavg()[0]:.2f}"
    print(tail)
    if a.markdown:
        with open(a.markdown, "a") as f:
            f.write(f"\n{head}; {tail}\n\n| engine | streams | best tok/s | median tok/s | "
                    f"best vs one stream | first token ms (median / max) |\n"
                    f"|---|--:|--:|--:|--:|--:|\n" + "\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
