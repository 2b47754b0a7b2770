"""The GPU byte formulas, shared by the planner (plan.py, policy.py) and the loader (offload.py,
device.py): one source of truth for what a device holds. Pure arithmetic over a model's config.
"""
from __future__ import annotations

from ..models.decl import FF, FF_EXP, FF_SHEXP, MLA_HEADS

MIB = 1 << 20
GIB = 1 << 30
DEFAULT_N_BATCH = 512           # tokens per forward pass (engine.PREFILL_CHUNK)
KV_ELEM_BYTES = {"f16": 2, "f32": 4}


def layer_kv_bytes(args, n_ctx: int, kv_dtype: str, type_v: str | None = None) -> int:
    """K and V of one block for n_ctx positions, keys in `kv_dtype` (a numallm.cache_types name)
    and values in type_v (None: the same): the config's one KV formula
    (models.base.BaseArgs.layer_kv_bytes)."""
    return args.layer_kv_bytes(n_ctx, kv_dtype, type_v)


# Activations a device holds at once, by row width, while a block's forward (models/base.py and
# the architectures' overrides, run by numallm.gpu.device) goes through it: every op makes a new
# tensor, freed when the forward drops it. Counted for the forward as written:
#   n_embd: the layer's input (its caller keeps it), x after attention, the normed x, an update;
#   q_dim:  q (before and after a bias or norm), then q and the attention output;
#   kv_dim: k and v, each before and after a bias or norm (qwen2, qwen3);
#   n_ff:   gate, up and silu(gate) * up.
ACTIVATIONS = {"n_embd": 4, "q_dim": 2, "kv_dim": 4, "n_ff": 3}
# A MoE block's feed-forward instead (models/moe.py, qwen2moe.py, as numallm.gpu.device runs it):
#   n_expert:   the router's logits;
#   n_ff_shexp: the shared expert's gate, up and silu(gate) * up (where the model has one);
#   n_embd:     2 more: the routed experts' sum coming back and the shared expert's output;
#   n_ff_exp:   one routed expert's gate, up and silu(gate) * up (a device that runs experts).
MOE_ACTIVATIONS = {"n_expert": 1, "n_ff_shexp": 3, "n_embd": 2}
# MLA attention (deepseek2, as numallm.gpu.mla runs it) in place of q_dim / kv_dim's:
#   q_dim, kv_a_dim: q and the latent with its rope key; n_lora_q: q_a and its norm (V3);
#   n_head*kv_a_dim: each head's query in the latent space, then its attention output;
#   o_dim: the heads' values, attn_output's input.
MLA_ACTIVATIONS = {"q_dim": 1, "kv_a_dim": 1, "n_lora_q": 2, "n_head*kv_a_dim": 2, "o_dim": 1}
EXPERT_ACTIVATIONS = {"n_ff_exp": 3}


def declared_kinds(arch: str, args) -> dict[str, str]:
    """GGUF name -> declared kind ("matrix", "experts", "norm", "bias") of every tensor the
    architecture reads (models: Model.declared), the one place tensor roles come from. "experts"
    means routed experts (T.routed): MLA's per-head 3-D tensors count as matrices (every token
    reads all of them; they never stay on the CPU with --cpu-moe)."""
    from ..models import get_module

    return {name: "experts" if t.routed else "matrix" if t.kind == "experts" else t.kind
            for name, t in get_module(arch).Model.declared(args)}


def _ffn_units(args) -> set[str]:
    from ..models import get_module

    return {t.split[1] for _, t in get_module(args.arch).Model.declared(args) if t.split}


def width(args, name: str) -> int:
    """A slot width named by config fields, or their product ("n_head*kv_a_dim")."""
    out = 1
    for field in name.split("*"):
        out *= int(getattr(args, field))
    return out


def activations(args, experts: bool = False) -> dict[str, int]:
    """Activation slots by width name for this model's blocks (ACTIVATIONS, with the MoE
    feed-forward's where its blocks have routed experts); experts: the device runs them."""
    units = _ffn_units(args)
    out = {k: v for k, v in ACTIVATIONS.items() if k != "n_ff" or FF in units}
    if MLA_HEADS in units:
        out = {k: v for k, v in out.items() if k not in ("q_dim", "kv_dim")}
        out.update({k: v for k, v in MLA_ACTIVATIONS.items() if width(args, k)})
    if FF_EXP in units:
        for k, v in MOE_ACTIVATIONS.items():
            if k != "n_ff_shexp" or FF_SHEXP in units:
                out[k] = out.get(k, 0) + v
        if experts:
            out.update(EXPERT_ACTIVATIONS)
    return out


def device_buffers(args, n_ctx: int, n_batch: int = DEFAULT_N_BATCH, output: bool = False,
                   experts: bool = False) -> dict[str, tuple[tuple[int, ...], str]]:
    """The scratch a device allocates once, shared by its blocks, sized from the config for a
    pass of T = min(n_batch, n_ctx) tokens: width name -> ((count, T, width), dtype) activation
    slots (ACTIVATIONS), and the RoPE table. The executor (numallm.gpu.device) allocates exactly
    these, so the plan's buffer bytes are the loader's; a forward that needed more would allocate
    more and the load report would show it. Attention keeps no score matrix (online softmax over
    the cache, numallm.gpu.cuda_ops), so nothing here grows with the context; the KV cache does,
    per block. output: the device also runs the output head (its logits); experts: it runs
    routed experts (MoE blocks offloaded whole)."""
    t = min(n_batch, n_ctx)
    bufs = {name: ((count, t, width(args, name)), "f32")
            for name, count in activations(args, experts).items()}
    bufs["rope_inv_freq"] = ((args.rope_dim // 2,), "f64")   # RoPE angles in float64, as ops.Rope
    if output:
        bufs["n_vocab"] = ((1, t, args.n_vocab), "f32")
    return bufs


DTYPE_BYTES = {"f16": 2, "f32": 4, "f64": 8}


def device_buffer_bytes(args, n_ctx: int, n_batch: int = DEFAULT_N_BATCH, output: bool = False,
                        experts: bool = False) -> int:
    """Bytes of device_buffers: the activations and scratch each device holds."""
    total = 0
    for shape, dtype in device_buffers(args, n_ctx, n_batch, output, experts).values():
        n = DTYPE_BYTES[dtype]
        for d in shape:
            n *= d
        total += n
    return total


def model_args(gguf):
    """The model's BaseArgs (validated metadata), as the model classes read it."""
    from ..models import get_module

    return get_module(gguf.architecture).Model.Args.from_gguf(gguf)

