"""Judgements shared by the VM system test and its on-this-machine variant: each takes one model's
record from vm_payload.check_model and raises AssertionError with what was wrong."""
from __future__ import annotations


def check_workers(m: dict) -> None:
    """Each thread that computed slices computed one node's only, on that node's CPUs (at every
    call, and in every /proc sample of its allowed list and last CPU); every node's slices were
    computed; every thread that used CPU time during the forward was pinned to one node."""
    cpus = {g["node"]: set(g["cpus"]) for g in m["groups"]}
    workers = m["workers"]
    assert sorted(n for w in workers.values() for n in w["nodes"]) == sorted(cpus), \
        f"threads per node's slices: {workers}"
    for tid, w in workers.items():
        (node,) = w["nodes"]
        want = cpus[node]
        assert set(w["cpus_at_calls"]) <= want, \
            f"thread {tid} computed node {node}'s slices on CPUs {w['cpus_at_calls']}"
        assert w["samples"], f"thread {tid} was never sampled from /proc"
        for cpu, allowed in w["samples"]:
            assert set(allowed) == want, f"thread {tid} (node {node}) allowed on {allowed}"
            assert cpu in want, f"thread {tid} (node {node}) last ran on CPU {cpu}"
    node_sets = {frozenset(c) for c in cpus.values()}
    for tid, samples in m["busy"].items():
        sets = {frozenset(a) for _, a in samples}
        assert len(sets) == 1 and next(iter(sets)) in node_sets, \
            f"thread {tid} worked during the forward but was allowed on {sorted(map(sorted, sets))}"
        assert all(c in next(iter(sets)) for c, _ in samples), f"thread {tid} ran off its CPUs: {samples}"


def check_local(m: dict, mem_nodes: list[int]) -> None:
    """Every weight slice and every written KV page on its node's memory node (`mem_nodes`, one
    per node), and the summary says so without a warning."""
    assert [g["mem_node"] for g in m["groups"]] == mem_nodes
    mem_of = {g["node"]: g["mem_node"] for g in m["groups"]}
    assert {r["node"] for r in m["report"]} == set(mem_of)
    off = [r for r in m["report"] if r["mem_node"] != mem_of[r["node"]] or r["local"] != 1.0]
    assert not off, f"{len(off)} of {len(m['report'])} slices not wholly on their node: {off[:5]}"
    assert {k["node"] for k in m["kv_report"]} == set(mem_of)
    kv_off = [k for k in m["kv_report"] if k["mem_node"] != mem_of[k["node"]] or k["local"] != 1.0]
    assert not kv_off, f"KV cache pages off their node: {kv_off[:5]}"
    assert "WARNING" not in m["summary"] and m["summary"].count("100% local pages") == len(mem_of)
