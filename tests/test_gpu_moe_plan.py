"""The GPU planner on MoE models: tensor-level offload (--cpu-moe, --n-cpu-moe, -ot REGEX=DEVICE),
-ngl auto's dense-parts-first policy, the PCIe traffic per token and the predicted decode speed,
for a Qwen3-235B-A22B-shape and a DeepSeek-V3-shape model on a 2-node fixture topology (dual EPYC
9654) with one 24 GB GPU (an RTX 4090 given as data).

The big models are "shape-only" GGUFs: a valid header (the architecture's own declaration,
Model.declared, with real-size shapes) whose tensor data is a hole in a sparse file, so the
planner reads real byte counts without any weights being written. Expected bytes, traffic and
speeds are recomputed here from the shapes and GGML block sizes, independently of numallm.gpu.
"""
from __future__ import annotations

import json
from pathlib import Path

import gguf
import pytest
from gguf import GGMLQuantizationType as QT

from numallm import synth
from numallm.cli import main
from numallm.commands.plan import render
from numallm.gguf_file import GGUFFile
from numallm.gpu import GpuDevice, GpuError, OffloadRequest
from numallm.models import get_module
from numallm.placement import ModelSpec, Request
from numallm.placement import make_plan as place
from numallm.topology import discover

GIB = 1 << 30
FIXTURES = Path(__file__).parent / "fixtures" / "topo"
RTX4090 = GpuDevice(0, "NVIDIA GeForce RTX 4090", (8, 9), 24 * GIB, int(23.5 * GIB), 1008.0, 0, None)
N_CTX = 4096


def write_header_only(path: Path, arch: str, args, meta, types=None) -> GGUFFile:
    """A GGUF of `arch` with `args`' shapes (Model.declared) and sparse data: matrices and
    experts Q4_K, the embedding and the output Q6_K, vectors and the router F32, but for the
    names in `types`. meta(w) adds the metadata."""
    model = get_module(arch).Model
    w = gguf.GGUFWriter(str(path), arch)
    meta(w)
    def tensors():
        for name, t in model.declared(args):
            if name == "rope_freqs.weight":
                continue
            qt = (QT.F32 if t.kind in ("norm", "bias") or name.endswith("ffn_gate_inp.weight")
                  else QT.Q6_K if name in ("token_embd.weight", "output.weight") else QT.Q4_K)
            yield name, args.dims(t.shape), (types or {}).get(name, qt)

    synth.write_sparse(w, tensors())
    return GGUFFile(path)


def qwen3moe(path, n_layer=94, types=None) -> GGUFFile:
    """Qwen3-235B-A22B's shape (n_layer blocks), header only."""
    from numallm.models.qwen3moe import ModelArgs

    a = ModelArgs(arch="qwen3moe", n_vocab=151936, n_embd=4096, n_layer=n_layer, n_ff=12288, n_head=64,
                  n_head_kv=4, head_dim=128, rope_dim=128, n_expert=128, n_expert_used=8,
                  n_ff_exp=1536, n_ff_shexp=12288)

    def meta(w):
        w.add_context_length(40960)
        w.add_embedding_length(4096)
        w.add_block_count(n_layer)
        w.add_feed_forward_length(12288)
        w.add_head_count(64)
        w.add_head_count_kv(4)
        w.add_key_length(128)
        w.add_value_length(128)
        w.add_layer_norm_rms_eps(1e-6)
        w.add_rope_freq_base(1e6)
        w.add_expert_count(128)
        w.add_expert_used_count(8)
        w.add_expert_feed_forward_length(1536)

    return write_header_only(path, "qwen3moe", a, meta, types)


@pytest.fixture(scope="module")
def qwen235(tmp_path_factory):
    return qwen3moe(tmp_path_factory.mktemp("shape") / "qwen3-235b-a22b.gguf")


@pytest.fixture(scope="module")
def deepseek_v3(tmp_path_factory):
    from numallm.synth_deepseek import DeepseekShape, model_args

    s = DeepseekShape(vocab=129280, hidden=7168, n_layers=61, n_heads=128, n_ff=18432, q_lora=1536,
                      kv_lora=512, qk_nope=128, qk_rope=64, v_head=128, n_expert=256, n_expert_used=8,
                      n_ff_exp=2048, n_shared=1, dense_lead=3, gating=2, weights_norm=True,
                      weights_scale=2.5, groups=8, groups_used=4, ctx=163840)
    a = model_args(s)

    def meta(w):
        k = "deepseek2."
        w.add_context_length(s.ctx)
        w.add_embedding_length(s.hidden)
        w.add_block_count(s.n_layers)
        w.add_feed_forward_length(s.n_ff)
        w.add_head_count(s.n_heads)
        w.add_head_count_kv(s.n_heads)
        w.add_layer_norm_rms_eps(s.rms_eps)
        w.add_rope_freq_base(s.rope_base)
        w.add_rope_dimension_count(s.qk_rope)
        w.add_key_length(s.qk_nope + s.qk_rope)
        w.add_value_length(s.v_head)
        for key, v in (("attention.q_lora_rank", s.q_lora), ("attention.kv_lora_rank", s.kv_lora),
                       ("leading_dense_block_count", s.dense_lead), ("expert_count", s.n_expert),
                       ("expert_used_count", s.n_expert_used), ("expert_feed_forward_length", s.n_ff_exp),
                       ("expert_shared_count", s.n_shared), ("expert_gating_func", s.gating),
                       ("expert_group_count", s.groups), ("expert_group_used_count", s.groups_used)):
            w.add_uint32(k + key, v)
        w.add_float32(k + "expert_weights_scale", s.weights_scale)
        w.add_bool(k + "expert_weights_norm", s.weights_norm)

    return write_header_only(tmp_path_factory.mktemp("shape") / "deepseek-v3.gguf", "deepseek2", a, meta)


@pytest.fixture(scope="module")
def two_nodes():
    return discover(str(FIXTURES / "epyc9654_nps1"), use_libs=False)


def tensors_of(f: GGUFFile, i: int) -> dict:
    return {n: t for n, t in f.tensors.items() if n.startswith(f"blk.{i}.")}


def expert_names(f: GGUFFile) -> set[str]:
    """The routed expert tensors: 3-D (expert, rows, cols) in the file."""
    return {n for n, t in f.tensors.items() if len(t.shape) == 3 and n.startswith("blk.")}


def plan_on(f, two_nodes, **request):
    spec = ModelSpec.from_gguf(f)
    return spec, place(spec, two_nodes, Request(numa="shard", n_ctx=N_CTX, offload=OffloadRequest(**request)),
                       [RTX4090])


# -- flags -----------------------------------------------------------------------------------------

def test_override_flags_parse_and_bad_values_are_one_line(tmp_path, monkeypatch, capsys):
    from numallm.commands.common import _overrides

    assert _overrides("exps=CPU,blk\\.1\\.=cuda0") == [("exps", "CPU"), ("blk\\.1\\.", "CUDA0")]
    assert _overrides("a=b=CPU") == [("a=b", "CPU")]          # the last '=' splits
    with pytest.raises(GpuError, match="the device is CPU or CUDA0"):
        OffloadRequest(tensor_overrides=(("exps", "GPU"),))
    with pytest.raises(GpuError, match="not a regular expression"):
        OffloadRequest(tensor_overrides=(("(", "CPU"),))
    with pytest.raises(GpuError, match="--n-cpu-moe"):
        OffloadRequest(n_cpu_moe=-1)
    assert not OffloadRequest(tensor_overrides=(("exps", "CPU"),)).wants_gpu
    assert OffloadRequest(tensor_overrides=(("blk", "CUDA0"),)).wants_gpu


# -- policy on the 235B shape ------------------------------------------------------------------------

def test_experts_of_a_type_the_gpu_lacks_stay_on_the_cpu_with_their_block_on_the_gpu(tmp_path, two_nodes):
    f = qwen3moe(tmp_path / "iq.gguf", n_layer=3, types={"blk.1.ffn_down_exps.weight": QT.IQ4_NL})
    _, full = plan_on(f, two_nodes, gpu_layers="all")
    assert [len(u.host_tensors) for u in full.gpu.layers] == [0, 3, 0]
    assert all(u.device == 0 for u in full.gpu.layers)
    assert any("IQ4_NL is not a GPU type" in n for n in full.gpu.notes)


def test_ot_cuda_offloads_the_matching_blocks_to_that_gpu(qwen235, two_nodes):
    _, full = plan_on(qwen235, two_nodes, tensor_overrides=((r"blk\.9[23]\.", "CUDA0"),))
    assert [u.index for u in full.gpu.layers if u.device == 0] == [92, 93]
    assert full.gpu.output.device is None and not full.gpu.layers[93].host_tensors


def test_cpu_moe_keeps_every_blocks_experts_on_the_host(qwen235, two_nodes):
    exps = expert_names(qwen235)
    for request in (dict(gpu_layers="all", cpu_moe=True), dict(gpu_layers="all", tensor_overrides=(("exps", "CPU"),))):
        spec, full = plan_on(qwen235, two_nodes, **request)
        plan = full.gpu
        assert all(u.device == 0 for u in plan.layers) and plan.output.device == 0
        for u in plan.layers:
            ts = tensors_of(qwen235, u.index)
            assert set(u.host_tensors) == {n for n in ts if n in exps}
            assert u.weight_bytes == sum(t.nbytes for n, t in ts.items() if n not in exps)
        d = plan.devices[0]
        dense = sum(t.nbytes for n, t in qwen235.tensors.items() if n.startswith("blk.") and n not in exps)
        assert d.weights == dense + qwen235.tensors["output.weight"].nbytes
        assert d.kv == 94 * 2 * N_CTX * 4 * 128 * 2            # f16 K and V of 4 KV heads of 128
        assert not d.experts
        # the host holds the experts (and token_embd, output_norm), split over the two nodes
        host = sum(qwen235.tensors[n].nbytes for n in exps) + qwen235.tensors["token_embd.weight"].nbytes \
            + qwen235.tensors["output_norm.weight"].nbytes
        assert plan.host_weights == host and abs(full.host_weights - host) <= 2
        assert abs(full.nodes[0].weights - full.nodes[1].weights) < 0.01 * host
        assert full.host_kv == 0


def test_n_cpu_moe_and_one_block_pattern(qwen235, two_nodes):
    _, full = plan_on(qwen235, two_nodes, gpu_layers="all", n_cpu_moe=90)
    kept = [u.index for u in full.gpu.layers if u.host_tensors]
    assert kept == list(range(90)) and full.gpu.devices[0].experts
    assert any("--n-cpu-moe 90: the routed experts of blk.0-89" in n for n in full.gpu.notes)
    # a pattern naming one expert tensor of a block keeps the block's three together
    _, full = plan_on(qwen235, two_nodes, gpu_layers="all", n_cpu_moe=92,
                      tensor_overrides=((r"blk\.93\.ffn_down_exps", "CPU"),))
    assert [u.index for u in full.gpu.layers if u.host_tensors] == [0, *range(1, 92), 93]
    assert len(full.gpu.layers[93].host_tensors) == 3
    assert any("stay together" in n for n in full.gpu.notes)


def test_auto_puts_dense_parts_first_then_experts_from_the_end(qwen235, two_nodes):
    spec, full = plan_on(qwen235, two_nodes, gpu_layers="auto")
    plan = full.gpu
    d = plan.devices[0]
    assert all(u.device == 0 for u in plan.layers) and plan.output.device == 0
    on_gpu = [u.index for u in plan.layers if not u.host_tensors]
    first = on_gpu[0]
    assert on_gpu == list(range(first, 94)) and 0 < first < 94     # experts of the last blocks
    # it is full: the next block's experts would not fit under the reserve
    exp_bytes = sum(qwen235.tensors[n].nbytes for n in tensors_of(qwen235, first - 1) if n in expert_names(qwen235))
    assert d.total <= d.usable < d.total + exp_bytes
    assert any(f"the experts of blk.0-{first - 1} stay on the CPU (as --n-cpu-moe {first})" in n
               for n in plan.notes)
    text = "\n".join(render(full, "qwen3moe", spec, two_nodes))
    assert f"(routed experts of blk.0-{first - 1} on the CPU)" in text and "PCIe per decoded token" in text
    assert "predicted decode:" in text


# -- traffic and speed arithmetic ------------------------------------------------------------------

def test_pcie_traffic_and_predicted_speed_from_bandwidths(qwen235, two_nodes):
    from numallm.gpu.traffic import PCIE_GBPS, PCIE_LATENCY_S, predict_plan

    spec, full = plan_on(qwen235, two_nodes, gpu_layers="all", n_cpu_moe=88)
    assert all(u.device == 0 for u in full.gpu.layers) and full.gpu.output.device == 0
    t = full.gpu.pcie
    row, logits, vocab = 4096 * 4, 128 * 4, 151936 * 4
    # enter the GPU once; every block sends its router logits down; 88 blocks also the normed
    # row down and the experts' sum up; the last row down for output_norm; the head: row up,
    # logits down
    assert t.up == row + 88 * row + row
    assert t.down == 94 * logits + 88 * row + row + vocab
    assert t.transfers == 1 + 94 + 2 * 88 + 1 + 2
    # weight reads per token: GPU = dense parts + 8/128 of the experts of blk.88-93 + head;
    # host = 8/128 of the experts of blk.0-87, split over the two nodes (in parallel)
    exps = expert_names(qwen235)
    dense = sum(t_.nbytes for n, t_ in qwen235.tensors.items() if n.startswith("blk.") and n not in exps)
    gpu_exp = sum(qwen235.tensors[n].nbytes for n in exps if int(n.split(".")[1]) >= 88)
    cpu_exp = sum(qwen235.tensors[n].nbytes for n in exps if int(n.split(".")[1]) < 88)
    gpu_s = (dense + gpu_exp * 8 / 128 + qwen235.tensors["output.weight"].nbytes) / 1008e9
    node_share = full.nodes[0].weights / (full.nodes[0].weights + full.nodes[1].weights)
    host_s = (cpu_exp * 8 / 128 + qwen235.tensors["output_norm.weight"].nbytes) * node_share / 300e9
    pcie_s = (t.up + t.down) / (PCIE_GBPS * 1e9) + t.transfers * PCIE_LATENCY_S
    p = predict_plan(full, spec, two_nodes)
    assert p.gpu_s[0] == pytest.approx(gpu_s, rel=1e-9)
    assert p.node_s[0] == pytest.approx(host_s, rel=1e-6)
    assert p.tok_s == pytest.approx(1 / (gpu_s + max(p.node_s.values()) + pcie_s), rel=1e-9)


# -- DeepSeek-V3: MLA blocks on the GPU, routed experts on the CPU ------------------------------------

def test_deepseek_v3_auto_puts_mla_router_and_shared_experts_on_the_gpu(deepseek_v3, two_nodes):
    spec, full = plan_on(deepseek_v3, two_nodes, gpu_layers="auto")
    plan = full.gpu
    d = plan.devices[0]
    exps = expert_names(deepseek_v3)
    assert all(u.device == 0 for u in plan.layers) and plan.output.device == 0
    kept = [u.index for u in plan.layers if u.host_tensors]
    assert kept and kept == list(range(3, kept[-1] + 1)) and kept[-1] < 60    # blk.0-2 are dense
    for u in plan.layers:
        ts = tensors_of(deepseek_v3, u.index)
        assert set(u.host_tensors) == ({n for n in ts if n in exps} if u.index in kept else set())
    # the latent cache, f16: 61 layers x (kv_lora_rank 512 + rope 64) x 2 bytes per position
    assert d.kv == 61 * N_CTX * (512 + 64) * 2
    assert d.total <= d.usable
    # PCIe per token: in once; the 58 MoE blocks' router logits down, the kept blocks' normed row
    # down and experts' sum up; the last row down; the head: row up, logits down
    row, t = 7168 * 4, plan.pcie
    assert t.up == row + len(kept) * row + row
    assert t.down == 58 * 256 * 4 + len(kept) * row + row + 129280 * 4
    assert t.transfers == 1 + 58 + 2 * len(kept) + 1 + 2
    text = "\n".join(render(full, "deepseek2", spec, two_nodes))
    assert "predicted decode:" in text and "GPU 0 NVIDIA GeForce RTX 4090" in text


# -- the command line ----------------------------------------------------------------------------------

def test_plan_command_with_cpu_moe(qwen235, tmp_path, monkeypatch, capsys):
    inv = tmp_path / "gpus.json"
    inv.write_text(json.dumps([{"name": "NVIDIA GeForce RTX 4090", "compute_capability": "8.9",
                                "mem_total": "24GiB", "mem_free": "23.5GiB"}]))
    monkeypatch.setenv("NUMALLM_FAKE_GPUS", str(inv))
    assert main(["plan", qwen235.path, "-c", "4096", "-ngl", "all", "--cpu-moe", "--numa", "off"]) == 0
    out = capsys.readouterr().out
    assert "(routed experts of blk.0-93 on the CPU)" in out and "PCIe per decoded token:" in out
    assert main(["plan", qwen235.path, "-c", "4096", "-ngl", "99", "-ot", "exps=CPU", "--json",
                 "--numa", "off"]) == 0
    j = json.loads(capsys.readouterr().out)
    assert j["request"]["tensor_overrides"] == ["exps=CPU"]
    assert len(j["layers"][0]["host_tensors"]) == 3 and j["pcie_per_token"]["transfers"] > 0
    with pytest.raises(SystemExit) as e:                          # argparse: one line, exit 2
        main(["plan", qwen235.path, "-ot", "exps"])
    assert e.value.code == 2 and "give REGEX=DEVICE" in capsys.readouterr().err
    assert main(["plan", qwen235.path, "-ot", "blk\\.1\\.=CUDA0,blk\\.2\\.=CUDA1"]) == 1
    assert "more than one GPU" in capsys.readouterr().err
