"""`numallm topo [MODEL]`: what this machine looks like to numallm, and how a model would fit.

Must stay fast (well under a second without --bench or --verify): no Numba import on this path.
--verify loads MODEL with the placement flags of run/chat and reads back where its pages are
(numallm.placement_check).
"""
from __future__ import annotations

import argparse
import json
import re

from ..errors import NumallmError
from .common import STRATEGIES, _node_list, add_cache_args


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "topo", help="show sockets, NUMA nodes, cores, memory, GPUs and what to run where",
        description="Show this machine's topology (sockets, NUMA nodes, cores, SMT, memory, GPUs), "
                    "warnings and a thread/node recommendation; with MODEL, how it would be placed "
                    "and its decode-speed ceiling.")
    p.add_argument("model", nargs="?", metavar="MODEL", help="a .gguf model to plan for")
    p.add_argument("--json", action="store_true", help="print the same as JSON (schema: docs/topo.md)")
    p.add_argument("--bench", action="store_true",
                   help="measure read bandwidth per node and node to node (about 1-2 s)")
    p.add_argument("--sysfs-root", metavar="DIR",
                   help="read DIR/sys and DIR/proc instead of /sys and /proc "
                        "(default: $NUMALLM_SYSFS_ROOT or /)")
    p.add_argument("--topology", metavar="FILE", help="load the topology from a `topo --json` file")
    p.add_argument("--virtual-nodes", type=int, metavar="N",
                   help="split the allowed CPUs into N virtual nodes (whole cores) for testing")
    p.add_argument("-c", "--context", "--ctx-size", type=int, default=None, metavar="TOKENS",
                   help="context length for the KV cache in the MODEL plan (default: the model's, "
                        "at most 4096, as run/chat/info/plan)")
    p.add_argument("--bandwidth", type=float, metavar="GBPS",
                   help="per-node read bandwidth to assume for the MODEL plan instead of a guess")
    add_cache_args(p)
    p.add_argument("-v", "--verbose", action="store_true",
                   help="list every core by L3 group (with --verify: every slice)")
    g = p.add_argument_group("--verify: load MODEL as run/chat would and check where its pages are")
    g.add_argument("--verify", action="store_true",
                   help="load MODEL with --numa, run one token, and report per node and slice the "
                        "share of pages on the intended node (move_pages); exit status 1 when a "
                        "slice is below --min-local")
    g.add_argument("--numa", choices=STRATEGIES, default=None,
                   help="placement to verify, as for run/chat (default auto)")
    g.add_argument("--nodes", type=_node_list, default=None, metavar="0,1",
                   help="nodes to use with --numa (default: all with CPUs)")
    g.add_argument("--threads-per-node", type=int, default=None, metavar="N",
                   help="worker threads per node (default: its physical cores)")
    g.add_argument("--min-local", type=float, default=100.0, metavar="PCT",
                   help="warn about any slice with less than PCT%% of its pages local (default 100)")
    p.set_defaults(func=run)


def load(args: argparse.Namespace):
    """The topology the flags describe (shared with other verbs that take the same flags)."""
    from ..topology import discover, load_topology_file, sysfs_root_from_env, virtual_nodes

    if args.topology and args.sysfs_root:
        raise NumallmError("--topology and --sysfs-root both describe the machine; give one of them")
    if args.topology:
        topo = load_topology_file(args.topology)
    else:
        topo = discover(sysfs_root_from_env(args.sysfs_root))
    if args.virtual_nodes is not None:
        topo = virtual_nodes(topo, args.virtual_nodes)
    return topo


def dumps(data) -> str:
    """JSON with 1-space indents, but lists of numbers (CPU lists) kept on one line."""
    text = json.dumps(data, indent=1)
    return re.sub(r"\[\s*([-\d.,\s]*?)\s*\]",
                  lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",") if x.strip()) + "]",
                  text)


def run(args: argparse.Namespace) -> int:
    from ..topology import advise, assumed_bandwidth, render, run_bench

    if args.context is not None and args.context < 1:
        raise NumallmError(f"--context {args.context}: give a positive number of tokens")
    if args.bandwidth is not None and args.bandwidth <= 0:
        raise NumallmError(f"--bandwidth {args.bandwidth}: give a positive number of GB/s")
    if args.verify:
        _check_verify_args(args)
    elif args.numa or args.nodes is not None or args.threads_per_node is not None:
        raise NumallmError("--numa/--nodes/--threads-per-node choose what --verify loads; add --verify")
    topo = load(args)
    advice = advise(topo)
    out = topo.to_dict()
    out["findings"] = list(advice.findings)
    out["warnings"] = list(advice.warnings)
    out["recommendation"] = advice.recommendation()
    lines = render.render_topology(topo, advice, args.verbose)

    bench = None
    if args.bench:
        if topo.source != "sysfs:/":
            raise NumallmError(f"--bench measures this machine, but the topology comes from "
                               f"{topo.source}; drop --sysfs-root/--topology to bench")
        bench = run_bench(topo, list(advice.nodes))
        out["bench"] = bench.to_dict()
        lines += [""] + render.render_bench(bench)

    if args.model:
        from ..gguf_file import GGUFFile
        from ..placement import ModelSpec, default_ctx
        from ..placement.compare import compare, render as render_options

        spec = ModelSpec.from_gguf(GGUFFile(args.model))
        n_ctx = args.context or default_ctx(spec.args.context_length)
        nodes = [topo.node(n) for n in advice.nodes]
        if bench is not None:
            bw, src, how = bench.local(), "measured", "measured"
        elif args.bandwidth is not None:
            bw, src, how = {n.id: args.bandwidth for n in nodes}, "given", "given (--bandwidth)"
        else:
            bw = {n.id: assumed_bandwidth(n) for n in nodes}
            stated = all(n.mem_bandwidth_gbps for n in nodes)
            src = "stated" if stated else "assumed"
            how = ("stated by the topology file" if stated
                   else "assumed (run with --bench to measure)")
        types = (args.cache_type_k, args.cache_type_v)
        options = compare(spec, topo, n_ctx, list(advice.nodes), bw, types)
        a = spec.args
        out["model"] = {"path": args.model, "arch": a.arch, "weight_bytes": spec.weight_bytes,
                        "n_layer": a.n_layer, "n_head_kv": a.n_head_kv,
                        "kv_bytes_per_token": a.kv_bytes_per_token(*types),
                        "kv_bytes_per_1k_tokens": a.kv_bytes(1024, *types),
                        "kv_bytes": a.kv_bytes(n_ctx, *types), "cache_type_k": types[0],
                        "cache_type_v": types[1], "context": n_ctx, "bandwidth": src,
                        "placements": [p.to_dict() for p in options]}
        lines += [""] + render_options(args.model, spec, n_ctx, options, how, types)

    status = 0
    if args.verify:
        summary, c = verify(args)
        out["verify"] = {"model": args.model, "summary": summary, **c.to_dict()}
        lines += ["", f"placement of {args.model}:", summary, *c.lines(args.verbose)]
        status = 0 if c.ok or c.strategy == "off" else 1
    print(dumps(out) if args.json else "\n".join(lines))
    return status


def _check_verify_args(args: argparse.Namespace) -> None:
    if not args.model:
        raise NumallmError("--verify needs a MODEL to load: numallm topo MODEL --verify")
    if args.topology or args.sysfs_root:
        raise NumallmError("--verify loads the model on this machine; drop --topology/--sysfs-root")
    if not 0 <= args.min_local <= 100:
        raise NumallmError(f"--min-local {args.min_local}: give a percentage from 0 to 100")


def verify(args: argparse.Namespace):
    """Load the model as run/chat would with these flags, run one token (so the KV cache has
    pages), and check where every page is: (Placement.summary(), placement_check.Check)."""
    from ..engine import load as load_model
    from ..placement_check import check

    with load_model(args.model, n_ctx=args.context, numa=args.numa or "auto",
                    cache_type_k=args.cache_type_k, cache_type_v=args.cache_type_v,
                    virtual_nodes=args.virtual_nodes, nodes=args.nodes,
                    threads_per_node=args.threads_per_node) as llm:
        bos = llm.tokenizer.bos_id
        llm.logits([0 if bos is None else bos])
        return (llm.placement.summary(args.min_local / 100),
                check(llm.placement, args.min_local / 100))
