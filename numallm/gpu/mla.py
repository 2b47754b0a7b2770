"""DeepSeek's Multi-head Latent Attention on a GPU: the device version of the attention of a block
whose declaration has MLA's per-head split (models/deepseek2.py, MLABlock.attn): for the blocks the
plan puts on a GPU, numallm.gpu.offload's GpuLayer runs it in place of the block's attn, and the
block's feed-forward as for every other architecture (ops dispatch on the device tensors).

MLABlock.attn is host array code (per-head slices, concatenations, the absorbed products on the
CPU's kernel records), so its steps cannot dispatch to the executor one by one; this is the
same computation, step for step, on the device (tests/test_gpu_deepseek.py compares the two):

  h = rms_norm(x); q = q(h) or q_b(rms_norm(q_a(h))); kva = kv_a(h)        ops.matmuls (GPU)
  cache[pos0..] = [rms_norm(kva[:, :lat]) * kv_a_norm, RoPE(kva[:, lat:])]  cuda_mla.latent
  qc[t, h] = [W_UK[h]^T q_nope[t, h], RoPE(q_pe[t, h])] * kq_scale * sqrt(width)
  o = attention(qc, cache) over one KV head whose rows are the latents      cuda_ops.attention
  out = attn_output([W_UV[h] o[t, h, :lat] for h])                          ops (GPU)

The tensors come by their declared roles (models.decl.T.role). The absorbed matrices are the
file's own tensors, byte for byte (attn_kv_b, or attn_k_b and attn_v_b), read from the GGUF:
the CPU keeps them in its kernel records (and transposes the key half of attn_kv_b), neither of
which a GPU can use, so the plan's bytes (the GGUF's) are what the device holds. The cache holds
one latent row per position in the GPU KV type: the config's kv_bytes_per_token.
"""
from __future__ import annotations

import math
import weakref

from ..models.decl import MLA_HEADS
from .device import DeviceTensor, Gpu


def is_mla(block_class: type) -> bool:
    """Whether a block class's attention is MLA (its declaration splits tensors by MLA heads)."""
    return any(t.split is not None and t.split[1] == MLA_HEADS for t in block_class.TENSORS)


class DeviceLatentCache:
    """One layer's latent cache on its GPU: (1, n_ctx, lat + rope) in the plan's KV type, keys
    and values in one (MLA's V is the latent too). Counted as the GPU's "kv" while it lives."""

    def __init__(self, gpu: Gpu, n_ctx: int, width: int, dtype):
        self.gpu = gpu
        self.kv = gpu.empty((1, n_ctx, width), dtype, "kv")
        self.n = 0
        weakref.finalize(self, gpu.freed, "kv", self.nbytes)

    @property
    def nbytes(self) -> int:
        return int(self.kv.nbytes)


class DeviceMLA:
    """The attention of an MLA block on `gpu` (GpuLayer runs it in place of block.attn): (x, cache, pos0) -> the attention update (T, n_embd)
    on the GPU. `gguf`: the model's file, for the absorbed matrices' stored bytes."""

    def __init__(self, block, index: int, gpu: Gpu, gguf):
        from .cuda_kernels import device_layout
        from .cuda_mla import HeadMatrix

        self.block, self.gpu, self.a = block, gpu, block.a
        self.attr = {t.role: t.attr for t in type(block).TENSORS if t.role}
        a = self.a
        lat, nope, v = a.n_lora_kv, a.nope_dim, a.v_head_dim
        names = {t.role: f"blk.{index}.{t.name}" for t in type(block).TENSORS if t.role}

        self.nbytes = 0                          # the absorbed matrices' bytes on the GPU

        def put(role: str):
            qt = gguf.tensor(names[role])
            dev = gpu.put(device_layout(qt.qtype, qt.data), "weights")
            self.nbytes += int(dev.nbytes)
            return qt.qtype, dev

        if names["kv_b"] in gguf.tensors:       # (H * (nope + v), lat): head h's key rows, then its value rows
            qtype, dev = put("kv_b")
            self.uk = HeadMatrix(qtype, dev, lat, nope + v, 0, nope)     # used transposed
            self.uv = HeadMatrix(qtype, dev, lat, nope + v, nope, v)
            self.uk_t = True
        else:                                   # attn_k_b (H, lat, nope), attn_v_b (H, v, lat)
            qtype, dev = put("k_b")
            self.uk = HeadMatrix(qtype, dev, nope, lat, 0, lat)
            qtype, dev = put("v_b")
            self.uv = HeadMatrix(qtype, dev, lat, v, 0, v)
            self.uk_t = False

    def tensor(self, role: str):
        return getattr(self.block, self.attr[role])

    def new_cache(self, n_ctx: int, dtype) -> DeviceLatentCache:
        return DeviceLatentCache(self.gpu, n_ctx, self.a.kv_a_dim, dtype)

    def __call__(self, x, cache: DeviceLatentCache, pos0: int) -> DeviceTensor:
        from .. import ops
        from . import cuda_mla as cm, cuda_ops as co

        a, g, t = self.a, self.gpu, x.shape[0]
        hn, hd, lat, nope, rope = a.n_head, a.head_dim, a.n_lora_kv, a.nope_dim, a.rope_dim
        width = a.kv_a_dim
        h = ops.rms_norm(x, self.tensor("norm"), a.norm_eps)
        if self.tensor("q") is None:
            qa, kva = ops.matmuls(h, self.tensor("q_a"), self.tensor("kv_a"))
            q = self.tensor("q_b")(ops.rms_norm(qa, self.tensor("q_a_norm"), a.norm_eps))
            del qa
        else:
            q, kva = ops.matmuls(h, self.tensor("q"), self.tensor("kv_a"))
        del h
        launch = g.launch
        rope_op = self.block.rope
        scale = a.kq_scale * math.sqrt(width)            # the attention kernel divides by sqrt(width)
        with g.active():
            table = g.rope_table(rope_op)
            cm.latent(kva.data, self.tensor("kv_a_norm").data, a.norm_eps, cache.kv, pos0, t, lat, rope,
                      table, rope_op.neox, rope_op.mscale, launch)
            cache.n = pos0 + t
            del kva
            qc = DeviceTensor.new(g, (t, hn * width))                            # (T, H * (lat + rope))
            args = (q.data, qc.data, t, hn, hd, 0, width, 0, scale, launch)
            (self.uk.apply_t if self.uk_t else self.uk.apply)(*args)
            cm.query_rope(q.data, qc.data, t, hn, hd, nope, lat, rope, pos0, table, rope_op.neox,
                          rope_op.mscale, scale, launch)
            del q
            att = DeviceTensor.new(g, (t, hn * width))                           # (T, H * (lat + rope))
            co.attention(qc.data.reshape(t, hn, width), cache.kv, cache.kv, att.data, pos0, t, launch)
            del qc
            o = DeviceTensor.new(g, (t, a.o_dim))                                # (T, H * v)
            self.uv.apply(att.data, o.data, t, hn, width, 0, a.v_head_dim, 0, 1.0, launch)
            del att
            g.launches += 5
        return self.tensor("out")(o)
