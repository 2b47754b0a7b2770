"""The seeds' case planned before loading: a DeepSeek-R1 Q4_K_M-shaped model (671B parameters,
~377 GiB; synth_deepseek.write_header_only: the real header, the data a sparse-file hole) on a
2-socket EPYC 9005 fixture with 256 GiB per node (tests/fixtures/topo/epyc9755_2s.json, whose
nodes state 576 GB/s: 12 channels of DDR5-6000, the platform's peak). shard: one copy, about
half per node plus the latent KV cache on both, fits; replicate: refused with the numbers; the
decode ceiling per strategy from the fixture's bandwidth."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from numallm import synth_deepseek
from numallm.gguf_file import GGUFFile
from numallm.placement import ModelSpec, OutOfMemoryError, Request, make_plan
from numallm.placement.compare import compare
from numallm.topology.virtual import load_topology_file

FIXTURE = Path(__file__).parent / "fixtures" / "topo" / "epyc9755_2s.json"
GiB = 2 ** 30
CTX = 4096


@pytest.fixture(scope="module")
def r1(tmp_path_factory) -> Path:
    return synth_deepseek.write_header_only(tmp_path_factory.mktemp("r1") / "r1-Q4_K_M.gguf")


@pytest.fixture(scope="module")
def spec(r1) -> ModelSpec:
    return ModelSpec.from_gguf(GGUFFile(r1))


def test_header_only_r1_is_r1_sized(r1, spec):
    st = os.stat(r1)
    assert st.st_blocks * 512 < 16 * 2 ** 20                # a hole: a few MB on disk
    f = GGUFFile(r1)
    assert sum(t.n_elements for t in f.tensors.values()) == pytest.approx(671.0e9, rel=1e-3)
    assert 370 * GiB < spec.weight_bytes < 385 * GiB
    a = spec.args
    assert (a.n_layer, a.n_head, a.n_expert, a.n_expert_used, a.n_lora_kv) == (61, 128, 256, 8, 512)
    assert a.kv_bytes_per_token() == 61 * (512 + 64) * 2    # the latent: 576 f16 values per layer
    assert a.kv_bytes_per_token("f32") == 61 * (512 + 64) * 4
    # a token reads everything but the embedding table, and 8 of the 256 routed experts
    experts = sum(t.nbytes for t in spec.tensors if t.decl.kind == "experts")
    embd = next(t.nbytes for t in spec.tensors if t.name == "token_embd.weight")
    assert spec.active_bytes == pytest.approx(spec.weight_bytes - embd - experts * (1 - 8 / 256), abs=64)


def test_shard_fits_half_per_node_replicate_refused(spec):
    topo = load_topology_file(str(FIXTURE))
    assert [n.mem_total_bytes // GiB for n in topo.nodes] == [255, 256]   # node 0: firmware keeps 1
    shard = make_plan(spec, topo, Request(numa="shard", n_ctx=CTX))
    shard.check_fits()
    kv = spec.args.kv_bytes(CTX)
    for n in shard.nodes:
        assert 0.49 < n.weights / spec.weight_bytes < 0.51
        assert n.kv == kv                                   # the latent on both nodes
        assert n.total < n.free
    assert make_plan(spec, topo, Request(numa="auto", n_ctx=CTX)).strategy == "shard"
    rep = make_plan(spec, topo, Request(numa="replicate", n_ctx=CTX))
    with pytest.raises(OutOfMemoryError, match=r"--numa replicate: node 0 needs 377\.3 GiB .* but "
                                               r"has 229\.5 GiB free; use --numa shard"):
        rep.check_fits()


def test_decode_ceiling_per_strategy(spec):
    """tok/s <= bandwidth / bytes a node reads per token, slowest node deciding: isolate reads
    every active byte and the KV cache on one node; shard half the active weights per node plus
    the node's whole latent copy; replicate half of both."""
    topo = load_topology_file(str(FIXTURE))
    bw = {n.id: n.mem_bandwidth_gbps for n in topo.nodes}
    assert bw == {0: 576.0, 1: 576.0}
    opts = {o.strategy: o for o in compare(spec, topo, CTX, [0, 1], bw)}
    act, kv = spec.active_bytes, spec.args.kv_bytes(CTX)
    assert opts["isolate"].tok_s_ceiling == pytest.approx(576e9 / (act + kv))
    assert opts["shard"].tok_s_ceiling == pytest.approx(576e9 / (act / 2 + kv))
    assert opts["replicate"].tok_s_ceiling == pytest.approx(576e9 / (act / 2 + kv / 2))
    assert opts["shard"].bytes_per_token == act + 2 * kv
    # the numbers: ~20.7 GiB active per token, 274.5 MiB of f16 latent at 4096 tokens
    assert opts["isolate"].tok_s_ceiling == pytest.approx(25.6, abs=0.05)
    assert opts["shard"].tok_s_ceiling == pytest.approx(50.5, abs=0.05)
    assert [o.fits for o in opts.values()] == ["no", "yes", "no"]


def test_topo_and_plan_commands_show_it(r1):
    env = {k: v for k, v in os.environ.items() if k != "NUMALLM_DEBUG"}
    run = lambda *a: subprocess.run([sys.executable, "-m", "numallm", *a], env=env, capture_output=True,
                                    text=True, timeout=120)
    t = run("topo", str(r1), "--topology", str(FIXTURE))
    assert t.returncode == 0, t.stderr
    assert "weights 376.65 GiB" in t.stdout and "bandwidth stated by the topology file" in t.stdout
    lines = {ln.split()[0]: ln for ln in t.stdout.splitlines() if ln.startswith("  ") and "tok/s" in ln}
    assert "fits in free memory" in lines["shard"] and "<= 50.5 tok/s" in lines["shard"]
    assert "DOES NOT FIT" in lines["replicate"] and "DOES NOT FIT" in lines["isolate"]
    p = run("plan", str(r1), "--numa", "replicate", "--topology", str(FIXTURE))
    assert p.returncode == 0, p.stderr
    assert "memory check: load would refuse: --numa replicate: node 0 needs 377.3 GiB" in p.stdout
    s = run("plan", str(r1), "--numa", "shard", "--topology", str(FIXTURE))
    assert "memory check: fits" in s.stdout and "node 1: 128 threads, weights 188.76 GiB" in s.stdout


def test_auto_spreads_mla_by_its_heads(synth_dir):
    """What auto weighs (Needs) counts MLA heads, not the one KV head a k_b/v_b file declares,
    and shard over two virtual nodes gives each 2 of the 4 heads."""
    from numallm.placement import Needs
    from numallm.topology import discover, virtual_nodes

    path = synth_deepseek.cached_deepseek(synth_dir, "F16", "tiny-v3-kb", seed=0)
    spec = ModelSpec.from_gguf(GGUFFile(path))
    assert spec.args.n_head_kv == 1
    needs = Needs.of(spec)
    assert (needs.n_head_kv, needs.heads_per_unit) == (4, 1)
    topo = virtual_nodes(discover(), 2)
    plan = make_plan(spec, topo, Request(numa="shard", n_ctx=64))
    assert plan.splits["mla_heads"] == [(0, 2), (2, 4)]
