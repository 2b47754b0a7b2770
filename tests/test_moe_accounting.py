"""What MoE models count: every expert in the size, the used experts' share in the bytes a
decoded token reads (bench GB/s and % of bandwidth, `topo MODEL`'s decode ceiling)."""
from __future__ import annotations

import math

import pytest

import numallm
from numallm import bench, synth
from numallm.bench import BenchPlan, ModelInfo
from numallm.gguf_file import GGUFFile
from numallm.placement import ModelSpec
from numallm.placement.compare import compare
from numallm.topology import discover, virtual_nodes


@pytest.fixture(scope="module")
def moe(synth_dir):
    return synth.cached_model(synth_dir, arch="qwen3moe", qtype="Q8_0", shape="tiny-moe", seed=7)


def test_loaded_model_counts_experts_and_active_bytes(moe):
    f = GGUFFile(moe)
    mats = sum(int(t.nbytes) for t in f.tensors.values() if len(t.shape) >= 2)
    exps = sum(int(t.nbytes) for n, t in f.tensors.items() if "_exps." in n)
    embd = int(f.tensors["token_embd.weight"].nbytes)     # one row read per token (untied)
    with numallm.load(moe, n_ctx=16) as llm:
        a = llm.args
        assert exps > 0.5 * mats
        assert llm.weight_bytes == mats                    # every matrix, experts included
        assert llm.active_bytes == mats - embd - exps + exps * a.n_expert_used // a.n_expert
        assert llm.active_bytes < 0.6 * llm.weight_bytes   # top-2 of 8: a quarter of the experts
    spec = ModelSpec.from_gguf(f)
    norms = spec.weight_bytes - mats
    assert spec.active_bytes == pytest.approx(llm.active_bytes + norms, abs=8)


@pytest.mark.parametrize("tied", [False, True])
def test_dense_active_bytes_leave_out_an_untied_embedding(synth_dir, tied):
    """A dense token reads every matrix, but of the embedding table only a row, unless the
    table is also the output matrix."""
    path = synth.cached_model(synth_dir, "llama", "Q8_0", "tiny", tied_embeddings=tied)
    with numallm.load(path, n_ctx=16) as llm:
        embd = llm.model.token_embd.nbytes
        assert llm.active_bytes == llm.weight_bytes - (0 if tied else embd)


def test_bench_reports_size_and_gbps_on_active_bytes(moe):
    """The size column is every weight; GB/s and % bw use what a token reads."""
    rep = bench.run_benchmark(str(moe), BenchPlan(0, 4, (1,), 1), bw_bytes=2**24)
    with numallm.load(moe, n_ctx=16) as llm:
        assert rep.model.weight_bytes == llm.weight_bytes
        assert rep.model.active_bytes == llm.active_bytes
    (row,) = rep.rows
    passes_per_s = row.tokens_per_s * row.n_passes / row.n_tokens
    assert math.isclose(row.gbps, llm.active_bytes * passes_per_s / 1e9, rel_tol=1e-9)
    table = bench.format_table(rep.model, rep.rows)
    assert "active)" in table


def test_format_table_dense_size_has_no_active_part():
    row = bench.summarize(bench.NUMALLM, "tg8", 1, 8, 8, [1.0], 10**9, 10.0)
    assert "active" not in bench.format_table(ModelInfo("llama Q4_0", 2**30, 10**9), [row])


def test_topo_ceiling_uses_active_bytes(moe):
    spec = ModelSpec.from_gguf(GGUFFile(moe))
    topo = virtual_nodes(discover(), 2)
    ids = [n.id for n in topo.nodes]
    opts = compare(spec, topo, 64, ids, {i: 10.0 for i in ids})
    kv = spec.args.kv_bytes(64)
    assert spec.active_bytes < 0.6 * spec.weight_bytes
    assert all(o.bytes_per_token == spec.active_bytes + kv for o in opts)


def test_prefill_gbps_on_all_weights_decode_on_active(moe):
    """A prefill chunk routes to nearly every expert: pp GB/s counts every weight; tg the active."""
    rep = bench.run_benchmark(str(moe), BenchPlan(16, 4, (1,), 1), bw_bytes=2**24)
    pp, tg = rep.rows
    for row, nbytes in ((pp, rep.model.weight_bytes), (tg, rep.model.active_bytes)):
        assert math.isclose(row.gbps, nbytes * row.tokens_per_s * row.n_passes / row.n_tokens / 1e9,
                            rel_tol=1e-9), row.test


def test_info_topo_plan_show_experts_and_active_share(moe):
    """`info` counts active parameters (k of n_expert of each routed expert tensor, everything
    else whole), `topo MODEL` and `plan` name the experts and the bytes a token reads."""
    import contextlib
    import io
    import json

    from numallm.cli import main

    def cli(*argv) -> str:
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            assert main(list(argv)) == 0
        return buf.getvalue()

    f = GGUFFile(moe)
    exps = sum(int(t.n_elements) for n, t in f.tensors.items() if "_exps." in n)
    total = sum(int(t.n_elements) for t in f.tensors.values())
    d = json.loads(cli("info", str(moe), "--json"))
    assert d["parameters"] == total
    assert d["active_parameters"] == total - exps + exps * 2 // 8         # top-2 of 8
    assert f"({d['active_parameters'] / 1e6:.2f} M active per token)" in cli("info", str(moe))
    active = ModelSpec.from_gguf(f).active_bytes / 2**20
    assert f"experts: 2 of 8 per token; a token reads {active:.1f} MiB" in cli("topo", str(moe))
    assert f"experts: 2 of 8 per token; a decoded token reads {active:.1f} MiB" in \
        cli("plan", str(moe))
    p = json.loads(cli("plan", str(moe), "--json"))["placement"]
    assert p["experts"] == [2, 8] and p["active_bytes"] == ModelSpec.from_gguf(f).active_bytes
