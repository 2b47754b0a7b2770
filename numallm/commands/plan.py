"""`numallm plan MODEL`: where each layer would run (CPU or which GPU) and the bytes every device and
host node would hold, before anything is loaded. The loader uses the same plan (numallm.gpu)."""
from __future__ import annotations

import argparse

from .common import add_model_args, offload_request, plan_request
from .topo import dumps


def register(sub) -> None:
    p = sub.add_parser("plan", help="show which layers would run on which GPU, and the memory each needs",
                       description="Plan GPU offload for MODEL without loading it: each layer's device, "
                                   "bytes per GPU (weights, KV cache, buffers), host memory per NUMA "
                                   "node and the predicted CPU/GPU split (docs/gpu.md). With no GPU it "
                                   "prints the all-CPU plan and why.")
    add_model_args(p)
    p.add_argument("--ctx", dest="ctx_size", type=int, help=argparse.SUPPRESS)  # alias of -c
    p.add_argument("--topology", metavar="FILE",
                   help="plan for the machine a `numallm topo --json` file describes (e.g. a fixture)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON (schema: docs/gpu.md)")
    p.set_defaults(func=run)


def _size(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB" if n >= 1 << 30 else f"{n / (1 << 20):.1f} MiB"


def _ranges(idx: list[int]) -> str:
    """[0, 1, 2, 5] -> 'blk.0-2, blk.5'."""
    out, i = [], 0
    while i < len(idx):
        j = i
        while j + 1 < len(idx) and idx[j + 1] == idx[j] + 1:
            j += 1
        out.append(f"blk.{idx[i]}" + (f"-{idx[j]}" if j > i else ""))
        i = j + 1
    return ", ".join(out)


def render(full, arch: str, spec=None, topo=None) -> list[str]:
    """full: the placement Plan (numallm.placement); its .gpu is the offload part. With the
    ModelSpec and topology, also the decode speed the plan predicts (numallm.gpu.traffic)."""
    from ..gpu.traffic import predict_plan

    plan = full.gpu
    n_layer = len(plan.layers)
    req = plan.request
    out = [f"plan for {plan.model} ({arch}, {n_layer} blocks), context {plan.n_ctx} tokens, "
           f"KV cache {req.kv_dtype} on GPUs / {full.cache_label} on the CPU"]
    if plan.no_gpu:
        out.append(f"no GPU: {plan.no_gpu}")
    for i, d in plan.devices.items():
        g = d.device
        bw = f"{g.bandwidth_gbps:.0f} GB/s {g.bandwidth_source}" if g.bandwidth_gbps else "bandwidth unknown"
        node = f"node {g.numa_node}" if g.numa_node is not None else "node unknown"
        blocks = [x for x in d.layers if x < n_layer]
        what = " + ".join(x for x in (_ranges(blocks), "output" if n_layer in d.layers else "") if x)
        kept = [u.index for u in plan.layers if u.device == i and u.host_tensors]
        if kept:
            what += f" (routed experts of {_ranges(kept)} on the CPU)"
        out.append(f"GPU {i} {g.name} (cc {g.cc}, {bw}, PCIe on {node}): {what}")
        out.append(f"    weights {_size(d.weights)} + KV {_size(d.kv)} + buffers {_size(d.buffers)} = "
                   f"{_size(d.total)} of {_size(d.usable)} usable ({_size(g.mem_free)} free - "
                   f"{_size(d.reserve)} reserve)")
    for i, why in plan.skipped:
        out.append(f"GPU {i} not used: {why}")
    cpu = [u.index for u in plan.layers if u.device is None]
    kept = [u.index for u in plan.layers if u.device is not None and u.host_tensors]
    what = (_ranges(cpu) + ", " if cpu else "") + (
        f"routed experts of {_ranges(kept)}, " if kept else "") + "token_embd" + (
        ", output" if plan.output.device is None else "")
    per = ", ".join(f"node {n.node}: {_size(n.weights + n.kv)}" if n.node >= 0 else
                    f"not placed on a node (--numa off): {_size(n.weights + n.kv)}" for n in full.nodes)
    out.append(f"CPU: {what} ({full.reason or 'numa ' + full.strategy})")
    out.append(f"    weights {_size(full.host_weights)} + KV {_size(full.host_kv)} = "
               f"{_size(full.host_weights + full.host_kv)}; {per}")
    out.append(f"model: weights {_size(full.weight_bytes)}, KV cache {_size(full.kv_bytes)} "
               f"({full.n_ctx} tokens, {full.cache_label} on the CPU)")
    if full.experts[1]:
        out.append(f"experts: {full.experts[0]} of {full.experts[1]} per token; a decoded token "
                   f"reads {_size(full.active_bytes)} of the weights")
    out.append(f"predicted split: {plan.processor()} (weights + KV cache; GPU buffers not counted)")
    if plan.devices and plan.pcie is not None:
        t = plan.pcie
        d = t.to_dict()
        out.append(f"PCIe per decoded token: {t.down / 1024:.1f} KiB down, {t.up / 1024:.1f} KiB up in "
                   f"{t.transfers} copies (~{1e3 * t.seconds():.2f} ms at an assumed "
                   f"{d['assumed_gbps']:.0f} GB/s + {1e6 * d['assumed_latency_s']:.0f} us each)")
    pred = predict_plan(full, spec, topo) if spec is not None and plan.devices else None
    if pred is not None:
        out.append(pred.line())
    out += [f"note: {n}" for n in plan.notes]
    return out


def run(args: argparse.Namespace) -> int:
    from ..engine import plan_model
    from ..hub import resolve_model
    from ..placement import OutOfMemoryError

    request = offload_request(args)
    req = plan_request(args, args.numa or "auto", args.ctx_size, args.threads, request)
    from ..gpu.traffic import predict_plan

    f, spec, plan, topo = plan_model(resolve_model(args.model, download=False), req,
                                     args.virtual_nodes, args.topology)
    try:                              # what load would say before allocating anything
        plan.check_fits()
        fits = None
    except OutOfMemoryError as e:
        fits = str(e)
    if args.json:
        pred = predict_plan(plan, spec, topo) if plan.gpu.devices else None
        print(dumps({**plan.gpu.to_json(), "placement": {**plan.to_dict(), "refused": fits},
                     "predicted_decode": None if pred is None else pred.to_dict()}))
    else:
        print("\n".join(render(plan, f.architecture, spec, topo) +
                        plan.lines()[1 if plan.reason else 0:] +
                        [f"memory check: {'fits' if fits is None else 'load would refuse: ' + fits}"]))
    return 0
