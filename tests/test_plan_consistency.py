"""`info`, `plan` and `topo MODEL` print one plan: the same weight and KV-cache bytes."""
from __future__ import annotations

import json

import pytest

from numallm.cli import main
from numallm.synth import cached_model


@pytest.mark.parametrize("ctx", [None, 300])
def test_info_plan_topo_agree(synth_dir, capsys, ctx):
    path = str(cached_model(synth_dir, arch="qwen3", qtype="Q8_0", shape="tiny", seed=1))
    c = [] if ctx is None else ["-c", str(ctx)]
    assert main(["info", path, "--json", *c]) == 0
    info = json.loads(capsys.readouterr().out)
    assert main(["plan", path, "--json", *c]) == 0
    plan = json.loads(capsys.readouterr().out)["placement"]
    assert main(["topo", path, "--json", *c]) == 0
    topo = json.loads(capsys.readouterr().out)["model"]
    assert info["weights_bytes"] == plan["weight_bytes"] == topo["weight_bytes"] > 0
    assert info["kv_cache_bytes"] == plan["kv_bytes"] == topo["kv_bytes"] > 0
    assert info["ctx"] == plan["n_ctx"] == topo["context"] == (ctx or 4096)   # tiny: trained 4096


def test_scratch_formula_follows_the_attention_block():
    from numallm import ops
    from numallm.placement import plan

    assert plan.ATTENTION_ROWS == ops.ATTENTION_BLOCK and plan.PREFILL_CHUNK >= ops.ATTENTION_BLOCK
