"""Text report of `numallm topo`: tree, findings, warnings, recommendation, bench (the model plan: placement.compare)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from .advice import Advice, gib
from .model import Node, Topology
from .sysfs import format_cpulist

if TYPE_CHECKING:  # bench imports numpy; the plain report does not need it
    from .bench import BenchResult


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.0f} MiB"


def _node_lines(n: Node, topo: Topology, verbose: bool) -> list[str]:
    allowed = set(topo.process.allowed_cpus)
    mem = f"memory {gib(n.mem_total_bytes)} ({gib(n.mem_free_bytes)} free)"
    if n.mem_estimated:
        mem += f", estimated: real node {n.real_node}'s memory shared"
    if n.memory_only:
        return [f"  node {n.id}: no CPUs (CXL/HBM memory-only), {mem}"]
    smt = max(len(c.threads) for c in n.cores)
    head = f"  node {n.id}{' (virtual)' if n.real_node is not None else ''}: {n.physical_cores} cores"
    head += f" x {smt} threads" if smt > 1 else ""
    lines = [f"{head}, {mem}"]
    first = [c.threads[0] for c in n.cores]
    sib = [t for c in n.cores for t in c.threads[1:]]
    cpus = f"    CPUs {format_cpulist(first)}"
    cpus += f", SMT siblings {format_cpulist(sib)}" if sib else ""
    usable = [c for c in n.cores if allowed.intersection(c.threads)]
    if len(usable) < len(n.cores):
        cpus += f"; this process may use {len(usable)} cores: {format_cpulist(allowed & set(n.cpus))}"
    lines.append(cpus)
    if n.l3_groups:
        sizes = {len(g) for g in n.l3_groups}
        per = f"{min(sizes)}-{max(sizes)}" if len(sizes) > 1 else str(sizes.pop())
        l3 = f" of {_mib(topo.cpu.l3_bytes)}" if topo.cpu.l3_bytes else ""
        k = len(n.l3_groups)
        lines.append(f"    L3: {k} group{'s' if k > 1 else ''}{l3}, {per} CPUs each")
    if verbose:
        by_group = {t: i for i, g in enumerate(n.l3_groups) for t in g}
        groups: dict[int, list[str]] = {}
        for c in n.cores:
            groups.setdefault(by_group.get(c.threads[0], -1), []).append("/".join(map(str, c.threads)))
        for gi, cores in sorted(groups.items()):
            label = f"L3 {gi}" if gi >= 0 else "cores"
            for k in range(0, len(cores), 12):
                lines.append(f"      {label if k == 0 else ' ' * len(label)}: {' '.join(cores[k:k + 12])}")
    for h in n.hugepages:
        if h.total:
            lines.append(f"    hugepages {_mib(h.size_bytes)}: {h.free} free of {h.total}")
    return lines


def render_topology(topo: Topology, advice: Advice, verbose: bool = False) -> list[str]:
    mark = " [VIRTUAL]" if topo.virtual else ""
    mark += " [FROM FILE]" if topo.source.startswith("json:") else ""
    out = [f"topology ({topo.source}){mark}",
           f"CPU: {topo.cpu.model} ({topo.cpu.vendor}); features: {' '.join(topo.cpu.features) or 'none'}"]
    for s in topo.sockets:
        out.append(f"socket {s.id}: {s.physical_cores} cores, {s.threads} threads, "
                   f"node{'s' if len(s.nodes) > 1 else ''} {format_cpulist(s.nodes)}")
        for n in topo.nodes:
            if n.socket == s.id and n.cpus:
                out += _node_lines(n, topo, verbose)
    mem_only = [n for n in topo.nodes if n.memory_only]
    if mem_only:
        out.append("memory-only nodes:")
        for n in mem_only:
            out += _node_lines(n, topo, verbose)
    if len(topo.nodes) > 1:
        ids = [n.id for n in topo.nodes]
        out.append("distances: " + " ".join(f"{i:>4}" for i in ids))
        for n in topo.nodes:
            out.append(f"   node {n.id:>3}" + "".join(f"{n.distance_to(i) or '?':>5}" for i in ids))
    if topo.offline_cpus:
        out.append(f"offline CPUs: {format_cpulist(topo.offline_cpus)}")
    for g in topo.gpus:
        mem = (f", {gib(g.mem_total_bytes)} ({gib(g.mem_free_bytes or 0)} free)"
               if g.mem_total_bytes else "")
        cc = f", compute {g.compute_capability}" if g.compute_capability else ""
        bw = f", {g.bandwidth_gbps:.0f} GB/s" if g.bandwidth_gbps else ""
        node = f"node {g.numa_node}" if g.numa_node is not None else "node unknown"
        bus = f"PCIe {g.pci_bus_id} on {node}" if g.pci_bus_id else f"PCIe on {node}"
        out.append(f"GPU {g.index}: {g.name}{cc}{mem}{bw}, {bus} ({g.source})")
    if not topo.gpus:
        out.append("GPUs: none on the PCI bus (GPU offload off: every layer runs on the CPU)")
    p = topo.process
    quota = f", CPU quota {p.cpu_quota:g}" if p.cpu_quota is not None else ""
    out.append(f"process: may use CPUs {format_cpulist(p.allowed_cpus)} ({len(p.allowed_cpus)}), "
               f"memory nodes {format_cpulist(p.allowed_nodes)}{quota}")
    m = topo.memory
    bal = "n/a" if m.numa_balancing is None else ("on" if m.numa_balancing else "off")
    hp = ", ".join(f"{_mib(h.size_bytes)} x {h.total}" for h in m.hugepages if h.total) or "none"
    out.append(f"kernel: numa_balancing {bal}, transparent hugepages {m.thp_enabled or 'n/a'} "
               f"(defrag {m.thp_defrag or 'n/a'}), hugepages reserved: {hp}")
    for note in topo.notes:
        out.append(f"note: {note}")
    out.append("")
    for line in advice.findings:
        out.append(f"- {line}")
    for line in advice.warnings:
        out.append(f"WARNING: {line}")
    per = ", ".join(f"node {n}: {t}" for n, t in advice.threads_per_node)
    out.append(f"recommendation: run on node{'s' if len(advice.nodes) > 1 else ''} "
               f"{format_cpulist(advice.nodes)} with one thread per physical core ({per}; "
               f"{advice.total_threads} in all)")
    return out


def render_bench(b: "BenchResult") -> list[str]:
    out = [f"read bandwidth ({_mib(b.buffer_bytes)} buffer per node, memory placed by {b.placement}):"]
    threads = dict(b.threads)
    for n, v in b.local_gbps:
        out.append(f"  node {n}: {v:7.1f} GB/s local ({threads[n]} threads)")
    local = b.local()
    for a, m, v in b.remote_gbps:
        pen = f", {v / local[m]:.0%} of local" if local.get(m) else ""
        out.append(f"  node {a} threads reading node {m} memory: {v:7.1f} GB/s{pen}")
    return out
