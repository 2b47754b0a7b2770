"""`numallm info MODEL`: architecture, parameters, quant types, tensors, memory for a context."""
from __future__ import annotations

import json
import os
from collections import Counter

from ..cache_types import DEFAULT_CACHE_TYPE
from ..gguf_file import GGUFFile
from .common import add_cache_args


def register(sub) -> None:
    p = sub.add_parser("info", help="describe a GGUF model: architecture, tensors, memory needed")
    p.add_argument("model", help="GGUF path or Hugging Face repo[:file]")
    p.add_argument("-c", "--ctx-size", type=int, default=None, metavar="N",
                   help="context length to size the KV cache for (default: the model's, at most 4096)")
    add_cache_args(p)
    p.add_argument("--tensors", action="store_true", help="list every tensor (default: the first 12)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)


def describe(path: str, n_ctx: int | None, cache_type_k: str = DEFAULT_CACHE_TYPE,
             cache_type_v: str = DEFAULT_CACHE_TYPE) -> dict:
    from ..placement import ModelSpec, Request, make_plan

    f = GGUFFile(path)
    spec = ModelSpec.from_gguf(f)              # a missing required tensor raises here
    args = spec.args
    plan = make_plan(spec, None, Request(numa="off", n_ctx=n_ctx or 0, cache_type_k=cache_type_k,
                                         cache_type_v=cache_type_v))   # the bytes load would place
    n_ctx = plan.n_ctx
    weights, kv = plan.weight_bytes, plan.kv_bytes
    types: Counter = Counter()
    for t in f.tensors.values():
        types[t.qtype.name] += t.nbytes
    return {
        "path": path, "architecture": args.arch, "name": f.get("general.name", ""),
        "parameters": int(sum(t.n_elements for t in f.tensors.values())),
        # per decoded token: every tensor, of the routed experts only k of n_expert
        "active_parameters": int(sum(f.tensors[t.name].n_elements * (
            args.n_expert_used / args.n_expert if t.decl.kind == "experts" else 1.0)
            for t in spec.tensors)) + int(sum(t.n_elements for n, t in f.tensors.items()
                                              if n not in {s.name for s in spec.tensors})),
        "config": {k: v for k, v in vars(args).items()},
        "quant_types": {k: v for k, v in types.most_common()},
        "weights_bytes": weights, "ctx": n_ctx, "kv_cache_bytes": kv,
        "kv_bytes_per_token": args.kv_bytes_per_token(cache_type_k, cache_type_v),  # the config's formula (MLA: latent)
        "cache_type_k": cache_type_k, "cache_type_v": cache_type_v, "cache_label": plan.cache_label,
        "total_bytes": weights + kv, "active_weights_bytes": spec.active_bytes,
        "shared_expert": "blk.0.ffn_up_shexp.weight" in f.tensors,
        "tokenizer": f.get("tokenizer.ggml.model"), "chat_template": "tokenizer.chat_template" in f.metadata,
        "parts": [{"path": p.path, "bytes": p.file_size, "tensors": p.own_tensors} for p in f.parts],
        "tensors": [{"name": t.name, "type": t.qtype.name, "shape": list(t.shape), "bytes": t.nbytes}
                    for t in f.tensors.values()],
    }


def _gb(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def run(args) -> int:
    from ..hub import resolve_model

    d = describe(resolve_model(args.model), args.ctx_size, args.cache_type_k, args.cache_type_v)
    if args.json:
        print(json.dumps(d))
        return 0
    c = d["config"]
    print(f"{d['path']}\n  architecture  {d['architecture']}  {d['name']}")
    active = (f" ({d['active_parameters'] / 1e6:.2f} M active per token)"
              if d["active_parameters"] != d["parameters"] else "")
    print(f"  parameters    {d['parameters'] / 1e6:.2f} M{active}")
    if len(d["parts"]) > 1:
        print(f"  parts         {len(d['parts'])} files (split GGUF): " + ", ".join(
            f"{os.path.basename(p['path'])} ({p['tensors']} tensors, {_gb(p['bytes'])})" for p in d["parts"]))
    print(f"  layers        {c['n_layer']}, embedding {c['n_embd']}, ffn {c['n_ff']}, heads "
          f"{c['n_head']} (kv {c['n_head_kv']}, dim {c['head_dim']}), vocab {c['n_vocab']}")
    if c.get("n_expert"):
        print(f"  experts       {c['n_expert']} per layer, {c['n_expert_used']} used per token, width "
              f"{c['n_ff_exp']}{', shared expert ' + str(c['n_ff_shexp']) if d['shared_expert'] else ''}; "
              f"a token reads {_gb(d['active_weights_bytes'])} of {_gb(d['weights_bytes'])}")
    print(f"  rope          base {c['rope_base']:g}, dim {c['rope_dim']}, scaling {c['rope_scaling_type']}")
    print(f"  context       trained {c['context_length']}; sized here for {d['ctx']}")
    print("  quant types   " + ", ".join(f"{k} {_gb(v)}" for k, v in d["quant_types"].items()))
    print(f"  tokenizer     {d['tokenizer']}, chat template: {'yes' if d['chat_template'] else 'no'}")
    print(f"  memory        weights {_gb(d['weights_bytes'])} + KV cache {_gb(d['kv_cache_bytes'])} "
          f"({d['cache_label']}, {d['ctx']} tokens, {d['kv_bytes_per_token']} bytes per token) = {_gb(d['total_bytes'])}")
    rows = d["tensors"] if args.tensors else d["tensors"][:12]
    w = max(len(t["name"]) for t in rows)
    print(f"\n  {'tensor':<{w}}  {'type':<7} {'shape':<20} bytes")
    for t in rows:
        print(f"  {t['name']:<{w}}  {t['type']:<7} {str(tuple(t['shape'])):<20} {t['bytes']}")
    if len(rows) < len(d["tensors"]):
        print(f"  ... {len(d['tensors']) - len(rows)} more (--tensors lists all)")
    return 0
