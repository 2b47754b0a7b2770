"""A MoE model is mostly experts a token rarely reads, so nothing may hold them twice: resident
memory while loading and running a MoE file (`off` and `shard` over 2 virtual nodes) stays within
1.1x the file's size plus the KV cache (the file's pages released once repacked; shard's node
slices replace the build's copy)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from numallm import synth
from rss_checks import check_growth

# ~210 MB at Q8_0: 3 layers of 64 experts 512 wide (Qwen3-MoE layout), small vocabulary
SHAPE = dict(vocab=4096, hidden=1024, n_layers=3, n_heads=16, n_kv_heads=4, n_ff=3072,
             head_dim=64, n_expert=64, n_expert_used=8, n_ff_exp=512)

PROBE = r"""
import gc, json, sys
import numallm

def status():
    with open("/proc/self/status") as f:
        kv = dict(line.split(":", 1) for line in f)
    return {k: int(kv[k].split()[0]) * 1024 for k in ("VmRSS", "VmHWM")}

big, small, numa = sys.argv[1], sys.argv[2], sys.argv[3]
kw = dict(n_ctx=512, numa=numa, virtual_nodes=2) if numa != "off" else dict(n_ctx=512, n_threads=2)
with numallm.load(small, **kw) as warm:                      # Numba code, calibration, BLAS, threads
    warm.generate([1, 2, 3], 2, temperature=0)
del warm
gc.collect()
with open("/proc/self/clear_refs", "w") as f:                # 5: reset VmHWM to the current RSS
    f.write("5")
base = status()
llm = numallm.load(big, **kw)
loaded = status()
llm.generate(list(range(1, 40)), 8, temperature=0)         # a prefill (most experts) and decode
after = status()
print(json.dumps({"base": base, "loaded": loaded, "after": after, "weights": llm.weight_bytes,
                  "kv": sum(c.nbytes for c in llm.cache)}))
"""


@pytest.fixture(scope="module")
def moe_file(synth_dir):
    return synth.cached_model(synth_dir, "qwen3moe", "Q8_0", synth.ModelShape(**SHAPE))


@pytest.mark.slow
@pytest.mark.parametrize("numa", ["off", "shard"])
def test_moe_rss_within_file_size_plus_kv(synth_dir, moe_file, numa):
    if numa != "off" and len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs 2 allowed CPUs")
    small = synth.cached_model(synth_dir, arch="qwen3moe", qtype="Q8_0", shape="tiny-moe", seed=7)
    r = subprocess.run([sys.executable, "-c", PROBE, str(moe_file), str(small), numa],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout)
    check_growth(m, moe_file.stat().st_size, f"qwen3moe Q8_0 file, --numa {numa}", 0.85)
