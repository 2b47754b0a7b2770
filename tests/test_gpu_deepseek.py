"""deepseek2 (MLA) on a GPU in Numba's CUDA simulator (tests/conftest.py turns it on), with GPU
inventories given as data: whole blocks on the GPU (-ngl N, all), hybrid blocks whose routed
experts stay on the CPU (--cpu-moe, -ot exps=CPU), and -ngl auto, against the CPU-only engine:
the same greedy tokens, logits within the f16-KV tolerance of the other GPU tests, the plan's
bytes (the latent cache from the config's kv_bytes_per_token) equal to what the executor
allocated, the PCIe copies of one decode step equal to the plan's, and the PROCESSOR split from
where the bytes are.

The fixtures are numallm.synth_deepseek's V2-Lite-like (plain attn_q, softmax routing, two shared
experts, a dense leading layer) and V3-like (q_lora, sigmoid + bias routing in groups,
renormalised and scaled, YaRN; the split attn_k_b / attn_v_b layout) configurations at tiny
widths (64 wide, 2 heads, latent 32 + 16 rope), F16, so the simulator gets through them in
seconds. The CPU reference runs its float kernels (NUMALLM_KERNEL=blas-tile, as
tests/test_gpu_offload.py explains).
"""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

import numallm
import numallm_kernels as nk
from numallm.gpu import OffloadRequest
from numallm.synth_deepseek import SHAPES, cached_deepseek

from numba import cuda  # noqa: E402  (not importorskip: CI runs these in the simulator)

pytestmark = pytest.mark.skipif(not cuda.is_available(), reason="no CUDA device and the simulator is off")

TINY = dict(vocab=320, hidden=64, n_heads=2, n_ff=128, kv_lora=32, qk_nope=16, qk_rope=16,
            v_head=16, n_expert=4, n_expert_used=2, n_ff_exp=32, ctx=256)
V2 = dataclasses.replace(SHAPES["tiny-v2-lite"], **TINY)                       # 1 dense + 1 MoE
V3 = dataclasses.replace(SHAPES["tiny-v3-kb"], **TINY, n_layers=2, q_lora=32, groups=2, groups_used=1)
RTX3060 = {"name": "NVIDIA GeForce RTX 3060", "compute_capability": "8.6", "mem_total": "12GiB"}
PROMPT = "hello world"
LOGIT_TOL = 0.02            # f16 KV cache (tests/test_gpu_offload.py: measured 0.002-0.005)


@pytest.fixture
def gpus(tmp_path, monkeypatch):
    path = tmp_path / "gpus.json"
    path.write_text(json.dumps([RTX3060]))
    monkeypatch.setenv("NUMALLM_FAKE_GPUS", str(path))


@pytest.fixture
def float_cpu(monkeypatch):
    monkeypatch.setenv("NUMALLM_KERNEL", "blas-tile")
    for t in nk.registered_types():
        unit = nk.get(t)
        if unit.calibrated:
            monkeypatch.setattr(unit, "_choice", None)


def check(path, request, n_tok=3):
    """Generate on the CPU and with `request`; compare tokens, logits, bytes, the PROCESSOR
    split and one decode step's PCIe copies. Returns the offloaded LLM."""
    with numallm.load(path, n_ctx=32, n_threads=1) as ref:
        want = ref.generate(PROMPT, max_tokens=n_tok, temperature=0).tokens
        seq = ref.tokenize(PROMPT) + want[:-1]
        logits = ref.logits(seq)
    llm = numallm.load(path, n_ctx=32, n_threads=1, offload=request)
    off = llm.offload
    assert off.applied, off.reason
    assert llm.generate(PROMPT, max_tokens=n_tok, temperature=0).tokens == want
    assert float(np.max(np.abs(llm.logits(seq) - logits))) < LOGIT_TOL
    for row in off.compare():                    # the plan's bytes are the executor's
        assert row["actual"] == row["predicted"], row
    assert off.processor(llm.model) == off.plan.processor()
    assert off.gpu_share(llm.model) == pytest.approx(off.plan.gpu_share(), abs=1e-12)
    lm = llm.loaded
    cache = lm.new_cache()
    lm.forward(np.array(seq[:2]), cache, 0)
    g = next(iter(off.gpus.values()))
    before = (g.up_bytes, g.down_bytes, g.uploads + g.downloads)
    lm.forward(np.array(seq[2:3]), cache, 2)
    t = off.plan.pcie
    assert (g.up_bytes - before[0], g.down_bytes - before[1], g.uploads + g.downloads - before[2]) == \
        (t.up, t.down, t.transfers)
    return llm


def test_v2_lite_whole_blocks_on_the_gpu(synth_dir, gpus, float_cpu):
    """-ngl all: the dense leading MLA block and the MoE block (its experts too) and the head."""
    llm = check(cached_deepseek(synth_dir, "F16", V2), OffloadRequest(gpu_layers="all"))
    off, a = llm.offload, llm.args
    assert off.gpu_layers() == [0, 1] and off.head is not None
    assert type(llm.model.blk[1].block.ffn_gate_exps).__name__ == "DeviceExperts"
    # the latent cache: one (lat + rope) row of f16 per position and layer, the config's formula
    assert off.plan.devices[0].kv == a.kv_bytes(32, "f16") == 2 * 32 * (32 + 16) * 2
    assert "blk.0-1 GPU 0" in off.summary(llm.model)


def test_v3_hybrid_experts_on_the_cpu(synth_dir, gpus, float_cpu):
    """-ngl all --cpu-moe on the V3-like file (q_lora, sigmoid + bias routing in groups, YaRN,
    attn_k_b / attn_v_b): MLA, router and shared expert on the GPU, routed experts on the CPU."""
    llm = check(cached_deepseek(synth_dir, "F16", V3), OffloadRequest(gpu_layers="all", cpu_moe=True))
    off = llm.offload
    plan = off.plan
    assert [len(u.host_tensors) for u in plan.layers] == [0, 3]       # blk.0 is dense
    blk = llm.model.blk[1].block
    assert type(blk.ffn_gate_exps).__name__ == "ExpertLinear"
    assert type(blk.ffn_gate_shexp).__name__ == "DeviceLinear"
    assert type(blk.attn_q_b).__name__ == "DeviceLinear"
    from numallm.gpu import hybrid

    assert hybrid.stats(off.gpus[0]).calls > 0
    assert "routed experts on the CPU" in off.summary(llm.model)
