"""Findings, warnings and the thread/node recommendation derived from a Topology (pure)."""
from __future__ import annotations

from dataclasses import dataclass

from ..gpu.inventory import MIN_COMPUTE_CAPABILITY as MIN_GPU_CC  # the offload planner's default
from .model import Topology
from .sysfs import format_cpulist

GIB = 1 << 30
LOW_FREE_FRACTION = 0.10   # below this share of a node's memory free, loading will spill


def gib(n: int) -> str:
    return f"{n / GIB:.1f} GiB"


def size(n: int) -> str:
    """Bytes in the largest binary unit that keeps the number at or above 1."""
    for unit, scale in (("GiB", GIB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


@dataclass(frozen=True)
class Advice:
    threads_per_node: tuple[tuple[int, int], ...]   # (node id, threads): one per usable core
    nodes: tuple[int, ...]                          # nodes to run on, in order
    findings: tuple[str, ...]
    warnings: tuple[str, ...]

    @property
    def total_threads(self) -> int:
        return sum(t for _, t in self.threads_per_node)

    def recommendation(self) -> dict:
        return {"threads_per_node": {str(n): t for n, t in self.threads_per_node},
                "nodes": list(self.nodes), "total_threads": self.total_threads}


def _usable_cores(topo: Topology) -> dict[int, int]:
    """Per CPU node: physical cores with at least one thread this process may run on."""
    allowed = set(topo.process.allowed_cpus)
    return {n.id: sum(1 for c in n.cores if allowed.intersection(c.threads)) for n in topo.cpu_nodes}


def _cap_to_quota(cores: dict[int, int], quota: float | None) -> dict[int, int]:
    """A cgroup CPU quota below the core count: share floor(quota) threads out by core count."""
    total = sum(cores.values())
    if quota is None or total <= max(int(quota), 1):
        return cores
    budget = max(int(quota), 1)
    out = {n: max(1, c * budget // total) for n, c in cores.items() if c}
    return out


def advise(topo: Topology) -> Advice:
    f: list[str] = []
    w: list[str] = []
    allowed = set(topo.process.allowed_cpus)
    mems = set(topo.process.allowed_nodes)
    usable = {n: c for n, c in _usable_cores(topo).items() if c}

    if topo.source.startswith("json:"):
        f.append(f"topology loaded from {topo.source[5:]}: it describes that file, not necessarily "
                 f"this machine")
    if topo.virtual:
        f.append(f"virtual topology: {len(topo.nodes)} nodes carved from this machine's CPUs; memory "
                 f"per node is the real node's divided among them (estimated)")

    # nodes to use: CPUs allowed and memory allowed
    nodes = [n for n in usable if n in mems]
    for n in usable:
        if n not in mems:
            w.append(f"this process may run on node {n}'s CPUs but not allocate its memory "
                     f"(Mems_allowed {format_cpulist(mems)}): its threads would read remote memory; "
                     f"fix the cpuset or leave node {n} out")
    if not nodes:
        nodes = list(usable)
    threads = _cap_to_quota({n: usable[n] for n in nodes}, topo.process.cpu_quota)

    cpu_nodes = topo.cpu_nodes
    if len(cpu_nodes) == 1:
        f.append("one NUMA node with CPUs: there is nothing to place; --virtual-nodes N lets you try "
                 "the multi-node path")
    for s in topo.sockets:
        if len(s.nodes) > 1 and not topo.virtual:
            f.append(f"socket {s.id} is split into {len(s.nodes)} NUMA nodes (AMD NPS or Intel SNC "
                     f"mode): numallm runs each node's share of the work on that node's cores")
    if topo.cpu_numbering == "interleaved":
        f.append("CPU numbers alternate between sockets (cpu 0 and cpu 1 are on different sockets): "
                 "a range like `taskset -c 0-15` spans sockets; use node lists instead")
    for n in topo.nodes:
        if n.memory_only:
            f.append(f"node {n.id} has {gib(n.mem_total_bytes)} of memory and no CPUs (CXL or HBM): "
                     f"numallm does not place weights there unless told to")
    if topo.offline_cpus:
        f.append(f"{len(topo.offline_cpus)} CPUs are offline ({format_cpulist(topo.offline_cpus)}), "
                 f"e.g. SMT disabled or cores taken offline; they are left out")
    if topo.cpu.hypervisor:
        f.append("running in a virtual machine: the NUMA layout shown is the VM's, which may not match "
                 "the host's")
    feats = set(topo.cpu.features)
    if "avx2" not in feats and topo.cpu.vendor != "unknown":
        w.append("the CPU reports no AVX2: numallm's kernels will run far slower than on a modern CPU")
    isa = [x for x in ("avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile") if x in feats]
    if isa:
        f.append(f"ISA extensions for fast matmul: {' '.join(isa)}")

    # warnings
    if topo.memory.numa_balancing:
        w.append("numa_balancing is on: the kernel will migrate model pages between nodes while "
                 "numallm runs; turn it off with `sudo sysctl kernel.numa_balancing=0`")
    n_threads = sum(len(allowed.intersection(c.threads)) for n in cpu_nodes for c in n.cores)
    n_cores = sum(usable.values())
    if n_threads > n_cores:
        w.append(f"SMT: {n_threads} hardware threads share {n_cores} physical cores; run one thread "
                 f"per core ({n_cores} threads, numallm's default), not {n_threads}: siblings "
                 f"compete for the same core and slow decoding")
    for n in cpu_nodes:
        if 0 < usable.get(n.id, 0) < n.physical_cores:
            w.append(f"this process may use only {usable[n.id]} of node {n.id}'s {n.physical_cores} "
                     f"cores (cpuset/affinity {format_cpulist(allowed & set(n.cpus))}): the node's "
                     f"full memory bandwidth needs all of them")
    quota = topo.process.cpu_quota
    if quota is not None and quota < n_cores:
        w.append(f"the cgroup CPU quota is {quota:g} CPUs for {n_cores} allowed cores: numallm uses "
                 f"{sum(threads.values())} threads so it is not throttled")
    for n in nodes:
        node = topo.node(n)
        if node.mem_total_bytes and node.mem_free_bytes < LOW_FREE_FRACTION * node.mem_total_bytes:
            w.append(f"node {n} has only {gib(node.mem_free_bytes)} free of {gib(node.mem_total_bytes)}: "
                     f"weights would spill to other nodes; free memory (page cache: "
                     f"`echo 1 | sudo tee /proc/sys/vm/drop_caches`) first")
    if topo.memory.thp_enabled == "never":
        f.append("transparent huge pages are off (never): 'madvise' lets numallm use them for weights "
                 "and cut TLB misses")
    for g in topo.gpus:
        if g.numa_node is None:
            if len(cpu_nodes) > 1:
                f.append(f"GPU {g.index} ({g.name}): the firmware does not say which node its slot "
                         f"is on")
        elif g.numa_node not in nodes:
            w.append(f"GPU {g.index} ({g.name}) sits on node {g.numa_node}, which this process does "
                     f"not use: feed it from node {g.numa_node}'s cores (numactl -N {g.numa_node})")
        if g.compute_capability:
            major, _, minor = g.compute_capability.partition(".")
            if major.isdigit() and (int(major), int(minor or 0)) < MIN_GPU_CC:
                w.append(f"GPU {g.index} ({g.name}) has compute capability {g.compute_capability}, "
                         f"older than {MIN_GPU_CC[0]}.{MIN_GPU_CC[1]}: GPU offload skips it by default "
                         f"(--gpu-min-cc overrides)")
    return Advice(tuple(sorted(threads.items())), tuple(sorted(threads)), tuple(f), tuple(w))
