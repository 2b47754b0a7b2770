"""`numallm bench MODEL`: prefill / decode tokens per second, llama-bench style.

    numallm bench model.gguf -p 512 -n 128 -t 1,2 -r 3 [--json] [--vs-llama-cpp]
    numallm bench model.gguf --numa off,shard --virtual-nodes 2     # placements side by side

The measuring lives in numallm.bench; this module parses flags and prints.
"""
from __future__ import annotations

import argparse
import json
import sys

from ..errors import NumallmError
from .common import (STRATEGIES, add_numa_args, announce_first_run, cache_options, gpu_options,
                     plan_request)


def _strategies(text: str) -> list[str]:
    out = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in out if s not in STRATEGIES]
    if bad or not out:
        raise argparse.ArgumentTypeError(f"{text!r}: give strategies from {', '.join(STRATEGIES)}, "
                                         f"comma separated")
    return list(dict.fromkeys(out))


def register(sub) -> None:
    p = sub.add_parser("bench", help="measure prefill and decode speed (llama-bench style)",
                       description="Prefill (ppN) and decode (tgN) tokens/s with random tokens, "
                       "per thread count, with weight GB/s and the share of this machine's "
                       "measured read bandwidth.")
    p.add_argument("model", help="GGUF path or Hugging Face repo[:file]")
    p.add_argument("-p", "--n-prompt", type=int, default=512, metavar="N",
                   help="prefill test size in tokens, 0 = skip (default 512)")
    p.add_argument("-n", "--n-gen", type=int, default=128, metavar="N",
                   help="decode test size in tokens, 0 = skip (default 128)")
    p.add_argument("-d", "--n-depth", type=int, default=0, metavar="N",
                   help="fill N context positions first (once, untimed) and run the tests there, "
                   "as llama-bench's -d: decode speed at a long context (default 0)")
    p.add_argument("-t", "--threads", default=None, metavar="N[,N...]",
                   help="thread counts to test, comma separated (default: physical cores)")
    p.add_argument("-r", "--repetitions", type=int, default=5, metavar="N",
                   help="repetitions of each test (default 5)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random token ids (default 0)")
    p.add_argument("--bw-mib", type=int, default=1024, metavar="MIB",
                   help="buffer for the read-bandwidth measurement (default 1024; keep it far "
                   "above the L3 size)")
    p.add_argument("--json", action="store_true", help="print a JSON list of results")
    p.add_argument("--vs-llama-cpp", action="store_true",
                   help="also run llama.cpp (llama-cpp-python) on the same file and threads, "
                   "with a numallm / llama.cpp ratio column")
    add_numa_args(p, "placement(s) to measure, comma separated (e.g. off,shard), taking turns "
                  "repetition by repetition; adds sync and non-kernel ms per token (default auto)",
                  numa_type=_strategies)
    p.set_defaults(func=run)


def run(args) -> int:
    from .. import bench
    from ..hub import resolve_model
    from ..threads import physical_cores

    if args.n_prompt < 0 or args.n_gen < 0 or args.n_prompt + args.n_gen == 0:
        raise NumallmError(f"nothing to measure with -p {args.n_prompt} -n {args.n_gen}; "
                           f"give a positive prefill (-p) or decode (-n) size")
    if args.n_depth < 0:
        raise NumallmError(f"-d {args.n_depth}: give a depth of 0 or more tokens")
    if args.repetitions < 1:
        raise NumallmError(f"-r {args.repetitions}: give at least 1 repetition")
    if args.bw_mib < 1:
        raise NumallmError(f"--bw-mib {args.bw_mib}: give a buffer size of at least 1 MiB")
    gpu = gpu_options(args)   # bad GPU flags fail, and a missing GPU is said, before measuring
    threads = bench.parse_threads(args.threads) if args.threads else [physical_cores()]
    plan = bench.BenchPlan(args.n_prompt, args.n_gen, tuple(threads), args.repetitions, args.seed,
                           args.n_depth)
    path = resolve_model(args.model)
    from ..engine import plan_model

    for strategy in args.numa or ["auto"]:       # refuse what cannot fit before measuring anything
        req = plan_request(args, strategy, plan.n_ctx, max(threads), gpu.get("offload"))
        full = plan_model(path, req, args.virtual_nodes)[2]
        full.check_fits()
    if full.gpu is not None and full.gpu.no_gpu:  # said before measuring, as run/chat say it
        print(f"numallm: no GPU ({full.gpu.no_gpu}): running every layer on the CPU", file=sys.stderr)
    announce_first_run(args)
    report = bench.run_benchmark(path, plan, vs_llama_cpp=args.vs_llama_cpp,
                                 bw_bytes=args.bw_mib << 20,
                                 log=lambda s: print(f"numallm bench: {s}", file=sys.stderr,
                                                     flush=True),
                                 numa=args.numa or ["auto"], nodes=args.nodes,
                                 threads_per_node=args.threads_per_node,
                                 virtual_nodes=args.virtual_nodes, moe_split=args.moe_split, **gpu,
                                 **cache_options(args))
    if args.json:
        print(json.dumps(bench.to_json_rows(report.model, report.rows, report.machine_gbps),
                         indent=1))
    else:
        print(bench.format_table(report.model, report.rows))
    return 0
