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
import os
import subprocess
import sys
import textwrap

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


def check(path, request, n_tok=3, n_threads=1, **load):
    """Generate on the CPU and with `request`; compare tokens, logits, bytes, the PROCESSOR
    split and one decode step's PCIe copies. Returns the offloaded LLM."""
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

    st = hybrid.stats(off.gpus[0])
    # the shared expert's swiglu and down product were launched after the routed experts went
    # to the CPU worker and before their sum was read: 2 per MoE block call
    assert st.calls > 0 and st.launches_beside == 2 * st.calls
    assert "routed experts on the CPU" in off.summary(llm.model)



def test_v2_lite_one_gpu_layer(synth_dir, gpus, float_cpu):
    """-ngl 1: the last block (MoE, experts included) on the GPU after the dense MLA block on the
    CPU: the stream goes up once and comes down for output_norm; the head stays."""
    llm = check(cached_deepseek(synth_dir, "F16", V2), OffloadRequest(gpu_layers=1))
    off = llm.offload
    assert off.gpu_layers() == [1] and off.head is None
    assert off.plan.layers[0].device is None and off.plan.host_kv == llm.args.kv_bytes(32) // 2
    assert type(llm.model.blk[1].attention).__name__ == "DeviceMLA"


@pytest.mark.slow
def test_v3_auto_on_a_small_gpu_mixes_gpu_and_cpu_experts(synth_dir, gpus, float_cpu, monkeypatch,
                                                          tmp_path):
    """-ngl auto with room for every block's dense part, the head and one block's experts:
    blk.2's experts on the GPU, blk.1's on the CPU (blk.0 is dense), as test_gpu_hybrid's qwen3moe."""
    from numallm.gguf_file import GGUFFile
    from numallm.gpu import GpuDevice, make_plan

    path = cached_deepseek(synth_dir, "F16", dataclasses.replace(V3, n_layers=3))
    dev = GpuDevice(0, RTX3060["name"], (8, 6), 12 << 30, 12 << 30, 360.0, None, None)
    f = GGUFFile(path)
    whole = make_plan(f, 32, OffloadRequest(gpu_layers="all", reserve_bytes=0), [dev]).devices[0]
    dense = make_plan(f, 32, OffloadRequest(gpu_layers="all", cpu_moe=True, reserve_bytes=0), [dev]).devices[0]
    one_block = (whole.weights - dense.weights) // 2
    inv = tmp_path / "small.json"
    inv.write_text(json.dumps([dict(RTX3060, mem_free=dense.total + one_block + whole.buffers - dense.buffers
                                    + 1024)]))
    monkeypatch.setenv("NUMALLM_FAKE_GPUS", str(inv))
    llm = check(path, OffloadRequest(gpu_layers="auto", reserve_bytes=0))
    plan = llm.offload.plan
    assert [len(u.host_tensors) for u in plan.layers] == [0, 3, 0] and plan.output.device == 0
    assert type(llm.model.blk[2].block.ffn_up_exps).__name__ == "DeviceExperts"
    assert type(llm.model.blk[1].block.ffn_up_exps).__name__ == "ExpertLinear"


def test_run_ot_exps_cpu_verbose_says_where_it_ran(synth_dir, gpus, capsys):
    from numallm.cli import main

    path = str(cached_deepseek(synth_dir, "F16", V3))
    assert main(["run", path, "hello", "-n", "2", "--temp", "0", "-ngl", "99", "-ot", "exps=CPU", "-v"]) == 0
    err = capsys.readouterr().err
    assert "blk.0-1 + output (routed experts of blk.1 on the CPU) on GPU 0" in err
    assert "PROCESSOR  " in err and "routed experts on the CPU" in err


def test_v3_hybrid_experts_are_node_sharded_under_numa_shard(synth_dir, gpus, float_cpu):
    """--numa shard --virtual-nodes 2 with --cpu-moe: the GPU block's host experts are split over
    the two nodes (one copy), and the tokens are still the CPU engine's."""
    llm = check(cached_deepseek(synth_dir, "F16", V3), OffloadRequest(gpu_layers="all", cpu_moe=True),
                numa="shard", virtual_nodes=2, n_threads=None)
    assert len(llm.loaded.placement.groups) == 2
    blk = llm.model.blk[1].block
    assert type(blk.ffn_gate_exps).__name__ == "ShardedExperts" and len(blk.ffn_down_exps.parts) == 2

def test_the_comparison_catches_mla_bugs(synth_dir, gpus, float_cpu, monkeypatch):
    """The bound can fail: the GPU MLA without the query's rotated part, or with a wrong norm of
    the latent, moves the logits far past LOGIT_TOL (and the GPU MLA is what ran)."""
    from numallm.gpu import cuda_mla

    path = cached_deepseek(synth_dir, "F16", V2)
    with numallm.load(path, n_ctx=32, n_threads=1) as ref:
        seq = ref.tokenize(PROMPT)
        want = ref.logits(seq)
    latent = cuda_mla.latent
    for name, broken in (("query_rope", lambda *a, **k: None),                  # no rotated part
                         ("latent", lambda kva, w, eps, *a: latent(kva, w, 1e3, *a))):  # eps 1e3
        with monkeypatch.context() as m:
            m.setattr(cuda_mla, name, broken)
            with numallm.load(path, n_ctx=32, n_threads=1, offload=OffloadRequest(gpu_layers=1)) as llm:
                assert type(llm.model.blk[1].attention).__name__ == "DeviceMLA"
                got = llm.logits(seq)
                assert llm.offload.layers[1].launches > 0
        assert float(np.max(np.abs(got - want))) > 10 * LOGIT_TOL, name


# -- the per-head kernels (numallm.gpu.cuda_mla) against numpy, every GPU type -------------------

@pytest.mark.parametrize("qtype", ["F32", "F16", "Q4_0", "Q8_0", "Q4_K", "Q6_K"])
def test_head_products_match_numpy(qtype):
    """head_mm (out = W_h x_h) and head_mm_t (out = W_h^T x_h) over rows row0.. of each head's
    block of a stored tensor, inputs and outputs at head strides and offsets, as the MLA uses
    them; launch shapes with several blocks (grid-stride loops)."""
    from numallm.gguf_file import GGMLQuantizationType as QT, reference_dequantize
    from numallm.gpu import cuda_kernels as ck, cuda_mla as cm
    from test_gpu_kernels import weights           # raw rows, K-quants as random valid blocks

    qt = QT[qtype]
    launch = ck.Launch.coverage()
    rng = np.random.default_rng(7)
    k = 256 if qt in (QT.Q4_K, QT.Q6_K) else 64
    heads, per, row0, n, tok = 2, 5, 2, 3, 2      # 2 heads of 5 rows; rows 2..4 of each used
    raw = weights(qt, heads * per, k, rng)
    w = reference_dequantize(raw, qt).reshape(heads, per, k)[:, row0:row0 + n]   # (H, n, k)
    m = cm.HeadMatrix(qt, cuda.to_device(ck.device_layout(qt, raw)), k, per, row0, n)
    with ck.simulator_pace():
        xs, xo = k + 3, 1                          # x: head h's k inputs at h * xs + 1
        x = rng.standard_normal((tok, heads * xs)).astype(np.float32)
        out = cuda.to_device(np.zeros((tok, heads * (n + 2)), np.float32))
        m.apply(cuda.to_device(x), out, tok, heads, xs, xo, n + 2, 2, 0.5, launch)
        got = out.copy_to_host().reshape(tok, heads, n + 2)[..., 2:]
        want = 0.5 * np.einsum("hnk,thk->thn", w.astype(np.float64),
                               x.reshape(tok, heads, xs)[..., xo:xo + k].astype(np.float64))
        assert np.allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
        xt = rng.standard_normal((tok, heads * (n + 1))).astype(np.float32)       # n inputs at + 1
        out = cuda.to_device(np.zeros((tok, heads * k), np.float32))
        m.apply_t(cuda.to_device(xt), out, tok, heads, n + 1, 1, k, 0, 2.0, launch)
        got = out.copy_to_host().reshape(tok, heads, k)
        want = 2.0 * np.einsum("hnk,thn->thk", w.astype(np.float64),
                               xt.reshape(tok, heads, n + 1)[..., 1:].astype(np.float64))
        assert np.allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_latent_and_query_rope_kernels_match_the_cpu_ops():
    """The latent rows (rms_norm of the first lat values, RoPE of the rest, in an f16 cache) and
    the query's rotated part against ops.rms_norm and ops.Rope (YaRN: position scales and
    magnitude), at positions 5.. (T = 3)."""
    from numallm import ops
    from numallm.gpu import cuda_kernels as ck, cuda_mla as cm

    launch = ck.Launch.coverage()
    rng = np.random.default_rng(11)
    lat, rope, t, pos0, hn, nope = 40, 8, 3, 5, 2, 6
    corr = ops.yarn_corr_dims(rope, 32, 10000.0, 32.0, 1.0)
    r = ops.Rope(rope, 10000.0, False, 0.25, ext_factor=1.0, corr_dims=corr, mscale=1.2)
    table = cuda.to_device((r.inv_freq * r.pos_scale).astype(np.float64))
    kva = rng.standard_normal((t, lat + rope)).astype(np.float32)
    w = rng.standard_normal(lat).astype(np.float32)
    kc = cuda.to_device(np.zeros((1, 16, lat + rope), np.float16))
    with ck.simulator_pace():
        cm.latent(cuda.to_device(kva), cuda.to_device(w), 1e-6, kc, pos0, t, lat, rope, table, False,
                  r.mscale, launch)
        got = kc.copy_to_host()[0]
        k_pe = np.ascontiguousarray(kva[:, None, lat:])
        r(k_pe, pos0)
        want = np.concatenate([ops.rms_norm(kva[:, :lat], w, 1e-6), k_pe[:, 0]], axis=1)
        assert not got[:pos0].any() and not got[pos0 + t:].any()
        assert np.allclose(got[pos0:pos0 + t], want.astype(np.float16).astype(np.float32), rtol=2e-3, atol=2e-3)
        hd = nope + rope
        q = rng.standard_normal((t, hn * hd)).astype(np.float32)
        qc = cuda.to_device(np.zeros((t, hn * (lat + rope)), np.float32))
        cm.query_rope(cuda.to_device(q), qc, t, hn, hd, nope, lat, rope, pos0, table, False, r.mscale,
                      3.0, launch)
        got = qc.copy_to_host().reshape(t, hn, lat + rope)
        q_pe = np.ascontiguousarray(q.reshape(t, hn, hd)[..., nope:])
        r(q_pe, pos0)
        assert not got[..., :lat].any()
        assert np.allclose(got[..., lat:], q_pe * np.float32(3.0), rtol=1e-5, atol=1e-5)


PTX_SCRIPT = textwrap.dedent("""
    import sys, types
    from numba import cuda, types as nt
    if getattr(cuda, "implementation", "") != "NVIDIA":
        print("SKIP the compile check needs NVIDIA's numba-cuda (the gpu extra)")
        sys.exit(0)
    cc, why = None, ""
    for want in ((6, 1), (7, 5)):
        try:
            cuda.compile_ptx(lambda a: None, (nt.float32[::1],), cc=want)
            cc = want
            break
        except Exception as e:
            why = f"{type(e).__name__}: {e}".replace("\\\\n", " ")
    if cc is None:
        print("SKIP", why)
        sys.exit(0)
    import numba.cuda.dispatcher as disp
    disp.get_current_device = lambda: types.SimpleNamespace(compute_capability=cc)
    from numallm.gpu import cuda_mla as cm
    f32, f64, i64, b = nt.float32, nt.float64, nt.int64, nt.boolean
    a2 = f32[:, ::1]
    sigs = []
    for mm, mm_t, blocked in cm._HEAD.values():
        for w in ((nt.uint8,) if blocked else (f32, nt.float16)):
            sigs += [(k.py_func, (w[:, ::1], a2, a2) + (i64,) * 10 + (f32,)) for k in (mm, mm_t)]
    for kv in (f32, nt.float16):
        sigs.append((cm._latent.py_func, (a2, f32[::1], f64, kv[:, :, ::1], i64, i64, i64, i64,
                                          f64[::1], b, f64)))
    sigs.append((cm._query_rope.py_func, (a2, a2) + (i64,) * 7 + (f64[::1], b, f64, f32)))
    seen = set()
    for fn, sig in sigs:
        if (fn, sig) not in seen:
            seen.add((fn, sig))
            cuda.compile_ptx(fn, sig, cc=cc)
    print("OK", len(seen), "kernels for sm_%d%d" % cc)
""")


def test_mla_kernels_compile_for_a_real_gpu():
    """Every MLA kernel, for every argument type numallm.gpu.mla passes, through NVVM to PTX (the
    simulator checks no types); skips without numba-cuda (the gpu extra)."""
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="0")
    r = subprocess.run([sys.executable, "-c", PTX_SCRIPT], capture_output=True, text=True, env=env,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    if r.stdout.startswith("SKIP"):
        pytest.skip(r.stdout.strip()[5:300])
    assert r.stdout.startswith("OK"), r.stdout
