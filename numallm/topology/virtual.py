"""Topologies that are not read from this machine: a JSON file, or virtual nodes carved from it.

Both exist so the NUMA execution path can be developed and tested on one-node machines; both are
marked (`source` json:FILE, `virtual` true) wherever a topology is shown.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace

from .model import Core, Node, ProcessInfo, Socket, Topology, TopologyError, topology_from_dict


def load_topology_file(path: str) -> Topology:
    """Read a topology written by `numallm topo --json`; any defect is a one-line TopologyError."""
    hint = "give a file written by `numallm topo --json` (schema in docs/topo.md)"
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise TopologyError(f"topology file {path}: no such file; {hint}") from None
    except OSError as e:
        raise TopologyError(f"topology file {path}: cannot read it ({e.strerror}); {hint}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TopologyError(f"topology file {path}: not valid JSON ({e}); {hint}") from None
    try:
        topo = topology_from_dict(data, source=f"json:{path}")
    except ValueError as e:
        raise TopologyError(f"topology file {path}: {e}; {hint}") from None
    return topo


def _allowed_cores(topo: Topology) -> list[tuple[Node, Core]]:
    """Physical cores the process may run on (threads cut to the allowed ones), node by node."""
    allowed = set(topo.process.allowed_cpus)
    out = []
    for node in topo.cpu_nodes:
        for core in node.cores:
            threads = tuple(t for t in core.threads if t in allowed)
            if threads:
                out.append((node, Core(core.socket, core.core_id, threads)))
    return out


def virtual_nodes(topo: Topology, n: int) -> Topology:
    """Split the allowed CPUs into `n` nodes of whole physical cores (SMT siblings kept together).

    Memory of a virtual node is its real node's memory divided by the number of virtual nodes
    carved from that node (marked mem_estimated): the split is bookkeeping, not hardware.
    """
    cores = _allowed_cores(topo)
    if n < 1 or n > len(cores):
        raise TopologyError(f"--virtual-nodes {n}: this process may use {len(cores)} physical cores; "
                            f"give a number from 1 to {len(cores)}")
    base, extra = divmod(len(cores), n)
    chunks, start = [], 0
    for i in range(n):
        size = base + (1 if i < extra else 0)
        chunks.append(cores[start:start + size])
        start += size
    real_of = [Counter(nd.id for nd, _ in ch).most_common(1)[0][0] for ch in chunks]
    per_real = Counter(real_of)
    nodes = []
    for i, ch in enumerate(chunks):
        real = topo.node(real_of[i])
        cpus = tuple(sorted(t for _, c in ch for t in c.threads))
        cpu_set = set(cpus)
        reals = {nd.id: nd for nd, _ in ch}.values()
        cut = (tuple(x for x in g if x in cpu_set) for nd in reals for g in nd.l3_groups)
        groups = tuple(g for g in cut if g)
        dists = tuple((j, 10 if j == i else real.distance_to(real_of[j]) or 10) for j in range(n))
        nodes.append(Node(id=i, socket=ch[0][1].socket, cpus=cpus, cores=tuple(c for _, c in ch),
                          l3_groups=groups, mem_total_bytes=real.mem_total_bytes // per_real[real.id],
                          mem_free_bytes=real.mem_free_bytes // per_real[real.id], distances=dists,
                          real_node=real.id, mem_estimated=True))
    sockets = []
    for s in sorted({nd.socket for nd in nodes}):
        members = [nd for nd in nodes if nd.socket == s]
        sockets.append(Socket(s, tuple(nd.id for nd in members), sum(nd.physical_cores for nd in members),
                              sum(len(nd.cpus) for nd in members)))
    allowed = tuple(sorted(t for nd in nodes for t in nd.cpus))
    process = ProcessInfo(allowed, tuple(range(n)), topo.process.cgroup_cpus, topo.process.cpu_quota)
    note = (f"virtual topology: {n} nodes carved from real node(s) "
            f"{', '.join(str(x) for x in sorted(per_real))}; memory per node is an estimate")
    # a GPU's slot belongs to a real node: point it at the first virtual node carved from that one
    first = {}
    for nd in nodes:
        first.setdefault(nd.real_node, nd.id)
    gpus = tuple(replace(g, numa_node=first.get(g.numa_node)) for g in topo.gpus)
    return Topology(source=topo.source, virtual=True, sockets=tuple(sockets), nodes=tuple(nodes),
                    cpu=topo.cpu, process=process, memory=topo.memory, gpus=gpus,
                    offline_cpus=topo.offline_cpus, cpu_numbering=topo.cpu_numbering,
                    notes=topo.notes + (note,))
