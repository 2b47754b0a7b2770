"""What the NUMA system test observes inside the VM, written as JSON for test_numa_vm.py to judge.

    python tests/system/vm_payload.py OUT.json MODEL [MODEL ...] [--tokens N]

One Python process does everything (under QEMU's emulated CPU each start-up costs tens of
seconds), and it judges nothing: it records facts. Per model: greedy tokens with --numa off and
--numa shard over the machine's real nodes; the placement's per-slice page report; which thread
computed which node's slices and on which CPU (sched_getcpu at each kernel call); and, sampled
from /proc/self/task while the sharded model generates, every thread's Cpus_allowed_list and the
CPU it last ran on (stat field 39); and whether the page check notices a slice moved to the
wrong node. Also `numallm topo --json` and `numallm topo MODEL --verify --json`, run through the
CLI's own entry point.
"""
from __future__ import annotations

import contextlib
import ctypes
import io
import json
import os
import sys
import threading
import time

PROMPT = [1, 5, 9, 33, 70, 200, 7]      # token ids valid in every test vocabulary (>= 512)


def cpulist(text: str) -> list[int]:
    out: list[int] = []
    for part in filter(None, text.strip().split(",")):
        a, _, b = part.partition("-")
        out.extend(range(int(a), int(b or a) + 1))
    return out


def task_state(tid: int) -> tuple[int, list[int], int] | None:
    """(CPU the thread last ran on, its allowed CPUs, its CPU time in clock ticks), read from
    /proc; None if it has exited."""
    try:
        with open(f"/proc/self/task/{tid}/stat") as f:
            stat = f.read()
        with open(f"/proc/self/task/{tid}/status") as f:
            allowed = next(x for x in f if x.startswith("Cpus_allowed_list:")).split(":", 1)[1]
    except (OSError, StopIteration):
        return None
    # fields after the ")" closing the command name start at field 3 (state): field 39
    # (processor) is [36], 14 and 15 (utime, stime) are [11] and [12]
    f = stat.rsplit(")", 1)[1].split()
    return int(f[36]), cpulist(allowed), int(f[11]) + int(f[12])


class Sampler:
    """Samples every thread of this process from /proc until stopped: `samples` {tid: [(cpu,
    allowed)]}, `ticks` {tid: CPU ticks used between its first and last sample}."""

    def __init__(self, period_s: float = 0.001):
        self.period_s, self.samples, self._ticks = period_s, {}, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        me = threading.get_native_id()
        while not self._stop.is_set():
            for name in os.listdir("/proc/self/task"):
                tid = int(name)
                if tid != me and (s := task_state(tid)) is not None:
                    self.samples.setdefault(tid, []).append(s[:2])
                    self._ticks.setdefault(tid, [s[2], s[2]])[1] = s[2]
            time.sleep(self.period_s)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    @property
    def ticks(self) -> dict[int, int]:
        return {t: b - a for t, (a, b) in self._ticks.items()}


@contextlib.contextmanager
def record_kernel_calls(units, calls: list):
    """Wrap each unit's matmul_x (every row range of every product goes through it once the units
    hand out no native tasks) to append (thread id, id(weights), CPU now) per call."""
    libc = ctypes.CDLL(None)

    def wrap(fn):
        def call(w, *a):
            calls.append((threading.get_native_id(), id(w), libc.sched_getcpu()))
            return fn(w, *a)
        return call

    for u in units:
        u.matmul_x = wrap(u.matmul_x)
        u.native_task = lambda *a: None      # native tasks would bypass matmul_x
    try:
        yield calls
    finally:
        for u in units:                      # back to the class's methods
            del u.matmul_x
            del u.native_task


def slice_weights(part) -> list:
    """The prepared weights a slice hands the kernels: one matrix, or one per expert (a MoE
    layer's LocalExperts)."""
    from numallm.placement.experts import LocalExperts

    return part.ws if isinstance(part, LocalExperts) else [part.w]


def run_cli(argv: list[str]) -> tuple[int, str]:
    from numallm import cli

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        try:
            rc = cli.main(argv)
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else 1
    return rc or 0, buf.getvalue()


def misplace_and_check(pl) -> dict | None:
    """Move one node-1 slice's pages to node 0's memory and run the page check: it must notice.
    None where the nodes share one memory node (virtual nodes: nothing can be misplaced)."""
    from numallm import numa_mem
    from numallm.placement_check import check

    mem = [g.mem_node for g in pl.groups]
    if None in mem or len(set(mem)) < 2:
        return None
    lin, part = next((m, p) for m in pl.linears for p in m.parts if p.group == 1)
    moved = sum(numa_mem.move(a, mem[0]) for a in part.arrays)
    c = check(pl)
    # slices are packed into shared node blocks (huge pages): the pages moved may hold the ends
    # of other slices, which then really are misplaced too; any slice sharing a 2 MiB region
    # (a huge page, or the 4 KiB page at either end) with the moved one may be reported
    mine = _regions(part.arrays)
    near = sorted({m.name for m in pl.linears for p in m.parts
                   if p is not part and _regions(p.arrays) & mine})
    return {"tensor": lin.name, "moved_pages": moved, "ok": c.ok, "lines": c.lines(),
            "below": [s.tensor for s in c.below], "neighbors": near}


def _regions(arrays, size: int = 2 << 20) -> set[int]:
    """The size-aligned address regions the arrays' bytes touch."""
    out = set()
    for a in arrays:
        start = a.__array_interface__["data"][0]
        out.update(range(start // size, (start + max(a.nbytes, 1) - 1) // size + 1))
    return out


def check_model(path: str, n_tokens: int, virtual_nodes: int | None = None) -> dict:
    """Greedy tokens off vs shard, the shard placement's reports, and what its threads did."""
    import numallm
    from numallm import threads

    t0 = time.perf_counter()
    with numallm.load(path, n_ctx=64) as off:
        off_tokens = off.generate(PROMPT, n_tokens, temperature=0).tokens
    t1 = time.perf_counter()
    shard = numallm.load(path, n_ctx=64, numa="shard", virtual_nodes=virtual_nodes)
    pl = shard.placement
    groups = [{"node": g.node, "cpus": list(g.cpus), "mem_node": g.mem_node, "n_threads": g.n_threads}
              for g in pl.groups]
    node_of = {id(w): pl.groups[p.group].node for m in pl.linears for p in m.parts
               for w in slice_weights(p)}
    calls: list = []
    # the outer activate pins this thread (node 0's leader) for the whole sampled window
    with threads.activate(shard.pool), record_kernel_calls({m.unit for m in pl.linears}, calls), \
            Sampler() as sampler:
        shard_tokens = shard.generate(PROMPT, n_tokens, temperature=0).tokens
    t2 = time.perf_counter()
    report = [{"tensor": r.tensor, "node": r.node, "mem_node": r.mem_node, "rows": list(r.rows),
               "nbytes": r.nbytes, "local": r.local} for r in pl.report()]
    kv = [{"layer": k.layer, "node": k.node, "mem_node": k.mem_node, "heads": list(k.heads),
           "nbytes": k.nbytes, "local": k.local} for k in pl.kv_report()]
    summary = pl.summary()
    misplaced = misplace_and_check(pl)
    shard.close()
    workers: dict[int, dict] = {}
    for tid, wid, cpu in calls:
        w = workers.setdefault(tid, {"nodes": set(), "cpus_at_calls": set(), "calls": 0})
        w["nodes"].add(node_of.get(wid, -1))           # -1: weights no slice owns (a bug)
        w["cpus_at_calls"].add(cpu)
        w["calls"] += 1
    return {
        "path": path, "off_tokens": off_tokens, "shard_tokens": shard_tokens, "groups": groups,
        "report": report, "kv_report": kv, "summary": summary, "misplaced": misplaced,
        "workers": {str(t): {"nodes": sorted(w["nodes"]), "cpus_at_calls": sorted(w["cpus_at_calls"]),
                             "calls": w["calls"],
                             "samples": sorted({(c, tuple(a)) for c, a in sampler.samples.get(t, [])})}
                    for t, w in workers.items()},
        # every thread that used CPU time while the model generated: where it may and did run
        "busy": {str(t): sorted({(c, tuple(a)) for c, a in sampler.samples[t]})
                 for t, n in sampler.ticks.items() if n > 0},
        "n_samples": sum(len(v) for v in sampler.samples.values()),
        "seconds": {"off": round(t1 - t0, 1), "shard": round(t2 - t1, 1)},
    }


def main(argv: list[str]) -> int:
    out_path, models, n_tokens = argv[0], [], 8
    it = iter(argv[1:])
    for a in it:
        if a == "--tokens":
            n_tokens = int(next(it))
        else:
            models.append(a)
    t0 = time.perf_counter()
    result: dict = {"allowed_cpus": sorted(os.sched_getaffinity(0)), "models": []}
    from numallm import numa_mem

    st = numa_mem.status()
    result["numa_mem"] = {"available": st.available, "nodes": list(st.nodes), "note": st.note}
    result["import_s"] = round(time.perf_counter() - t0, 1)
    rc, text = run_cli(["topo", "--json"])
    result["topo"] = {"rc": rc, "json": json.loads(text) if rc == 0 else None, "text": text}
    for m in models:
        result["models"].append(check_model(m, n_tokens))
    rc, text = run_cli(["topo", models[0], "--verify", "--numa", "shard", "-c", "64", "--json"])
    result["topo_verify"] = {"rc": rc, "json": json.loads(text) if text.startswith("{") else None,
                             "text": text}
    result["total_s"] = round(time.perf_counter() - t0, 1)
    with open(out_path, "w") as f:
        json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
