"""Machine topology: sockets, NUMA nodes, cores, SMT siblings, memory, GPUs (see docs/topo.md).

    topo = discover()                      # this machine (or discover("tests/fixtures/topo/x"))
    advice = advise(topo)                  # warnings and threads per node

Pure data and reads only: nothing here starts threads except run_bench, and nothing imports Numba.
"""
from __future__ import annotations

from .advice import Advice, advise
from .discover import discover, load_libnuma, sysfs_root_from_env
from .model import (SCHEMA, Core, CpuInfo, Gpu, HugePages, MemorySettings, Node, ProcessInfo, Socket,
                    Topology, TopologyError, topology_from_dict)
from .plan import assumed_bandwidth
from .sysfs import format_cpulist, parse_cpulist
from .virtual import load_topology_file, virtual_nodes


def run_bench(topo: Topology, nodes: list[int], seconds: float = 0.3):
    """Read-bandwidth probe (imports numpy and starts threads, so it is loaded on demand)."""
    from .bench import run_bench as _run

    return _run(topo, nodes, seconds)


from . import render  # noqa: E402 - after the names it uses

__all__ = ["Advice", "advise", "discover", "load_libnuma", "sysfs_root_from_env", "SCHEMA", "Core",
           "CpuInfo", "Gpu", "HugePages", "MemorySettings", "Node", "ProcessInfo", "Socket",
           "Topology", "TopologyError", "topology_from_dict", 
           "assumed_bandwidth",
           "format_cpulist", "parse_cpulist", "load_topology_file", "virtual_nodes", "run_bench",
           "render"]
