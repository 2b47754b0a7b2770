"""Flags shared by the verbs that load a model (llama.cpp's names where users know them)."""
from __future__ import annotations

import argparse
import os
import sys


def add_model_args(p: argparse.ArgumentParser, model_optional: bool = False) -> None:
    if model_optional:
        p.add_argument("model", nargs="?", help="GGUF path or Hugging Face repo[:file] "
                       "(default: a small pinned instruct model, pulled on first use)")
    else:
        p.add_argument("model", help="GGUF path or Hugging Face repo[:file]")
    p.add_argument("-c", "--ctx-size", type=int, default=None, metavar="N",
                   help="context size in tokens (default: the model's, at most 4096)")
    p.add_argument("-t", "--threads", type=int, default=None, metavar="N",
                   help="threads (default: physical cores)")
    add_numa_args(p)


NUMA_HELP = ("auto: pick from the nodes, the model and free memory, and say why (default; off "
             "on one node, shard on several); shard: one copy of the weights split over the nodes, "
             "each node computing its heads and rows from its own memory; replicate: a full copy "
             "per node, rows split over them; isolate: one node; off: no placement")


# placement.STRATEGIES, spelled out: importing placement would load Numba for every command
STRATEGIES = ("auto", "off", "shard", "replicate", "isolate")


def add_numa_args(p: argparse.ArgumentParser, numa_help: str = NUMA_HELP, numa_type=None) -> None:
    g = p.add_argument_group("NUMA placement (numallm.placement)")
    if numa_type is None:
        g.add_argument("--numa", choices=STRATEGIES, default=None, help=numa_help)
    else:
        g.add_argument("--numa", type=numa_type, default=None, help=numa_help)
    g.add_argument("--nodes", type=_node_list, default=None, metavar="0,1",
                   help="nodes to use with --numa (default: all with CPUs)")
    g.add_argument("--threads-per-node", type=int, default=None, metavar="N",
                   help="worker threads per node (default: its physical cores)")
    g.add_argument("--virtual-nodes", type=int, default=None, metavar="N",
                   help="carve this machine's cores into N virtual nodes (testing on one node)")
    add_cache_args(p)
    g.add_argument("--moe-split", choices=("auto", "ff", "experts"), default="auto",
                   help="MoE experts under --numa shard: ff (each node a share of every expert), "
                        "experts (whole experts per node); auto says which and why")
    add_gpu_args(p)


def add_cache_args(p: argparse.ArgumentParser) -> None:
    """-ctk / -ctv, llama.cpp's KV cache type flags (checked by check_args: one line when bad)."""
    from ..cache_types import CACHE_TYPES, DEFAULT_CACHE_TYPE

    g = p.add_argument_group("KV cache on the CPU (numallm.cache_types)")
    types = ", ".join(CACHE_TYPES)
    g.add_argument("-ctk", "--cache-type-k", default=DEFAULT_CACHE_TYPE, metavar="TYPE",
                   help=f"KV cache type for K: {types} (default {DEFAULT_CACHE_TYPE})")
    g.add_argument("-ctv", "--cache-type-v", default=DEFAULT_CACHE_TYPE, metavar="TYPE",
                   help=f"KV cache type for V: {types} (default {DEFAULT_CACHE_TYPE})")


def cache_options(args: argparse.Namespace) -> dict:
    """load() / placement.Request keywords for -ctk / -ctv."""
    return dict(cache_type_k=args.cache_type_k, cache_type_v=args.cache_type_v)


def plan_request(args: argparse.Namespace, numa: str, n_ctx: int | None, n_threads: int | None,
                 offload=None):
    """The placement.Request these placement / cache flags ask for (plan, bench)."""
    from ..errors import NumallmError
    from ..placement import Request

    if n_ctx is not None and n_ctx < 1:
        raise NumallmError(f"-c {n_ctx}: give a positive number of tokens")
    return Request(numa=numa, n_ctx=n_ctx or 0, n_threads=n_threads,
                   nodes=None if args.nodes is None else tuple(args.nodes),
                   threads_per_node=args.threads_per_node, offload=offload,
                   moe_split=args.moe_split, **cache_options(args))


def add_gpu_args(p: argparse.ArgumentParser) -> None:
    """Offload flags (llama.cpp's names where users know them); see docs/gpu.md."""
    g = p.add_argument_group("GPU offload (numallm.gpu, docs/gpu.md; default: CPU only)")
    g.add_argument("-ngl", "--gpu-layers", "--n-gpu-layers", dest="gpu_layers", type=_gpu_layers,
                   default=None, metavar="N|auto|all",
                   help="blocks to run on GPUs: N (the last N), auto (as many as fit), all (every "
                        "block and the output head)")
    g.add_argument("--offload", action="append", default=[], metavar="REGEX",
                   help=r"offload the blocks whose tensor names match REGEX, e.g. 'blk\.(2[0-9])\.' "
                        "(repeatable; whole blocks move; 'output' names the output head)")
    g.add_argument("-ot", "--override-tensor", "--offload-tensors", dest="override_tensor",
                   action="append", default=[], type=_overrides, metavar="REGEX=DEVICE",
                   help="keep the tensors matching REGEX on DEVICE (CPU, CUDA0, ...), llama.cpp's "
                        "spelling, e.g. -ot exps=CPU: routed experts on the CPU, the rest of each "
                        "offloaded block on the GPU (repeatable or comma-separated; the first match "
                        "decides)")
    g.add_argument("--cpu-moe", action="store_true",
                   help="keep every block's routed experts on the CPU (attention, router, shared "
                        "experts and KV cache of offloaded blocks on the GPU)")
    g.add_argument("--n-cpu-moe", type=int, default=0, metavar="N",
                   help="keep the routed experts of the first N blocks on the CPU")
    g.add_argument("--gpus", type=_index_list, default=None, metavar="0,2",
                   help="use only these GPUs (numbers as `numallm topo` / nvidia-smi show them)")
    g.add_argument("--exclude-gpus", type=_index_list, default=[], metavar="1",
                   help="never use these GPUs")
    g.add_argument("--gpu-reserve", default="512MiB", metavar="SIZE",
                   help="memory left free on each GPU, e.g. 2GiB (default 512MiB: the CUDA context "
                        "and other processes)")
    g.add_argument("--gpu-min-cc", type=_cc, default=None, metavar="X.Y",
                   help="oldest compute capability to use (default 6.0, Pascal)")
    g.add_argument("--gpu-kv-type", choices=("f16", "f32"), default="f16",
                   help="KV cache element type on GPUs (default f16; the CPU's is -ctk / -ctv)")


def _gpu_layers(text: str) -> int | str:
    t = text.strip().lower()
    if t in ("auto", "all"):
        return t
    if t.isdigit():
        return int(t)
    raise argparse.ArgumentTypeError(f"{text!r}: give a number of layers, auto or all")


def _overrides(text: str) -> list[tuple[str, str]]:
    """llama.cpp's -ot value: REGEX=DEVICE[,REGEX=DEVICE...] (the device as CPU or CUDAn)."""
    out = []
    for part in text.split(","):
        pat, eq, dev = part.rpartition("=")
        if not eq or not pat or not dev:
            raise argparse.ArgumentTypeError(f"{part!r}: give REGEX=DEVICE, e.g. exps=CPU")
        out.append((pat, dev.strip().upper()))
    return out


def _index_list(text: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        out = []
    if not out or any(i < 0 for i in out):
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of GPU numbers (0,2)")
    return out


def _cc(text: str) -> tuple[int, int]:
    major, dot, minor = text.strip().partition(".")
    if not (major.isdigit() and (minor.isdigit() or not dot)):
        raise argparse.ArgumentTypeError(f"{text!r} is not a compute capability like 6.1 or 8.6")
    return int(major), int(minor or 0)


def offload_request(args: argparse.Namespace):
    """The OffloadRequest the GPU flags describe (bad values raise one-line GpuErrors)."""
    from ..gpu import MIN_COMPUTE_CAPABILITY, OffloadRequest, parse_size

    return OffloadRequest(gpu_layers=args.gpu_layers, offload=tuple(args.offload),
                          gpus=None if args.gpus is None else tuple(args.gpus),
                          exclude_gpus=tuple(args.exclude_gpus),
                          reserve_bytes=parse_size(args.gpu_reserve, "--gpu-reserve"),
                          min_compute_capability=args.gpu_min_cc or MIN_COMPUTE_CAPABILITY,
                          kv_dtype=args.gpu_kv_type,
                          tensor_overrides=tuple(o for group in args.override_tensor for o in group),
                          cpu_moe=args.cpu_moe, n_cpu_moe=args.n_cpu_moe)


def _node_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of node numbers") from None


def add_sampling_args(p: argparse.ArgumentParser, n_predict: int) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("-n", "--n-predict", type=int, default=n_predict, metavar="N",
                   help=f"tokens to generate: -1 = until end of text or the context is full, 0 = "
                        f"none (the prompt is only processed), as in llama.cpp (default {n_predict})")
    g.add_argument("--temp", type=float, default=0.8, help="temperature >= 0, 0 = greedy (default 0.8)")
    g.add_argument("--top-k", type=int, default=40, help="top-k >= 0, 0 = off (default 40)")
    g.add_argument("--top-p", type=float, default=0.95, help="top-p 0..1, 1 = off (default 0.95)")
    g.add_argument("--min-p", type=float, default=0.05, help="min-p 0..1, 0 = off (default 0.05)")
    g.add_argument("--repeat-penalty", type=float, default=1.0, help="repetition penalty > 0, 1 = off")
    g.add_argument("--repeat-last-n", type=int, default=64,
                   help="tokens the penalty looks back, -1 = the whole context, 0 = off (default 64)")
    g.add_argument("--seed", type=int, default=-1, help="random seed, -1 = random (default)")
    g.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop when TEXT is generated (repeatable)")


# namespace attribute -> (numallm.sampling.LIMITS entry, flag): the library's ranges, named as flags
SAMPLING_FLAGS = {"n_predict": ("max_tokens", "-n"), "temp": ("temperature", "--temp"),
                  "top_k": ("top_k", "--top-k"), "top_p": ("top_p", "--top-p"),
                  "min_p": ("min_p", "--min-p"), "repeat_penalty": ("repeat_penalty", "--repeat-penalty"),
                  "repeat_last_n": ("repeat_last_n", "--repeat-last-n")}


# special values where the flag spells them unlike the library keyword (None there)
CLI_NOTES = {"max_tokens": "-1 = until end of text or the context is full, 0 = none: the prompt "
                           "is only processed"}


def check_args(args: argparse.Namespace) -> list[str]:
    """Check every run option the verb has against the library's ranges before anything loads:
    an OptionError names the flag, the value and the allowed range. Thread counts over the usable
    CPUs are capped in `args`; the returned lines say so (the caller prints them)."""
    from ..errors import OptionError
    from ..sampling import check
    from ..threads import check_threads

    for attr, (name, flag) in SAMPLING_FLAGS.items():
        if hasattr(args, attr):
            check(name, getattr(args, attr), flag, note=CLI_NOTES.get(name))
    if hasattr(args, "n_predict") and args.seed != -1:   # run and chat: -1 = random
        check("seed", args.seed, "--seed", note="-1 = random")
    from ..cache_types import check_cache_type

    for attr, flag in (("cache_type_k", "--cache-type-k"), ("cache_type_v", "--cache-type-v")):
        if hasattr(args, attr):
            check_cache_type(getattr(args, attr), flag)
    for attr, flag in (("ctx_size", "-c"), ("virtual_nodes", "--virtual-nodes")):
        v = getattr(args, attr, None)
        if v is not None and v < 1:
            raise OptionError(f"{flag} {v} is not allowed: give a number of at least 1")
    notes = []
    for attr, flag in (("threads", "-t"), ("threads_per_node", "--threads-per-node")):
        v = getattr(args, attr, None)
        if isinstance(v, int):   # bench's -t is a list, checked by numallm.bench
            n, note = check_threads(v, flag)
            setattr(args, attr, n)
            notes += [note] if note else []
    return notes


def sampling_kwargs(args: argparse.Namespace, n_ctx: int) -> dict:
    return dict(max_tokens=None if args.n_predict < 0 else args.n_predict,
                temperature=args.temp, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                repeat_penalty=args.repeat_penalty, repeat_last_n=args.repeat_last_n,
                seed=None if args.seed < 0 else args.seed, stop=args.stop)


def announce_first_run(args: argparse.Namespace) -> bool:
    """One line on stderr before the first load on a new CPU, which compiles and calibrates for
    tens of seconds with nothing else on the terminal; silent with --json or --quiet, when
    NUMALLM_KERNEL forces the variants, or when stderr is not a terminal."""
    if getattr(args, "json", False) or getattr(args, "quiet", False) or not sys.stderr.isatty():
        return False
    if os.environ.get("NUMALLM_KERNEL", "").strip():
        return False
    from numallm_kernels._calibrate import cache_dir, first_run

    if not first_run():
        return False
    print(f"numallm: first run on this CPU: compiling the kernels and timing their variants to "
          f"pick the fastest (about 30-60 s, once per CPU; remembered in {cache_dir()})",
          file=sys.stderr, flush=True)
    return True


def gpu_options(args: argparse.Namespace, request=None) -> dict:
    """load() options for the GPU flags: {"offload": request} when layers are asked for (the
    engine plans it with the machine's GPUs, placement.make_plan, and its notice says where the
    layers went or why all run on the CPU); else {}, with one line on stderr when GPU policy flags
    were given without layers."""
    request = request or offload_request(args)
    if request.wants_gpu:
        return {"offload": request}
    if args.gpus is not None or args.exclude_gpus or args.gpu_min_cc is not None:
        # device policy without a layer request changes nothing: say so rather than stay silent
        print("numallm: GPU options given but no layers asked for (-ngl N|auto|all or --offload "
              "REGEX): running every layer on the CPU", file=sys.stderr)
    return {}


def progress_bar(args: argparse.Namespace):
    """A progress(done, total) callback drawing a tqdm bar on stderr for a load that takes more
    than a couple of seconds (tqdm's delay); None when stderr is not a terminal or with --json."""
    if getattr(args, "json", False) or getattr(args, "quiet", False) or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    bar = None

    def progress(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc="numallm: loading", unit="block", file=sys.stderr,
                       delay=2.0, leave=False)
        bar.update(done - bar.n)
        if done == total:
            bar.close()
    return progress


def load_model(args: argparse.Namespace, template_file: str | None = None, n_seq: int | None = None):
    """The LLM (one session) the flags describe; with `n_seq`, a LoadedModel whose plan holds
    n_seq KV caches and no session yet (the server opens its own)."""
    from ..engine import LoadedModel, load
    from ..hub import resolve_model

    request = offload_request(args)   # bad GPU flags fail before anything is loaded
    path = resolve_model(args.model)
    template = None if template_file is None else read_template(template_file)
    gpu = gpu_options(args, request)
    first = announce_first_run(args)
    opts = dict(n_ctx=args.ctx_size, n_threads=args.threads, chat_template=template,
                numa=args.numa or "auto", virtual_nodes=args.virtual_nodes, nodes=args.nodes,
                threads_per_node=args.threads_per_node, progress=progress_bar(args),
                moe_split=args.moe_split, **gpu, **cache_options(args))
    llm = load(path, **opts) if n_seq is None else LoadedModel(path, n_seq=n_seq, **opts)
    if first:   # said once per CPU, also where no calibrated type was used
        from numallm_kernels._calibrate import remember_cpu

        remember_cpu()
    reason = llm.placement.reason
    for line in llm.notices:          # the GPU offload's line, numa auto's reason
        # the default stays quiet where it changes nothing (off on one node); asked for, it explains
        if line != reason or args.numa == "auto" or llm.placement.strategy != "off":
            print(f"numallm: {line}", file=sys.stderr)
    return llm


def read_template(path: str) -> str:
    """The text of a --chat-template FILE (a user mistake here is one line, not a traceback)."""
    from ..chat_template import MAX_SOURCE, ChatTemplateError

    try:
        if not os.path.isfile(path):
            what = "is not a regular file" if os.path.exists(path) else "does not exist"
            raise ChatTemplateError(f"--chat-template {path} {what}; give a Jinja template file")
        if os.path.getsize(path) > MAX_SOURCE:
            raise ChatTemplateError(f"--chat-template {path} is over {MAX_SOURCE >> 20} MiB; "
                                    f"chat templates are a few KiB of Jinja")
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ChatTemplateError(f"--chat-template {path} cannot be read ({e.__class__.__name__}: "
                                f"{getattr(e, 'strerror', None) or e}); give a readable UTF-8 file") from None


def speed_line(prompt_tokens: int, prompt_tps: float, gen_tokens: int, gen_tps: float) -> str:
    return (f"prompt: {prompt_tokens} tok, {prompt_tps:.1f} tok/s | "
            f"generation: {gen_tokens} tok, {gen_tps:.1f} tok/s")
