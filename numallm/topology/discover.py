"""Building a Topology from the operating system (sysfs/procfs under a root, libnuma, psutil, NVML).

The root stands in for `/` so tests run on fixture trees laid out like a real machine's files.
Libraries describe the live machine only, so they are consulted only when `use_libs` is true
(the default for root `/`); each one that is missing degrades to sysfs with a note.
"""
from __future__ import annotations

import os
from collections import Counter

from .gpu import discover_gpus
from .model import (Core, CpuInfo, HugePages, MemorySettings, Node, ProcessInfo, Socket, Topology,
                    TopologyError)
from .sysfs import (FEATURE_FLAGS, Reader, numbered, parse_cpuinfo, parse_cpulist, parse_meminfo,
                    parse_status, selected)

CPU = "sys/devices/system/cpu"
NODE = "sys/devices/system/node"


def sysfs_root_from_env(arg: str | None) -> str:
    """--sysfs-root wins over NUMALLM_SYSFS_ROOT; default `/`."""
    root = arg or os.environ.get("NUMALLM_SYSFS_ROOT") or "/"
    if not os.path.isdir(root):
        raise TopologyError(f"sysfs root {root}: no such directory; give a directory laid out like "
                            f"/ (with sys/devices/system/... and proc/...)")
    return root


def load_libnuma(r: Reader):
    """py-libnuma's ctypes handle, or None with a note. Import raises odd errors without the .so."""
    try:
        import numa  # py-libnuma: CDLL(find_library("numa")) at import
        if numa.LIBNUMA.numa_available() < 0:
            r.note("libnuma reports NUMA unavailable (kernel without NUMA); read sysfs only")
            return None
        return numa
    except Exception as e:  # noqa: BLE001 - ImportError, OSError, AttributeError on a missing .so
        r.note(f"libnuma not available ({type(e).__name__}); read sysfs only, and --bench places "
               f"memory by first touch")
        return None


def _hugepages(r: Reader, rel: str) -> tuple[HugePages, ...]:
    out = []
    for name in sorted(r.listdir(rel)):
        if name.startswith("hugepages-") and name.endswith("kB"):
            size = int(name[len("hugepages-"):-2]) * 1024
            total = r.int(f"{rel}/{name}/nr_hugepages") or 0
            free = r.int(f"{rel}/{name}/free_hugepages") or 0
            out.append(HugePages(size, total, free))
    return tuple(out)


def _l3(r: Reader, cpu: int) -> tuple[tuple[int, ...] | None, int | None]:
    """(CPUs sharing this CPU's L3, L3 size in bytes); the index of the L3 varies by CPU."""
    base = f"{CPU}/cpu{cpu}/cache"
    for idx in sorted(r.listdir(base)):
        if r.int(f"{base}/{idx}/level", quiet=True) == 3:
            shared = r.cpulist(f"{base}/{idx}/shared_cpu_list")
            size = r.line(f"{base}/{idx}/size", quiet=True)
            nbytes = int(size[:-1]) * 1024 if size and size.endswith("K") and size[:-1].isdigit() else None
            return shared, nbytes
    return None, None


def _cpu_info(r: Reader) -> CpuInfo:
    text = r.text("proc/cpuinfo")
    if text is None:
        r.note("/proc/cpuinfo unreadable: CPU model and ISA features unknown")
        return CpuInfo("unknown", "unknown", ())
    info = parse_cpuinfo(text)
    flags = set(info.get("flags", "").split())
    feats = tuple(name for flag, name in FEATURE_FLAGS.items() if flag in flags)
    return CpuInfo(vendor=info.get("vendor_id", "unknown"),
                   model=info.get("model name", info.get("Model", "unknown")),
                   features=feats, hypervisor="hypervisor" in flags)


def _process(r: Reader, online: tuple[int, ...], mem_nodes: list[int], real: bool) -> ProcessInfo:
    status = r.text("proc/self/status")
    fields = parse_status(status) if status else {}
    cpus = mems = None
    try:
        if "Cpus_allowed_list" in fields:
            cpus = parse_cpulist(fields["Cpus_allowed_list"])
        if "Mems_allowed_list" in fields:
            mems = parse_cpulist(fields["Mems_allowed_list"])
    except ValueError as e:
        r.note(f"/proc/self/status: {e}; assuming all CPUs and nodes are allowed")
    if real:  # the calling thread's own affinity (psutil reads the same sched_getaffinity)
        cpus = tuple(sorted(os.sched_getaffinity(0)))
    if cpus is None:
        r.note("/proc/self/status has no Cpus_allowed_list: assuming every online CPU is allowed")
        cpus = online
    if mems is None:
        mems = tuple(mem_nodes)
    cg_dir = "sys/fs/cgroup"
    cgroup = r.text("proc/self/cgroup", quiet=True)
    if cgroup:  # cgroup v2 line "0::/path"; a container sees its own cgroup at the root
        for line in cgroup.splitlines():
            if line.startswith("0::") and r.text(f"{cg_dir}{line[3:]}/cpu.max", quiet=True) is not None:
                cg_dir = f"{cg_dir}{line[3:]}".rstrip("/")
    cg_cpus = r.cpulist(f"{cg_dir}/cpuset.cpus.effective", quiet=True)
    quota = None
    cpu_max = (r.line(f"{cg_dir}/cpu.max", quiet=True) or "max").split()
    if len(cpu_max) == 2 and cpu_max[0] != "max" and cpu_max[0].isdigit() and cpu_max[1].isdigit():
        quota = int(cpu_max[0]) / max(int(cpu_max[1]), 1)
    return ProcessInfo(tuple(c for c in cpus if c in set(online)), tuple(mems), cg_cpus, quota)


def _memory(r: Reader) -> MemorySettings:
    thp = "sys/kernel/mm/transparent_hugepage"
    return MemorySettings(numa_balancing=r.int("proc/sys/kernel/numa_balancing", quiet=True),
                          thp_enabled=selected(r.text(f"{thp}/enabled", quiet=True)),
                          thp_defrag=selected(r.text(f"{thp}/defrag", quiet=True)),
                          hugepages=_hugepages(r, "sys/kernel/mm/hugepages"))


def _numbering(cpu_socket: dict[int, int]) -> str:
    """'interleaved' when consecutive CPU numbers mostly land on different sockets."""
    ids = sorted(cpu_socket)
    if len(set(cpu_socket.values())) < 2 or len(ids) < 2:
        return "contiguous"
    changes = sum(cpu_socket[a] != cpu_socket[b] for a, b in zip(ids, ids[1:]))
    return "interleaved" if changes > len(ids) // 2 else "contiguous"


def discover(root: str = "/", use_libs: bool | None = None) -> Topology:
    """Read the topology of the machine whose files lie under `root`."""
    r = Reader(root)
    real = os.path.abspath(root) == "/"
    live = real if use_libs is None else use_libs
    if not os.path.isdir(r.path(CPU)):
        raise TopologyError(f"{r.path(CPU)}: missing; --sysfs-root must point at a directory laid "
                            f"out like / (sys/devices/system/cpu, proc/cpuinfo...)")
    numa = load_libnuma(r) if live else None

    online = r.cpulist(f"{CPU}/online") or tuple(numbered(r.listdir(CPU), "cpu"))
    present = r.cpulist(f"{CPU}/present", quiet=True) or r.cpulist(f"{CPU}/possible", quiet=True) or online
    offline = tuple(c for c in present if c not in set(online))

    # per CPU: socket, core key, L3 group
    cpu_socket: dict[int, int] = {}
    core_of: dict[int, tuple] = {}
    siblings_of: dict[int, tuple[int, ...]] = {}
    l3_of: dict[int, tuple[int, ...]] = {}
    l3_bytes = None
    onl = set(online)
    missing_topo = []
    for c in online:
        t = f"{CPU}/cpu{c}/topology"
        pkg = r.int(f"{t}/physical_package_id", quiet=True)
        core_id = r.int(f"{t}/core_id", quiet=True)
        sib = (r.cpulist(f"{t}/core_cpus_list", quiet=True)            # kernel 5.6+
               or r.cpulist(f"{t}/thread_siblings_list", quiet=True))
        if pkg is None or core_id is None or sib is None:
            missing_topo.append(c)
        pkg = 0 if pkg is None or pkg < 0 else pkg
        cpu_socket[c] = pkg
        siblings_of[c] = tuple(s for s in (sib or (c,)) if s in onl) or (c,)
        core_of[c] = (pkg, core_id if core_id is not None else -1 - c, siblings_of[c])
        shared, size = _l3(r, c)
        if shared:
            l3_of[c] = tuple(s for s in shared if s in onl)
            l3_bytes = l3_bytes or size
    if missing_topo:
        r.note(f"{len(missing_topo)} CPUs have no readable topology (socket, core, siblings): each "
               f"is taken as its own core on socket 0")

    # nodes
    node_ids = r.cpulist(f"{NODE}/online", quiet=True) or tuple(numbered(r.listdir(NODE), "node"))
    no_numa = not node_ids
    if no_numa:
        r.note("no /sys/devices/system/node: kernel without NUMA; all CPUs form node 0")
        node_ids = (0,)
    node_cpus: dict[int, tuple[int, ...]] = {}
    for n in node_ids:
        cl = r.cpulist(f"{NODE}/node{n}/cpulist") if not no_numa else online
        node_cpus[n] = tuple(c for c in (cl or ()) if c in onl)
    placed = {c for cs in node_cpus.values() for c in cs}
    stray = [c for c in online if c not in placed]
    if stray:
        r.note(f"{len(stray)} online CPUs belong to no node in sysfs; counted in node {node_ids[0]}")
        node_cpus[node_ids[0]] = tuple(sorted(node_cpus[node_ids[0]] + tuple(stray)))

    sys_mem = parse_meminfo(r.text("proc/meminfo") or "")
    nodes = []
    for n in node_ids:
        cpus = node_cpus[n]
        mi = parse_meminfo(r.text(f"{NODE}/node{n}/meminfo") or "") if not no_numa else sys_mem
        total, free = mi.get("MemTotal"), mi.get("MemFree")
        estimated = False
        if (total is None or free is None) and numa is not None:
            total, free = numa.memory.node_memory_info(n)
            r.note(f"node {n} meminfo unreadable: memory taken from libnuma")
        if total is None:
            if len(node_ids) == 1 and sys_mem.get("MemTotal"):
                total, free = sys_mem["MemTotal"], sys_mem.get("MemFree", 0)
            else:
                import psutil  # last resort: whole-machine figures split evenly
                vm = psutil.virtual_memory()
                total, free = vm.total // len(node_ids), vm.available // len(node_ids)
                estimated = True
                r.note(f"node {n} memory unreadable: estimated as the machine's / {len(node_ids)}")
        dist_text = r.line(f"{NODE}/node{n}/distance", quiet=no_numa)
        if dist_text and len(dist_text.split()) == len(node_ids):
            dists = tuple(zip(node_ids, (int(x) for x in dist_text.split())))
        elif numa is not None:
            dists = tuple((m, int(numa.info.numa_distance(n, m))) for m in node_ids)
        else:
            if len(node_ids) > 1:
                r.note(f"node {n} distances unreadable: assumed 10 local, 20 remote")
            dists = tuple((m, 10 if m == n else 20) for m in node_ids)
        seen: dict[tuple[int, ...], Core] = {}
        for c in cpus:
            key = core_of[c]
            if key not in seen:
                seen[key] = Core(key[0], max(key[1], 0), key[2])
        groups = sorted({tuple(x for x in l3_of[c] if x in set(cpus)) for c in cpus if c in l3_of})
        socks = Counter(cpu_socket[c] for c in cpus)
        nodes.append(Node(id=n, socket=socks.most_common(1)[0][0] if socks else None, cpus=cpus,
                          cores=tuple(sorted(seen.values(), key=lambda k: k.threads)),
                          l3_groups=tuple(groups), mem_total_bytes=int(total), mem_free_bytes=int(free),
                          distances=dists, hugepages=_hugepages(r, f"{NODE}/node{n}/hugepages"),
                          mem_estimated=estimated))

    sockets = []
    for s in sorted(set(cpu_socket.values())):
        members = [nd for nd in nodes if nd.socket == s]
        sockets.append(Socket(s, tuple(nd.id for nd in members), sum(nd.physical_cores for nd in members),
                              sum(len(nd.cpus) for nd in members)))
    cpu = _cpu_info(r)
    if l3_bytes:
        cpu = CpuInfo(cpu.vendor, cpu.model, cpu.features, cpu.hypervisor, l3_bytes)
    mem_nodes = [nd.id for nd in nodes if nd.mem_total_bytes > 0]
    process = _process(r, online, mem_nodes, real)
    gpus = tuple(discover_gpus(r, live))
    source = "sysfs:/" if real else f"sysfs:{root}"
    return Topology(source=source, virtual=False, sockets=tuple(sockets), nodes=tuple(nodes), cpu=cpu,
                    process=process, memory=_memory(r), gpus=gpus, offline_cpus=offline,
                    cpu_numbering=_numbering(cpu_socket), notes=tuple(r.notes))
