"""The VM test's thread and page checks on this machine, over 2 virtual nodes (no VM, seconds):
every worker stays on its virtual node's CPUs, read back from /proc while the model generates;
every slice on the real node the virtual ones were carved from. Also keeps vm_payload.py working
where the VM cannot boot."""
from __future__ import annotations

import os

import pytest

import vm_payload
from checks import check_local, check_workers
from numallm import numa_mem, synth

pytestmark = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 allowed CPUs")


@pytest.fixture(scope="module", params=[("llama", "tiny"), ("qwen3moe", "tiny-moe")],
                ids=["dense", "moe"])
def record(synth_dir, request) -> dict:
    arch, shape = request.param
    return vm_payload.check_model(str(synth.cached_model(synth_dir, arch, "Q4_0", shape)), 6,
                                  virtual_nodes=2)


def test_shard_on_virtual_nodes_gives_the_same_tokens(record):
    assert len(record["off_tokens"]) == 6 and record["shard_tokens"] == record["off_tokens"]


def test_workers_stay_on_their_virtual_nodes_cpus(record):
    assert len(record["workers"]) == 2 and record["n_samples"] > 0
    check_workers(record)


@pytest.mark.skipif(not numa_mem.status().available, reason=numa_mem.status().note)
def test_every_slice_is_on_the_real_node(record):
    real = numa_mem.status().nodes[0]
    check_local(record, mem_nodes=[real, real])
