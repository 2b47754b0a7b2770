"""The offload planner on GPU inventories given as data: its decisions and its byte counts.

Byte counts are recomputed here, independently of numallm.gpu.plan: tensor bytes from the GGUF
shapes and GGML block sizes, the KV cache and buffer sizes from their formulas written out.

Real-size models (a 12B-like shape, 40 blocks) are "shape-only" GGUFs: a valid header whose tensor
data is a hole in a sparse file (a 7 GB file using a few KB of disk). The planner reads only tensor
sizes, so these give real byte counts without writing weights; the tiny synthetic model with real
weights covers the path a loader takes.
"""
from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QT

from numallm import synth
from numallm.cli import main
from numallm.gguf_file import GGUFFile
from numallm.gpu import GpuDevice, GpuError, OffloadRequest, make_plan
from numallm.synth import cached_model
from numallm.topology import discover

MIB, GIB = 1 << 20, 1 << 30
FIXTURES = Path(__file__).parent / "fixtures" / "topo"
# the 12B-like shape (Mistral-Nemo): head_dim 128 with 32 heads != hidden 5120 / 32
NEMO = dict(n_layer=40, hidden=5120, n_head=32, n_kv=8, head_dim=128, n_ff=14336, vocab=131072)


# -- independent arithmetic ------------------------------------------------------------------------

def stored(t) -> int:
    block, size = GGML_QUANT_SIZES[t.qtype]
    return int(np.prod(t.shape)) // block * size


def block_bytes(f: GGUFFile, i: int) -> int:
    return sum(stored(t) for n, t in f.tensors.items() if n.startswith(f"blk.{i}."))


def head_bytes(f: GGUFFile) -> int:
    """The output head on a GPU is its matrix (output_norm stays a host vector)."""
    return stored(f.tensors.get("output.weight") or f.tensors["token_embd.weight"])


def kv(n_ctx: int, elem: int, s=NEMO) -> int:
    return 2 * n_ctx * s["n_kv"] * s["head_dim"] * elem          # K and V of one block


def buffers(n_ctx: int, output: bool = False, n_batch: int = 512, s=NEMO) -> int:
    """Activation slots float32 (T rows): 4 of hidden, 2 of q_dim, 4 of kv_dim, 3 of n_ff (what a
    block's forward holds at once, plan.ACTIVATIONS), 1 of vocab with the head; RoPE frequencies
    float64. No score matrix: attention streams."""
    t = min(n_batch, n_ctx)
    q, k = s["n_head"] * s["head_dim"], s["n_kv"] * s["head_dim"]
    floats = 4 * t * s["hidden"] + 2 * t * q + 4 * t * k + 3 * t * s["n_ff"]
    return 4 * floats + 8 * (s["head_dim"] // 2) + (4 * t * s["vocab"] if output else 0)


# -- models and inventories ----------------------------------------------------------------------

def write_shape_only(path, wtype=QT.Q4_K, output=QT.Q6_K, tied=False, overrides=None, s=NEMO):
    """A llama GGUF of shape `s` whose tensor data is a sparse hole (see the module docstring)."""
    overrides = overrides or {}
    q, k = s["n_head"] * s["head_dim"], s["n_kv"] * s["head_dim"]
    h, ff = s["hidden"], s["n_ff"]
    specs = [("token_embd.weight", (s["vocab"], h), wtype)]
    for i in range(s["n_layer"]):
        p = f"blk.{i}."
        specs += [(p + "attn_norm.weight", (h,), QT.F32), (p + "attn_q.weight", (q, h), wtype),
                  (p + "attn_k.weight", (k, h), wtype), (p + "attn_v.weight", (k, h), wtype),
                  (p + "attn_output.weight", (h, q), wtype), (p + "ffn_norm.weight", (h,), QT.F32),
                  (p + "ffn_gate.weight", (ff, h), wtype), (p + "ffn_up.weight", (ff, h), wtype),
                  (p + "ffn_down.weight", (h, ff), wtype)]
    specs.append(("output_norm.weight", (h,), QT.F32))
    if not tied:
        specs.append(("output.weight", (s["vocab"], h), output))
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(131072)
    w.add_embedding_length(h)
    w.add_block_count(s["n_layer"])
    w.add_feed_forward_length(ff)
    w.add_head_count(s["n_head"])
    w.add_head_count_kv(s["n_kv"])
    w.add_key_length(s["head_dim"])
    w.add_value_length(s["head_dim"])
    w.add_rope_dimension_count(s["head_dim"])
    w.add_layer_norm_rms_eps(1e-5)
    synth.write_sparse(w, [(name, shape, overrides.get(name, t)) for name, shape, t in specs])
    return GGUFFile(path)


@pytest.fixture(scope="module")
def nemo(tmp_path_factory):
    """Uniform Q4_K blocks (every block the same size), Q6_K output."""
    return write_shape_only(tmp_path_factory.mktemp("shape") / "nemo-q4k.gguf")


@pytest.fixture(scope="module")
def nemo_mixed(tmp_path_factory):
    """Q4_K_M-like: attn_v and ffn_down Q6_K in every 4th block, so blocks differ in size."""
    over = {f"blk.{i}.{n}.weight": QT.Q6_K for i in range(0, 40, 4) for n in ("attn_v", "ffn_down")}
    return write_shape_only(tmp_path_factory.mktemp("shape") / "nemo-mixed.gguf", overrides=over)


@pytest.fixture(scope="module")
def tiny(synth_dir):
    return GGUFFile(cached_model(synth_dir, arch="llama", qtype="Q4_0", shape="tiny"))


def gpu(index, name, cc, total_gib, free_gib=None, gbps=None, node=None) -> GpuDevice:
    free = total_gib if free_gib is None else free_gib
    return GpuDevice(index, name, cc, int(total_gib * GIB), int(free * GIB), gbps, node, None)


M10_AND_3060S = [gpu(0, "Tesla M10", (5, 0), 8, 7.9, 83),
                 *(gpu(i, "NVIDIA GeForce RTX 3060", (8, 6), 12, 11.6, 360) for i in (1, 2, 3))]


def check_device_bytes(plan, f: GGUFFile, n_ctx: int, elem: int = 2, reserve: int = 512 * MIB):
    """Every GPU's weights, KV and buffers equal the independent sums, and fit its free memory."""
    n_layer = len(plan.layers)
    for i, d in plan.devices.items():
        blocks = [x for x in d.layers if x < n_layer]
        has_head = n_layer in d.layers
        assert d.weights == sum(block_bytes(f, b) for b in blocks) + (head_bytes(f) if has_head else 0)
        assert d.kv == len(blocks) * kv(n_ctx, elem)
        assert d.buffers == buffers(n_ctx, output=has_head)
        assert d.total == d.weights + d.kv + d.buffers <= d.device.mem_free - reserve
        assert [u.index for u in plan.layers if u.device == i] == blocks


# -- decisions -------------------------------------------------------------------------------------

def test_cpu_only_by_default_and_n_layers_from_the_end(tiny):
    devs = [gpu(0, "NVIDIA GeForce RTX 3060", (8, 6), 12)]
    p = make_plan(tiny, 256, OffloadRequest(), devs)
    assert all(u.device is None for u in p.layers) and p.devices == {} and p.processor() == "100% CPU"
    p = make_plan(tiny, 256, OffloadRequest(gpu_layers=2), devs)
    assert [u.device for u in p.layers] == [None, None, 0, 0] and p.output.device is None
    tiny_shape = dict(n_kv=2, head_dim=64)
    d = p.devices[0]
    assert d.weights == block_bytes(tiny, 2) + block_bytes(tiny, 3) and d.layers == (2, 3)
    assert d.kv == 2 * kv(256, 2, tiny_shape)
    all_weights = sum(stored(t) for t in tiny.tensors.values())
    assert p.host_weights == all_weights - d.weights             # nothing counted twice or lost
    assert p.host_kv == 2 * kv(256, 2, tiny_shape)                # CPU blocks: the default f16 K/V
    p32 = make_plan(tiny, 256, OffloadRequest(gpu_layers=2), devs, host_kv=("f32", "f32"))
    assert p32.host_kv == 2 * kv(256, 4, tiny_shape) and p32.devices[0].kv == d.kv
    assert p.gpu_share() == pytest.approx((d.weights + d.kv) / (d.weights + d.kv + p.host_bytes))


def test_m10_beside_three_3060s_is_skipped_and_the_3060s_fill_in_order(nemo_mixed):
    n_ctx = 131072           # long enough that one 3060 cannot hold all 40 blocks
    p = make_plan(nemo_mixed, n_ctx, OffloadRequest(gpu_layers="auto"), M10_AND_3060S)
    assert p.skipped == [(0, "compute capability 5.0 < 6.0, the minimum for numallm's GPU path "
                             "(--gpu-min-cc 5.0 to try it anyway)")]
    assert sorted(p.devices) == [1, 2, 3] and all(u.device is not None for u in p.layers)
    check_device_bytes(p, nemo_mixed, n_ctx)
    # contiguous runs from the end: GPU 1 holds the head and the last blocks, GPU 3 the first
    assert p.output.device == 1 and p.devices[1].layers[-1] == 40
    assert max(p.devices[3].layers) < min(p.devices[2].layers) < min(p.devices[1].layers)
    # fastest first, filled before moving on: the next block would not have fitted on GPU 1 or 2
    for i in (1, 2):
        d = p.devices[i]
        nxt = min(d.layers) - 1
        assert d.total + block_bytes(nemo_mixed, nxt) + kv(n_ctx, 2) > d.usable


def test_an_allowed_old_card_is_used_last_because_it_is_slowest(nemo):
    # 3060s busy with other work (6 GiB free each): allowed by --gpu-min-cc, the M10 takes the rest
    devs = [M10_AND_3060S[0], *(gpu(i, "NVIDIA GeForce RTX 3060", (8, 6), 12, 6, 360) for i in (1, 2, 3))]
    n_ctx, w = 65536, block_bytes(nemo, 0)
    p = make_plan(nemo, n_ctx, OffloadRequest(gpu_layers="all", min_compute_capability=(5, 0)), devs)
    per_3060 = (6 * GIB - 512 * MIB - buffers(n_ctx)) // (w + kv(n_ctx, 2))
    assert per_3060 == 13 and p.skipped == [] and p.output.device == 1
    # the head went first onto GPU 1, then blocks from the end: GPU 1, 2, 3 (3060s), the M10 last
    first2, first3 = 40 - len(p.devices[1].layers) + 1 - per_3060, None
    assert p.devices[2].layers == tuple(range(first2, first2 + per_3060))
    first3 = first2 - per_3060
    assert p.devices[3].layers == tuple(range(first3, first2))
    assert p.devices[0].layers == tuple(range(0, first3)) and first3 > 0
    check_device_bytes(p, nemo, n_ctx)


def test_one_old_card_means_cpu_only_with_the_reason(nemo):
    old = [gpu(0, "NVIDIA GeForce GTX 980", (5, 2), 4, 3.8)]
    p = make_plan(nemo, 4096, OffloadRequest(gpu_layers="auto"), old)
    assert p.devices == {} and p.processor() == "100% CPU"
    assert "compute capability 5.2 < 6.0" in p.skipped[0][1]
    assert any("no GPU is usable under the policy" in n for n in p.notes)
    p = make_plan(nemo, 4096, OffloadRequest(gpu_layers="auto", min_compute_capability=(5, 2)), old)
    assert p.devices[0].layers and p.skipped == []


def test_unequal_memory_fastest_first_not_fill_all(nemo):
    devs = [gpu(0, "Tesla T4", (7, 5), 16, 15.5, 320), gpu(1, "NVIDIA GeForce RTX 4090", (8, 9), 24, 23.5, 1008),
            gpu(2, "NVIDIA GeForce RTX 3060", (8, 6), 12, 11.5, 360)]
    p = make_plan(nemo, 4096, OffloadRequest(gpu_layers=10), devs)
    assert list(p.devices) == [1] and p.devices[1].layers == tuple(range(30, 40))
    assert any("GPU 0 (Tesla T4) is not needed" in n for n in p.notes)
    check_device_bytes(p, nemo, 4096)
    # a context long enough to need all three: 4090 first, then the 3060 (360 GB/s), the T4 last
    n_ctx, w = 262144, block_bytes(nemo, 0)
    p = make_plan(nemo, n_ctx, OffloadRequest(gpu_layers="all"), devs)
    per_3060 = (int(11.5 * GIB) - 512 * MIB - buffers(n_ctx)) // (w + kv(n_ctx, 2))
    assert per_3060 == 9 and len(p.devices[2].layers) == per_3060
    assert min(p.devices[1].layers) > max(p.devices[2].layers) > max(p.devices[0].layers)
    assert all(u.device is not None for u in p.layers) and p.output.device == 1
    check_device_bytes(p, nemo, n_ctx)


def test_four_8gb_cards_long_context_kv_per_device(nemo):
    devs = [gpu(i, "NVIDIA GeForce RTX 3070", (8, 6), 8, 7.8) for i in range(4)]
    w, usable = block_bytes(nemo, 0), int(7.8 * GIB) - 512 * MIB

    def fit(n_ctx, elem=2):
        return (usable - buffers(n_ctx)) // (w + kv(n_ctx, elem))

    # 4k: the whole model and the head fit on one card; the others are not needed
    p = make_plan(nemo, 4096, OffloadRequest(gpu_layers="auto"), devs)
    assert list(p.devices) == [0] and p.output.device == 0 and all(u.device == 0 for u in p.layers)
    check_device_bytes(p, nemo, 4096)
    # each device holds the KV cache of its own blocks: longer contexts spread over more cards
    p = make_plan(nemo, 32768, OffloadRequest(gpu_layers="auto"), devs)
    assert list(p.devices) == [0, 1] and len(p.devices[1].layers) == 40 - (len(p.devices[0].layers) - 1)
    check_device_bytes(p, nemo, 32768)
    n_ctx = 131072
    p = make_plan(nemo, n_ctx, OffloadRequest(gpu_layers="auto"), devs)
    assert fit(n_ctx) == 11 and [len(p.devices[i].layers) for i in (1, 2)] == [11, 11]
    assert all(u.device is not None for u in p.layers)
    check_device_bytes(p, nemo, n_ctx)
    # float32 K/V on the GPUs: 6 blocks per card, 24 of 40; the head and 16 blocks stay on the CPU
    p = make_plan(nemo, n_ctx, OffloadRequest(gpu_layers="auto", kv_dtype="f32"), devs)
    assert fit(n_ctx, 4) == 6 and [len(d.layers) for d in p.devices.values()] == [6] * 4
    assert [u.device for u in p.layers] == [None] * 16 + [3] * 6 + [2] * 6 + [1] * 6 + [0] * 6
    assert p.output.device is None and any("output head stays on the CPU" in n for n in p.notes)
    assert any("auto: 24 of 40 layers fit" in n for n in p.notes)
    check_device_bytes(p, nemo, n_ctx, elem=4)
    assert p.host_kv == 16 * kv(n_ctx, 2)                          # the CPU's default f16 K/V


def test_reserve_is_respected(nemo):
    devs = [gpu(i, "NVIDIA GeForce RTX 3070", (8, 6), 8, 7.8) for i in range(2)]
    n_ctx, w = 131072, block_bytes(nemo, 0)
    for reserve, want in ((512 * MIB, 11), (2 * GIB, 8), (5 * GIB, 4)):
        p = make_plan(nemo, n_ctx, OffloadRequest(gpu_layers="auto", reserve_bytes=reserve), devs)
        assert (int(7.8 * GIB) - reserve - buffers(n_ctx)) // (w + kv(n_ctx, 2)) == want
        assert [len(d.layers) for d in p.devices.values()] == [want, want]
        check_device_bytes(p, nemo, n_ctx, reserve=reserve)
    p = make_plan(nemo, n_ctx, OffloadRequest(gpu_layers="auto", reserve_bytes=8 * GIB), devs)
    assert p.devices == {} and all("not more than the 8.00 GiB reserve" in why for _, why in p.skipped)
    # room left after the reserve, but less than one block with its KV and the buffers: said per device
    p = make_plan(nemo, n_ctx, OffloadRequest(gpu_layers="auto", reserve_bytes=int(7.3 * GIB)), devs)
    assert p.devices == {} and len(p.skipped) == 2
    assert all("not even one layer fits" in why for _, why in p.skipped)


def test_gpus_and_exclude_gpus(nemo):
    devs = [gpu(i, "NVIDIA GeForce RTX 3060", (8, 6), 12, 11.5, 360) for i in range(4)]
    p = make_plan(nemo, 4096, OffloadRequest(gpu_layers=4, gpus=(2, 3)), devs)
    assert list(p.devices) == [2] and dict(p.skipped) == {0: "not in --gpus 2,3", 1: "not in --gpus 2,3"}
    p = make_plan(nemo, 4096, OffloadRequest(gpu_layers=4, exclude_gpus=(0,)), devs)
    assert list(p.devices) == [1] and p.skipped == [(0, "excluded by --exclude-gpus")]
    with pytest.raises(GpuError, match=r"--exclude-gpus 9: no GPU 9 here \(GPUs: 0,1,2,3;"):
        make_plan(nemo, 4096, OffloadRequest(gpu_layers=4, exclude_gpus=(9,)), devs)


def test_a_gpu_slower_than_the_cpu_is_skipped_unless_named(nemo):
    devs = [gpu(0, "NVIDIA GeForce RTX 3060", (8, 6), 12, 11.5, 360),
            gpu(1, "NVIDIA GeForce RTX 4090", (8, 9), 24, 23.5, 1008)]
    p = make_plan(nemo, 262144, OffloadRequest(gpu_layers="all"), devs, host_bandwidth=(400.0, "measured"))
    assert list(p.devices) == [1]
    assert "360 GB/s is below the CPU's 400 GB/s (measured)" in dict(p.skipped)[0]
    p = make_plan(nemo, 262144, OffloadRequest(gpu_layers="all", gpus=(0, 1)), devs,
                  host_bandwidth=(400.0, "measured"))
    assert sorted(p.devices) == [0, 1] and p.skipped == []


def test_offload_patterns_round_to_whole_blocks(nemo):
    devs = [gpu(0, "NVIDIA GeForce RTX 4090", (8, 9), 24, 23.5, 1008)]
    p = make_plan(nemo, 4096, OffloadRequest(offload=(r"blk\.(2[0-9])\..*",)), devs)
    assert [u.index for u in p.layers if u.device == 0] == list(range(20, 30)) and p.output.device is None
    check_device_bytes(p, nemo, 4096)
    p = make_plan(nemo, 4096, OffloadRequest(offload=(r"blk\.3[0-9]\.ffn_", r"^output")), devs)
    assert [u.index for u in p.layers if u.device == 0] == list(range(30, 40)) and p.output.device == 0
    assert any("matched only some tensors of 10 block(s)" in n and "whole blocks" in n for n in p.notes)
    check_device_bytes(p, nemo, 4096)
    p = make_plan(nemo, 4096, OffloadRequest(offload=("token_embd", "nothing_like_this")), devs)
    assert p.devices == {} and any("token_embd stays on the CPU" in n for n in p.notes)
    with pytest.raises(GpuError, match="not a regular expression"):
        OffloadRequest(offload=("blk.(",))
    with pytest.raises(GpuError, match="give one of them"):
        OffloadRequest(gpu_layers=3, offload=("blk",))


def test_unsupported_tensor_type_keeps_its_block_on_the_cpu(tmp_path):
    f = write_shape_only(tmp_path / "iq.gguf", overrides={"blk.39.ffn_down.weight": QT.IQ4_XS})
    devs = [gpu(0, "NVIDIA GeForce RTX 4090", (8, 9), 24, 23.5, 1008)]
    p = make_plan(f, 4096, OffloadRequest(gpu_layers=2), devs)
    assert [u.index for u in p.layers if u.device == 0] == [37, 38] and p.layers[39].device is None
    assert any("1 block(s) stay on the CPU: they hold IQ4_XS tensors" in n for n in p.notes)


def test_tied_output_head_copies_token_embd_to_the_gpu(tmp_path):
    f = write_shape_only(tmp_path / "tied.gguf", tied=True)
    devs = [gpu(0, "NVIDIA H200", (9, 0), 141, 139, 4800)]
    p = make_plan(f, 8192, OffloadRequest(gpu_layers="all"), devs)
    emb = stored(f.tensors["token_embd.weight"])
    assert p.output.device == 0 and "token_embd.weight" in p.output.tensors
    # the lookup copy of token_embd stays on the host as well, with the output norm vector
    assert p.host_weights == emb + stored(f.tensors["output_norm.weight"])
    check_device_bytes(p, f, 8192)


def test_no_gpu_gives_the_cpu_plan_and_the_reason(nemo):
    p = make_plan(nemo, 4096, OffloadRequest(gpu_layers="auto"), [], no_gpu="no NVIDIA GPU on the PCI bus")
    assert p.devices == {} and p.no_gpu == "no NVIDIA GPU on the PCI bus" and p.processor() == "100% CPU"
    assert p.host_weights == sum(stored(t) for t in nemo.tensors.values())


def test_host_bytes_per_node_follow_the_numa_strategy(nemo):
    """The one planner (numallm.placement.make_plan) splits what the GPU step leaves on the host
    over the nodes: shard by the model's declared splits (~ in proportion to cores), isolate on
    one node, off unplaced."""
    from numallm.placement import ModelSpec, Request
    from numallm.placement import make_plan as place

    topo = discover(str(FIXTURES / "epyc9554_nps4"), use_libs=False)
    cores = {n.id: n.physical_cores for n in topo.cpu_nodes}
    req = OffloadRequest(gpu_layers=10)
    devs = [gpu(0, "NVIDIA H100 PCIe", (9, 0), 80, 79, 2000)]
    spec = ModelSpec.from_gguf(nemo)

    def per_node(**kw):
        plan = place(spec, topo, Request(n_ctx=4096, offload=req, **kw), devs)
        return plan, {n.node: n.weights + n.kv for n in plan.nodes}

    plan, per = per_node(numa="shard")
    host = plan.gpu.host_bytes
    assert abs(sum(per.values()) - host) <= len(cores) and set(per) == set(cores)
    for n, b in per.items():   # the declared splits: within 1% of the cores' share
        assert abs(b - host * cores[n] / sum(cores.values())) <= 0.01 * host
    assert per_node(numa="isolate", nodes=(2,))[1] == {2: host}
    assert per_node(numa="off")[1] == {-1: host}


def test_plan_json_is_complete_and_serialisable(nemo):
    p = make_plan(nemo, 131072, OffloadRequest(gpu_layers="auto"), M10_AND_3060S)
    j = json.loads(json.dumps(p.to_json()))
    assert j["schema"] == "numallm.gpuplan/1" and j["n_ctx"] == 131072
    assert [d["index"] for d in j["devices"]] == [1, 2, 3]
    d = j["devices"][0]
    assert d["total"] == d["weights"] + d["kv"] + d["buffers"] and d["usable"] == d["mem_free"] - d["reserve"]
    assert len(j["layers"]) == 40 and j["output"]["name"] == "output"
    assert j["skipped"][0]["index"] == 0 and j["request"]["gpu_layers"] == "auto"
    assert j["host"]["total"] == j["host"]["weights"] + j["host"]["kv"]
    assert j["processor"] == p.processor() and 0 < j["gpu_share"] <= 1


def test_request_validation_is_one_line():
    for bad in (-1, "most", True):
        with pytest.raises(GpuError, match="--gpu-layers"):
            OffloadRequest(gpu_layers=bad)
    with pytest.raises(GpuError, match="GPU KV type 'q8'"):
        OffloadRequest(kv_dtype="q8")


# -- the command line ------------------------------------------------------------------------------

def fake_inventory(tmp_path, monkeypatch, gpus: list[dict]):
    inv = tmp_path / "gpus.json"
    inv.write_text(json.dumps(gpus))
    monkeypatch.setenv("NUMALLM_FAKE_GPUS", str(inv))


def test_plan_command_text_and_json(nemo, tmp_path, monkeypatch, capsys):
    fake_inventory(tmp_path, monkeypatch, [
        {"name": "Tesla M10", "compute_capability": "5.0", "mem_total": "8GiB"},
        *({"name": "NVIDIA GeForce RTX 3060", "compute_capability": "8.6", "mem_total": "12GiB",
           "mem_free": "11.6GiB"} for _ in range(3))])
    assert main(["plan", nemo.path, "--ctx", "131072", "-ngl", "auto", "--gpu-reserve", "1GiB"]) == 0
    out = capsys.readouterr().out
    assert "GPU 0 not used: compute capability 5.0 < 6.0" in out
    assert "GPU 1 NVIDIA GeForce RTX 3060 (cc 8.6, 360 GB/s listed" in out and "1.00 GiB reserve" in out
    assert "predicted split:" in out
    assert main(["plan", nemo.path, "-c", "131072", "-ngl", "auto", "--gpu-reserve", "1GiB", "--json"]) == 0
    j = json.loads(capsys.readouterr().out)
    assert j["request"]["reserve_bytes"] == GIB and [d["index"] for d in j["devices"]] == [1, 2, 3]


def test_plan_and_run_without_gpu_say_why_in_one_line(tiny, tmp_path, monkeypatch, capsys):
    fake_inventory(tmp_path, monkeypatch, [])
    assert main(["plan", tiny.path, "-ngl", "all"]) == 0
    out = capsys.readouterr().out
    assert "no GPU: NUMALLM_FAKE_GPUS=" in out and "CPU: blk.0-3, token_embd, output" in out
    assert main(["run", tiny.path, "hello", "-n", "2", "--temp", "0", "-ngl", "auto"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("numallm: no GPU (") and "running every layer on the CPU" in err[0]
    # device policy alone (no layers asked for) is not silently ignored either
    assert main(["run", tiny.path, "hello", "-n", "2", "--temp", "0", "--gpus", "0"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "GPU options given but no layers asked for" in err[0]


@pytest.mark.parametrize("flags, needle", [
    (["--gpus", "7", "-ngl", "1"], "--gpus 7: no GPU 7 here"),
    (["--gpu-reserve", "lots", "-ngl", "1"], "--gpu-reserve 'lots' is not a size"),
    (["-ngl", "3", "--offload", "blk"], "give one of them"),
    (["--offload", "blk.("], "is not a regular expression"),
])
def test_bad_gpu_flags_give_one_line(tiny, tmp_path, monkeypatch, capsys, flags, needle):
    fake_inventory(tmp_path, monkeypatch, [{"name": "NVIDIA L4", "compute_capability": "8.9",
                                            "mem_total": "24GiB"}])
    assert main(["plan", tiny.path, *flags]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("numallm: error:") and needle in err[0]


def test_a_host_part_larger_than_free_memory_is_refused(nemo):
    from numallm.placement import ModelSpec, OutOfMemoryError, Request
    from numallm.placement import make_plan as place

    topo = discover(str(FIXTURES / "vm_1node"), use_libs=False)        # one node, 27 GiB free
    devs = [gpu(0, "NVIDIA GeForce RTX 4090", (8, 9), 24, 23.5, 1008)]
    spec = ModelSpec.from_gguf(nemo)
    f32 = dict(cache_type_k="f32", cache_type_v="f32")   # 40 GiB of K/V: the host part cannot fit
    p = place(spec, topo, Request(numa="off", n_ctx=131072, offload=OffloadRequest(), **f32), devs)
    assert p.host_weights + p.host_kv > 27 * GIB
    with pytest.raises(OutOfMemoryError, match=r"needs [\d.]+ GiB on this machine .*-ngl"):
        p.check_fits()
    p = place(spec, topo, Request(numa="off", n_ctx=131072, offload=OffloadRequest(gpu_layers="auto"),
                                  **f32), devs)
    p.check_fits()                       # the GPUs take enough of it