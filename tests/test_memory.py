"""Weights stay memory-mapped in their GGUF encoding: RSS after load and a forward pass stays near
the file size (no float32 copy of the model)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from numallm import synth

PROBE = r"""
import json, sys, psutil, numpy as np
proc = psutil.Process()
import numallm
warm = numallm.load(sys.argv[2], n_ctx=64, n_threads=1)     # same types on a tiny model: Numba code,
warm.logits([1, 2, 3]); warm.close(); del warm               # calibration and BLAS loaded first
import gc; gc.collect()
base = proc.memory_info().rss
llm = numallm.load(sys.argv[1], n_ctx=64, n_threads=1)
loaded = proc.memory_info().rss
llm.logits([1, 2, 3])                                        # touches every weight
after = proc.memory_info().rss
kv = sum(c.nbytes for c in llm.cache)
print(json.dumps({"base": base, "loaded": loaded, "after": after, "kv": kv}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_K"])
def test_rss_near_file_size(tmp_path, qtype):
    shape = dict(vocab=4096, hidden=1024, n_layers=6, n_heads=16, n_kv_heads=4, n_ff=2816)
    path = synth.write_model(tmp_path / f"m-{qtype}.gguf", "llama", qtype, shape)
    small = synth.write_model(tmp_path / f"s-{qtype}.gguf", "llama", qtype,
                              dict(shape, vocab=512, hidden=256, n_layers=1, n_heads=4, n_ff=512))
    size = path.stat().st_size
    r = subprocess.run([sys.executable, "-c", PROBE, str(path), str(small)], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout)
    grown = m["after"] - m["base"] - m["kv"]
    print(f"{qtype}: file {size / 1e6:.1f} MB, RSS growth after a forward {grown / 1e6:.1f} MB "
          f"(at load {(m['loaded'] - m['base']) / 1e6:.1f} MB)")
    # float32 weights would be 3.8x (Q8_0) to 7x (Q4_K) the file; allow 15% + 24 MB of scratch
    assert grown < 1.15 * size + 24e6
