"""The offload planner on inventories given as data: decisions and byte counts.

Byte counts are recomputed here from the GGUF tensor shapes (GGML block sizes) and the KV formula
written out, never by calling the planner's own helpers.
"""
from __future__ import annotations

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES

from numallm.gguf_file import GGUFFile
from numallm.gpu import GpuDevice, GpuError, OffloadRequest, make_plan
from numallm.synth import cached_model

MIB, GIB = 1 << 20, 1 << 30


def stored_bytes(t) -> int:
    block, size = GGML_QUANT_SIZES[t.qtype]
    return int(np.prod(t.shape)) // block * size


def gpu(index, name, cc, total_gib, free_gib=None, gbps=None, node=0) -> GpuDevice:
    free = total_gib if free_gib is None else free_gib
    return GpuDevice(index, name, cc, int(total_gib * GIB), int(free * GIB), gbps, node, None)


@pytest.fixture(scope="module")
def tiny(synth_dir):
    return GGUFFile(cached_model(synth_dir, arch="llama", qtype="Q4_0", shape="tiny"))


def test_cpu_only_by_default_and_n_layers_from_the_end(tiny):
    devs = [gpu(0, "NVIDIA GeForce RTX 3060", (8, 6), 12)]
    p = make_plan(tiny, 256, OffloadRequest(), devs)
    assert all(u.device is None for u in p.layers) and p.devices == {} and p.processor() == "100% CPU"
    p = make_plan(tiny, 256, OffloadRequest(gpu_layers=2), devs)
    assert [u.device for u in p.layers] == [None, None, 0, 0] and p.output.device is None
    blk = [sum(stored_bytes(t) for n, t in tiny.tensors.items() if n.startswith(f"blk.{i}."))
           for i in range(4)]
    kv_f16 = 2 * 256 * 2 * 64 * 2            # K and V, n_ctx, n_head_kv, head_dim, f16
    d = p.devices[0]
    assert d.weights == blk[2] + blk[3] and d.kv == 2 * kv_f16 and d.layers == (2, 3)
    all_w = sum(stored_bytes(t) for t in tiny.tensors.values())
    assert p.host_weights == all_w - d.weights
    assert p.host_kv == 2 * (2 * 256 * 2 * 64 * 4)   # the CPU blocks keep float32 K/V


def test_old_card_is_skipped_with_the_reason(tiny):
    devs = [gpu(0, "Tesla M10", (5, 0), 8), gpu(1, "NVIDIA GeForce RTX 3060", (8, 6), 12)]
    p = make_plan(tiny, 256, OffloadRequest(gpu_layers="all"), devs)
    assert [u.device for u in p.layers] == [1] * 4 and p.output.device == 1
    assert p.skipped[0][0] == 0 and "compute capability 5.0 < 6.1" in p.skipped[0][1]


def test_unknown_gpu_index_is_one_line(tiny):
    with pytest.raises(GpuError, match=r"--gpus 4: no GPU 4 here \(GPUs: 0;"):
        make_plan(tiny, 256, OffloadRequest(gpu_layers=1, gpus=(4,)), [gpu(0, "x", (8, 6), 8)])
