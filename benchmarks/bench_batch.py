"""Aggregate decode tokens/s with 1, 2, 4 ... sequences decoding together (LoadedModel.decode,
the step `numallm serve`'s scheduler runs), on one model file.

Run:  python benchmarks/bench_batch.py MODEL.gguf [--streams 1 2 4] [--tokens 32] [--threads N]
      [--repeat 3] [--server]   (also through `numallm serve --parallel N` with N concurrent openai clients)

Each count: that many sessions prefill a short prompt each, then `--tokens` batched decode steps
(greedy, end-of-text ignored) are timed; tokens/s = streams x steps / seconds. Through the
server: N concurrent non-streaming requests of `--tokens` tokens; tokens/s = their completion
tokens / the wall time from sending the first to the last answer (prefill of the short prompts
and HTTP included). Not asserted:
timings on a shared machine are noisy (run it alone, e.g. under flock).
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import os
import socket
import statistics
import subprocess
import sys
import time

import numallm

PROMPTS = ["Once upon a time", "The quick brown fox", "In a galaxy far away", "Hello world",
           "The meaning of life", "A long time ago", "My favourite food", "Rain in Spain"]


def library(loaded, streams: int, tokens: int) -> float:
    gens = []
    for i in range(streams):
        g = loaded.session().start(PROMPTS[i % len(PROMPTS)], tokens + 1, temperature=0,
                                   stop_tokens=[])
        while not g.prefill():
            pass
        g.emit()
        gens.append(g)
    loaded.decode(gens)                               # warm: the first batched step of this size
    for g in gens:
        g.emit()
    t0 = time.perf_counter()
    for _ in range(tokens - 1):
        loaded.decode(gens)
        for g in gens:
            g.emit()
    return streams * (tokens - 1) / (time.perf_counter() - t0)


def long_prompts(loaded, n: int, tokens: int) -> list[str]:
    """n prompts whose greedy answers run `tokens` tokens without an end-of-text: the server
    cannot be told to ignore it, and a stream that stops early would not be measured."""
    out = [p for p in PROMPTS
           if loaded.session().generate(p, tokens, temperature=0).finish_reason == "length"]
    if not out:
        raise SystemExit(f"every prompt ends before {tokens} tokens on this model; try --tokens 8")
    return [out[i % len(out)] for i in range(n)]


def server(path: str, prompts: list[str], tokens: int, threads: int | None,
           repeat: int) -> list[float]:
    import openai

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    streams = len(prompts)
    cmd = [sys.executable, "-m", "numallm", "serve", path, "--port", str(port), "-c", "256",
           "--parallel", str(streams), "--numa", "off"] + (["-t", str(threads)] if threads else [])
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0,
                          timeout=600)
        for _ in range(600):
            try:
                c.models.list()
                break
            except openai.APIConnectionError:
                time.sleep(0.5)
        c.completions.create(model="x", prompt="warm", max_tokens=2, temperature=0)

        # non-streaming: the HTTP layer sends a chunk only for new text, and a synthetic
        # model's tokens may decode to none; usage counts every token
        def one(i):
            r = c.completions.create(model="x", prompt=prompts[i], max_tokens=tokens, temperature=0)
            return r.usage.completion_tokens

        rates = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            with cf.ThreadPoolExecutor(streams) as ex:
                n = sum(ex.map(one, range(streams)))
            rates.append(n / (time.perf_counter() - t0))
        return rates
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--server", action="store_true")
    ap.add_argument("--no-library", action="store_true")
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    print(f"{a.model}: cpus {os.cpu_count()}, load {os.getloadavg()[0]:.2f}")
    loaded = numallm.LoadedModel(a.model, n_ctx=256, n_threads=a.threads, numa="off",
                                 n_seq=max(a.streams))
    # rounds interleave the stream counts, so a burst of other load hits them alike; each
    # count's best and median round are printed
    rates: dict[int, list[float]] = {n: [] for n in a.streams}
    for _ in range(0 if a.no_library else a.repeat):
        for n in a.streams:
            rates[n].append(library(loaded, n, a.tokens))
    if not a.no_library:
        report("library", rates)
    prompts = long_prompts(loaded, max(a.streams), a.tokens) if a.server else []
    loaded.close()
    if a.server:
        report("server", {n: server(a.model, prompts[:n], a.tokens, a.threads, a.repeat)
                          for n in a.streams})
    print(f"load after: {os.getloadavg()[0]:.2f}")


def report(label: str, rates: dict[int, list[float]]) -> None:
    one = max(rates[min(rates)])
    for n, r in rates.items():
        print(f"{label:8} {n} streams: best {max(r):7.2f} tok/s ({max(r) / one:.2f}x one stream), "
              f"median {statistics.median(r):7.2f}, rounds {' '.join(f'{x:.1f}' for x in r)}",
              flush=True)


if __name__ == "__main__":
    main()
