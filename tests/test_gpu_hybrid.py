"""Hybrid MoE in Numba's CUDA simulator (tests/conftest.py turns it on), with GPU inventories given
as data: blocks on a GPU whose routed experts stay on the CPU (--cpu-moe, -ot exps=CPU, -ngl auto
on a GPU too small for the experts), MoE blocks offloaded whole, and the CPU-only engine as the
reference: the same greedy tokens, logits within the f16-KV tolerance, the plan's bytes equal to
what the executor allocated, and the plan's PCIe traffic equal to the copies one decode step makes.

The reference is the CPU engine on its float kernels (NUMALLM_KERNEL=blas-tile, as
tests/test_gpu_offload.py explains); the experts run on those same CPU kernels in both runs.
Models are 64 wide with 4 experts (top 2), so the simulator gets through them in seconds.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

import numallm
import numallm_kernels as nk
from numallm.gguf_file import GGUFFile
from numallm.gpu import GpuDevice, OffloadRequest, make_plan
from numallm.synth import cached_model

from numba import cuda  # noqa: E402  (not importorskip: CI runs these in the simulator)

pytestmark = pytest.mark.skipif(not cuda.is_available(), reason="no CUDA device and the simulator is off")

SHAPE = dict(vocab=320, hidden=64, n_layers=2, n_heads=4, n_kv_heads=2, n_ff=128, ctx=256,
             n_expert=4, n_expert_used=2, n_ff_exp=64, n_ff_shexp=128)
RTX3060 = {"name": "NVIDIA GeForce RTX 3060", "compute_capability": "8.6", "mem_total": "12GiB"}
PROMPT = "hello world"
LOGIT_TOL = 0.02            # f16 KV cache (tests/test_gpu_offload.py: measured 0.002-0.005)


@pytest.fixture
def gpus(tmp_path, monkeypatch):
    def make(devices):
        path = tmp_path / "gpus.json"
        path.write_text(json.dumps(devices))
        monkeypatch.setenv("NUMALLM_FAKE_GPUS", str(path))

    return make


@pytest.fixture
def float_cpu(monkeypatch):
    monkeypatch.setenv("NUMALLM_KERNEL", "blas-tile")
    for t in nk.registered_types():
        unit = nk.get(t)
        if unit.calibrated:
            monkeypatch.setattr(unit, "_choice", None)


def moe(synth_dir, arch):
    return cached_model(synth_dir, arch=arch, qtype="Q8_0", shape=SHAPE)


def check_hybrid(path, request, n_tok=3, n_threads=1, **load):
    """Generate on the CPU and with `request`; compare tokens, logits, bytes and the PCIe
    traffic of one decode step. Returns the offloaded LLM."""
    with numallm.load(path, n_ctx=32, n_threads=1) as ref:
        want = ref.generate(PROMPT, max_tokens=n_tok, temperature=0).tokens
        seq = ref.tokenize(PROMPT) + want[:-1]
        logits = ref.logits(seq)
    llm = numallm.load(path, n_ctx=32, n_threads=n_threads, offload=request, **load)
    off = llm.offload
    assert off.applied, off.reason
    assert llm.generate(PROMPT, max_tokens=n_tok, temperature=0).tokens == want
    assert float(np.max(np.abs(llm.logits(seq) - logits))) < LOGIT_TOL
    for row in off.compare():                    # the plan's bytes are the executor's
        assert row["actual"] == row["predicted"], row
    assert off.processor(llm.model) == off.plan.processor()
    assert off.gpu_share(llm.model) == pytest.approx(off.plan.gpu_share(), abs=1e-12)
    # one decode step (T = 1) copies what the plan says crosses PCIe per token
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


def test_cpu_moe_keeps_experts_on_the_host_and_equals_cpu(synth_dir, gpus, float_cpu):
    gpus([RTX3060])
    llm = check_hybrid(moe(synth_dir, "qwen3moe"), OffloadRequest(gpu_layers="all", cpu_moe=True))
    off = llm.offload
    blk = llm.model.blk[1].block
    assert type(blk.attn_q).__name__ == "DeviceLinear" and type(blk.ffn_gate_inp).__name__ == "DeviceLinear"
    assert type(blk.ffn_gate_exps).__name__ == "ExpertLinear"          # still the host's tensor
    assert all(len(u.host_tensors) == 3 for u in off.plan.layers)
    from numallm.gpu import hybrid

    st = hybrid.stats(off.gpus[0])
    assert st.calls > 0 and st.kind.startswith("pinned") and st.launches_beside == 0   # nothing to overlap
    s = off.summary(llm.model)
    assert s.startswith("PROCESSOR  ") and "(bytes); time " in s and "routed experts on the CPU" in s
    assert "blk.0-1 GPU 0" in s


@pytest.mark.slow
def test_qwen2moe_shared_expert_runs_while_the_cpu_runs_the_experts(synth_dir, gpus, float_cpu):
    gpus([RTX3060])
    llm = check_hybrid(moe(synth_dir, "qwen2moe"),
                       OffloadRequest(gpu_layers="all", tensor_overrides=(("exps", "CPU"),)))
    from numallm.gpu import hybrid

    st = hybrid.stats(llm.offload.gpus[0])
    # the shared expert's kernels (gate/up already launched with the router; swiglu, down, the
    # sigmoid gate) were launched after the experts went to the CPU worker and before their sum
    # was read back: 3 per MoE block call
    assert st.launches_beside == 3 * st.calls
    assert 0 <= llm.offload.times()["overlap"] <= llm.offload.times()["experts"]


@pytest.mark.slow
def test_qwen2moe_whole_blocks_run_their_experts_on_the_gpu(synth_dir, gpus, float_cpu):
    gpus([RTX3060])
    llm = check_hybrid(moe(synth_dir, "qwen2moe"), OffloadRequest(gpu_layers="all"))
    assert all(not u.host_tensors for u in llm.offload.plan.layers) and llm.offload.plan.devices[0].experts
    assert type(llm.model.blk[0].block.ffn_gate_exps).__name__ == "DeviceExperts"
    assert llm.offload.gpus[0].stage is None             # nothing ran on the CPU worker


@pytest.mark.slow
def test_auto_on_a_small_gpu_mixes_gpu_and_cpu_experts(synth_dir, gpus, float_cpu):
    """A GPU with room for every block's dense part, the head, and one block's experts: auto
    puts blk.1's experts on the GPU (run by numallm.gpu.experts) and keeps blk.0's on the CPU."""
    path = moe(synth_dir, "qwen3moe")
    dev = GpuDevice(0, RTX3060["name"], (8, 6), 12 << 30, 12 << 30, 360.0, None, None)
    f = GGUFFile(path)
    whole = make_plan(f, 32, OffloadRequest(gpu_layers="all", reserve_bytes=0), [dev]).devices[0]
    dense = make_plan(f, 32, OffloadRequest(gpu_layers="all", cpu_moe=True, reserve_bytes=0), [dev]).devices[0]
    one_block = (whole.weights - dense.weights) // 2
    room = dense.total + one_block + (whole.buffers - dense.buffers) + 1024
    gpus([dict(RTX3060, mem_free=room)])
    llm = check_hybrid(path, OffloadRequest(gpu_layers="auto", reserve_bytes=0))
    plan = llm.offload.plan
    assert [len(u.host_tensors) for u in plan.layers] == [3, 0] and plan.output.device == 0
    assert type(llm.model.blk[1].block.ffn_up_exps).__name__ == "DeviceExperts"
    assert type(llm.model.blk[0].block.ffn_up_exps).__name__ == "ExpertLinear"
    assert any("as --n-cpu-moe 1" in n for n in plan.notes)


@pytest.mark.slow
def test_hybrid_experts_are_node_sharded_under_numa_shard(synth_dir, gpus, float_cpu):
    gpus([RTX3060])
    path = moe(synth_dir, "qwen3moe")
    llm = check_hybrid(path, OffloadRequest(gpu_layers="all", n_cpu_moe=2), n_threads=None, numa="shard",
                       virtual_nodes=2)
    assert len(llm.loaded.placement.groups) == 2
    for layer in llm.model.blk:
        assert type(layer.block.ffn_gate_exps).__name__ == "ShardedExperts"
        assert len(layer.block.ffn_down_exps.parts) == 2


# -- the kernels hybrid and GPU experts add (numallm.gpu.cuda_ops) ---------------------------------

def test_sigmoid_gate_axpy_and_zero_kernels_match_numpy():
    from numallm import ops
    from numallm.gpu import cuda_kernels as ck, cuda_ops as co

    launch = ck.Launch.coverage()            # launch shapes that exercise the reductions' edges
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3, 20)).astype(np.float32)
    h = rng.standard_normal((3, 37)).astype(np.float32)
    w = rng.standard_normal(37).astype(np.float32)
    out = cuda.to_device(np.zeros_like(x))
    co.sigmoid_gate(cuda.to_device(x), cuda.to_device(h), cuda.to_device(w), out, 2, launch)
    got, want = out.copy_to_host(), ops.sigmoid_gate(x, h, w)      # the host op (numpy)
    assert np.allclose(got[:2], want[:2], rtol=1e-5, atol=1e-6) and not got[2].any()
    acc = cuda.to_device(x.copy())
    co.axpy_row(acc, cuda.to_device(h[1:2, :20]), 0.5, 2, launch)
    want = x.copy()
    want[2] += np.float32(0.5) * h[1, :20]
    assert np.array_equal(acc.copy_to_host(), want)
    co.zero(acc, 2, launch)
    got = acc.copy_to_host()
    assert not got[:2].any() and np.array_equal(got[2], want[2])


@pytest.mark.slow
def test_run_cpu_moe_verbose_says_where_it_ran(synth_dir, gpus, capsys):
    from numallm.cli import main

    gpus([RTX3060])
    path = str(moe(synth_dir, "qwen3moe"))
    assert main(["run", path, "hello", "-n", "2", "--temp", "0", "-ngl", "all", "--cpu-moe", "-v"]) == 0
    err = capsys.readouterr().err
    assert "blk.0-1 + output (routed experts of blk.0-1 on the CPU) on GPU 0" in err
    assert "PROCESSOR  " in err and "(bytes); time " in err and "routed experts on the CPU" in err
