"""The topology as pure data: frozen dataclasses, `to_dict()` for JSON, `topology_from_dict()` back.

The JSON form (documented in docs/topo.md) is the stable interface: `numallm topo --json` writes it
and `--topology FILE` reads it, so a description taken on a big server can be replayed anywhere.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from ..errors import NumallmError

SCHEMA = "numallm.topo/1"


class TopologyError(NumallmError):
    """A topology description (--topology FILE, --virtual-nodes N, --sysfs-root DIR) is unusable."""


@dataclass(frozen=True)
class Core:
    """One physical core: its hardware threads (SMT siblings), ascending."""

    socket: int
    core_id: int                  # sysfs core_id: unique within a socket only
    threads: tuple[int, ...]

    def to_dict(self) -> dict:
        return {"socket": self.socket, "core_id": self.core_id, "threads": list(self.threads)}


@dataclass(frozen=True)
class HugePages:
    size_bytes: int
    total: int
    free: int

    def to_dict(self) -> dict:
        return {"size_bytes": self.size_bytes, "total": self.total, "free": self.free}


@dataclass(frozen=True)
class Node:
    """A NUMA node. Memory-only nodes (CXL, HBM in flat mode) have no cpus and socket None."""

    id: int
    socket: int | None
    cpus: tuple[int, ...]                      # online CPUs of the node, ascending
    cores: tuple[Core, ...]
    l3_groups: tuple[tuple[int, ...], ...]     # CPUs sharing one L3 (a CCX on EPYC)
    mem_total_bytes: int
    mem_free_bytes: int
    distances: tuple[tuple[int, int], ...]     # (other node id, SLIT distance), self included
    hugepages: tuple[HugePages, ...] = ()
    real_node: int | None = None               # virtual nodes: the real node they were carved from
    mem_estimated: bool = False                # virtual nodes: memory is the real node's / N
    # read bandwidth stated by a --topology file (a fixture's platform figure), GB/s; None:
    # not stated (assumed from the cores, or measured with --bench)
    mem_bandwidth_gbps: float | None = None

    @property
    def physical_cores(self) -> int:
        return len(self.cores)

    @property
    def memory_only(self) -> bool:
        return not self.cpus

    def distance_to(self, other: int) -> int | None:
        return dict(self.distances).get(other)

    def to_dict(self) -> dict:
        return {
            "id": self.id, "socket": self.socket, "cpus": list(self.cpus),
            "physical_cores": self.physical_cores, "cores": [list(c.threads) for c in self.cores],
            "l3_groups": [list(g) for g in self.l3_groups],
            "mem_total_bytes": self.mem_total_bytes, "mem_free_bytes": self.mem_free_bytes,
            "mem_estimated": self.mem_estimated, "memory_only": self.memory_only,
            "distances": {str(k): v for k, v in self.distances},
            "hugepages": [h.to_dict() for h in self.hugepages], "real_node": self.real_node,
            "mem_bandwidth_gbps": self.mem_bandwidth_gbps,
        }


@dataclass(frozen=True)
class Socket:
    id: int
    nodes: tuple[int, ...]
    physical_cores: int
    threads: int

    def to_dict(self) -> dict:
        return {"id": self.id, "nodes": list(self.nodes), "physical_cores": self.physical_cores,
                "threads": self.threads}


@dataclass(frozen=True)
class CpuInfo:
    vendor: str
    model: str
    features: tuple[str, ...]     # numallm's names, see sysfs.FEATURE_FLAGS
    hypervisor: bool = False
    l3_bytes: int | None = None   # size of one L3 group

    def to_dict(self) -> dict:
        return {"vendor": self.vendor, "model": self.model, "features": list(self.features),
                "hypervisor": self.hypervisor, "l3_bytes": self.l3_bytes}


@dataclass(frozen=True)
class ProcessInfo:
    """What this process may use: affinity and cgroup cpuset already intersected by the kernel."""

    allowed_cpus: tuple[int, ...]
    allowed_nodes: tuple[int, ...]
    cgroup_cpus: tuple[int, ...] | None = None   # cpuset.cpus.effective, when a cgroup v2 sets one
    cpu_quota: float | None = None               # cpu.max quota in CPUs, None when unlimited

    def to_dict(self) -> dict:
        return {"allowed_cpus": list(self.allowed_cpus), "allowed_nodes": list(self.allowed_nodes),
                "cgroup_cpus": None if self.cgroup_cpus is None else list(self.cgroup_cpus),
                "cpu_quota": self.cpu_quota}


@dataclass(frozen=True)
class MemorySettings:
    numa_balancing: int | None       # None: the kernel has no NUMA balancing (or unreadable)
    thp_enabled: str | None          # always / madvise / never
    thp_defrag: str | None
    hugepages: tuple[HugePages, ...] = ()

    def to_dict(self) -> dict:
        return {"numa_balancing": self.numa_balancing, "thp_enabled": self.thp_enabled,
                "thp_defrag": self.thp_defrag, "hugepages": [h.to_dict() for h in self.hugepages]}


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    pci_bus_id: str                       # sysfs form, e.g. 0000:c1:00.0
    numa_node: int | None                 # node of the PCIe slot; None when the firmware says -1
    compute_capability: str | None = None # "9.0"; None without NVML
    mem_total_bytes: int | None = None
    mem_free_bytes: int | None = None
    source: str = "sysfs"                 # nvml, sysfs, or fake (NUMALLM_FAKE_GPUS)
    bandwidth_gbps: float | None = None   # memory bandwidth listed for its name (or given)

    def to_dict(self) -> dict:
        return {"index": self.index, "name": self.name, "pci_bus_id": self.pci_bus_id,
                "numa_node": self.numa_node, "compute_capability": self.compute_capability,
                "mem_total_bytes": self.mem_total_bytes, "mem_free_bytes": self.mem_free_bytes,
                "source": self.source, "bandwidth_gbps": self.bandwidth_gbps}


@dataclass(frozen=True)
class Topology:
    source: str                       # "sysfs:/", "sysfs:DIR", "json:FILE"
    virtual: bool                     # nodes carved by --virtual-nodes
    sockets: tuple[Socket, ...]
    nodes: tuple[Node, ...]
    cpu: CpuInfo
    process: ProcessInfo
    memory: MemorySettings
    gpus: tuple[Gpu, ...] = ()
    offline_cpus: tuple[int, ...] = ()
    cpu_numbering: str = "contiguous"  # or "interleaved": consecutive CPU numbers alternate sockets
    notes: tuple[str, ...] = field(default=())  # what was degraded or guessed, in plain words

    def node(self, node_id: int) -> Node:
        for n in self.nodes:
            if n.id == node_id:
                return n
        raise KeyError(node_id)

    @property
    def cpu_nodes(self) -> tuple[Node, ...]:
        return tuple(n for n in self.nodes if n.cpus)

    def with_notes(self, *notes: str) -> "Topology":
        return replace(self, notes=self.notes + tuple(notes))

    def to_dict(self) -> dict:
        return {
            "schema": SCHEMA, "source": self.source, "virtual": self.virtual,
            "sockets": [s.to_dict() for s in self.sockets],
            "nodes": [n.to_dict() for n in self.nodes],
            "cpu": self.cpu.to_dict(), "process": self.process.to_dict(),
            "memory": self.memory.to_dict(), "gpus": [g.to_dict() for g in self.gpus],
            "offline_cpus": list(self.offline_cpus), "cpu_numbering": self.cpu_numbering,
            "notes": list(self.notes),
        }


# -- loading the JSON form ---------------------------------------------------------------------

def _ints(v: Any, what: str) -> tuple[int, ...]:
    if not isinstance(v, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in v):
        raise ValueError(f"{what} must be a list of integers")
    return tuple(v)


def _int(d: dict, key: str, what: str, optional: bool = False) -> int | None:
    v = d.get(key)
    if v is None and optional:
        return None
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise ValueError(f"{what}.{key} must be a non-negative integer")
    return v


def _hugepages(v: Any, what: str) -> tuple[HugePages, ...]:
    return tuple(HugePages(_int(h, "size_bytes", what), _int(h, "total", what), _int(h, "free", what))
                 for h in (v or []))


def _node(d: dict, i: int) -> Node:
    what = f"nodes[{i}]"
    if not isinstance(d, dict):
        raise ValueError(f"{what} must be an object")
    nid = _int(d, "id", what)
    cpus = _ints(d.get("cpus", []), f"{what}.cpus")
    cores_raw = d.get("cores")
    socket = _int(d, "socket", what, optional=True)
    if cores_raw is None:  # no SMT detail: each CPU counts as a core
        cores = tuple(Core(socket or 0, c, (c,)) for c in cpus)
    else:
        if not isinstance(cores_raw, list):
            raise ValueError(f"{what}.cores must be a list of lists of CPUs")
        cores = tuple(Core(socket or 0, j, _ints(t, f"{what}.cores[{j}]")) for j, t in enumerate(cores_raw))
    if sorted(t for c in cores for t in c.threads) != sorted(cpus):
        raise ValueError(f"{what}.cores does not cover exactly the node's cpus")
    dist = d.get("distances", {})
    if not isinstance(dist, dict):
        raise ValueError(f"{what}.distances must be an object {{node id: distance}}")
    try:
        distances = tuple(sorted((int(k), int(v)) for k, v in dist.items()))
    except (TypeError, ValueError):
        raise ValueError(f"{what}.distances must map node ids to integers") from None
    l3 = d.get("l3_groups") or []
    return Node(
        id=nid, socket=socket, cpus=cpus, cores=cores,
        l3_groups=tuple(_ints(g, f"{what}.l3_groups") for g in l3),
        mem_total_bytes=_int(d, "mem_total_bytes", what), mem_free_bytes=_int(d, "mem_free_bytes", what),
        distances=distances, hugepages=_hugepages(d.get("hugepages"), what),
        real_node=_int(d, "real_node", what, optional=True), mem_estimated=bool(d.get("mem_estimated")),
        mem_bandwidth_gbps=_gbps(d.get("mem_bandwidth_gbps"), f"{what}.mem_bandwidth_gbps"),
    )


def _gbps(v: Any, what: str) -> float | None:
    if v is None:
        return None
    if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0:
        raise ValueError(f"{what} must be a positive number or null")
    return float(v)


def topology_from_dict(data: Any, source: str) -> Topology:
    """Rebuild a Topology from its JSON form; raises ValueError naming the bad field."""
    if not isinstance(data, dict):
        raise ValueError("the top level must be a JSON object")
    nodes_raw = data.get("nodes")
    if not isinstance(nodes_raw, list) or not nodes_raw:
        raise ValueError("'nodes' must be a non-empty list")
    nodes = tuple(sorted((_node(d, i) for i, d in enumerate(nodes_raw)), key=lambda n: n.id))
    if len({n.id for n in nodes}) != len(nodes):
        raise ValueError("two nodes have the same id")
    sockets = []
    raw_sockets = data.get("sockets")
    if raw_sockets is None:  # derive them from the nodes
        raw_sockets = [{"id": s, "nodes": [n.id for n in nodes if n.socket == s]}
                       for s in sorted({n.socket for n in nodes if n.socket is not None})]
    for i, s in enumerate(raw_sockets):
        if not isinstance(s, dict):
            raise ValueError(f"sockets[{i}] must be an object")
        sid = _int(s, "id", f"sockets[{i}]")
        members = [n for n in nodes if n.socket == sid]
        sockets.append(Socket(sid, _ints(s.get("nodes", []), f"sockets[{i}].nodes"),
                              sum(n.physical_cores for n in members), sum(len(n.cpus) for n in members)))
    cpu = data.get("cpu") or {}
    proc = data.get("process") or {}
    mem = data.get("memory") or {}
    if not all(isinstance(x, dict) for x in (cpu, proc, mem)):
        raise ValueError("'cpu', 'process' and 'memory' must be objects")
    all_cpus = tuple(sorted(c for n in nodes for c in n.cpus))
    gpus = []
    for i, g in enumerate(data.get("gpus") or []):
        if not isinstance(g, dict):
            raise ValueError(f"gpus[{i}] must be an object")
        gpus.append(Gpu(index=_int(g, "index", f"gpus[{i}]"), name=str(g.get("name", "GPU")),
                        pci_bus_id=str(g.get("pci_bus_id", "")),
                        numa_node=_int(g, "numa_node", f"gpus[{i}]", optional=True),
                        compute_capability=g.get("compute_capability"),
                        mem_total_bytes=_int(g, "mem_total_bytes", f"gpus[{i}]", optional=True),
                        mem_free_bytes=_int(g, "mem_free_bytes", f"gpus[{i}]", optional=True),
                        source=str(g.get("source", "json")),
                        bandwidth_gbps=_gbps(g.get("bandwidth_gbps"), f"gpus[{i}].bandwidth_gbps")))
    quota = proc.get("cpu_quota")
    if quota is not None and not isinstance(quota, (int, float)):
        raise ValueError("process.cpu_quota must be a number or null")
    cg = proc.get("cgroup_cpus")
    return Topology(
        source=source, virtual=bool(data.get("virtual")), sockets=tuple(sockets), nodes=nodes,
        cpu=CpuInfo(vendor=str(cpu.get("vendor", "unknown")), model=str(cpu.get("model", "unknown")),
                    features=tuple(str(f) for f in cpu.get("features") or []),
                    hypervisor=bool(cpu.get("hypervisor")), l3_bytes=_int(cpu, "l3_bytes", "cpu", True)),
        process=ProcessInfo(
            allowed_cpus=_ints(proc.get("allowed_cpus", list(all_cpus)), "process.allowed_cpus"),
            allowed_nodes=_ints(proc.get("allowed_nodes", [n.id for n in nodes]), "process.allowed_nodes"),
            cgroup_cpus=None if cg is None else _ints(cg, "process.cgroup_cpus"),
            cpu_quota=None if quota is None else float(quota)),
        memory=MemorySettings(numa_balancing=_int(mem, "numa_balancing", "memory", True),
                              thp_enabled=mem.get("thp_enabled"), thp_defrag=mem.get("thp_defrag"),
                              hugepages=_hugepages(mem.get("hugepages"), "memory")),
        gpus=tuple(gpus), offline_cpus=_ints(data.get("offline_cpus", []), "offline_cpus"),
        cpu_numbering=str(data.get("cpu_numbering", "contiguous")),
        notes=tuple(str(n) for n in data.get("notes") or []),
    )
