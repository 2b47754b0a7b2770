"""Is a placement where it should be? The pages of every weight slice and of the written KV cache,
as the kernel reports them (numa_mem.where: move_pages without target nodes), against the memory
node each was placed for; a WARNING for anything below a threshold.

    c = check(llm.placement, threshold=1.0)
    print("\n".join(c.lines()))        # verdict + every slice under the threshold (verbose: all)
    c.to_dict()                        # for `numallm topo MODEL --verify --json`

Shared by `numallm topo MODEL --verify` and chat's /stats, which print Placement.summary() (per
node: threads, bytes, share of local pages) above these lines.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

# slices listed under a WARNING before "and N more" (--json and -v list them all)
MAX_LISTED = 8


@dataclass(frozen=True)
class NodeCheck:
    node: int
    mem_node: int | None       # None: this node's memory is not placed (no libnuma)
    slices: int
    nbytes: int
    local: float | None        # share of the node's slice bytes on mem_node (None: not verifiable)
    worst: float | None        # the lowest slice share
    kv_nbytes: int
    kv_local: float | None     # the worst layer's share of written KV pages (None: none written)


@dataclass(frozen=True)
class Check:
    strategy: str
    threshold: float           # 0..1: a slice below it is reported
    nodes: tuple[NodeCheck, ...]
    slices: tuple              # placement.SliceReport, every one
    kv: tuple                  # placement.KVReport, every layer and node
    notes: tuple[str, ...]

    @property
    def below(self) -> list:
        return [s for s in self.slices if s.local is not None and s.local < self.threshold]

    @property
    def kv_below(self) -> list:
        return [k for k in self.kv if k.local is not None and k.local < self.threshold]

    @property
    def verified(self) -> bool:
        """Every slice's pages were read back (libnuma present, memory placed)."""
        return bool(self.slices) and all(s.local is not None for s in self.slices)

    @property
    def ok(self) -> bool:
        return self.verified and not self.below and not self.kv_below

    def warnings(self) -> list[str]:
        limit = pct(self.threshold)
        out = []
        if self.below:
            worst = min(self.below, key=lambda s: s.local)
            out.append(f"WARNING: {len(self.below)} of {len(self.slices)} weight slices have under "
                       f"{limit} of their pages on their node (worst: {_name(worst)} at "
                       f"{pct(worst.local)})")
        if self.kv_below:
            worst = min(self.kv_below, key=lambda k: k.local)
            out.append(f"WARNING: the KV cache of {len(self.kv_below)} layer/node pairs has under {limit} "
                       f"of its written pages on its node (worst: layer {worst.layer} on node "
                       f"{worst.node} at {pct(worst.local)})")
        return out

    def lines(self, verbose: bool = False) -> list[str]:
        """The verdict, then the WARNING lines with the slices below the threshold (verbose:
        every slice and KV part with its share)."""
        head = f"page check (move_pages; threshold {pct(self.threshold)} local):"
        if self.strategy == "off":
            return [f"{head} nothing placed (--numa off); choose --numa shard, replicate or isolate"]
        if not self.verified:
            why = "; ".join(self.notes) or "no pages could be read back"
            return [f"{head} not verifiable here ({why})"]
        out = []
        if self.ok:
            kv = (f" and the written pages of {len(self.kv)} KV cache parts" if self.kv_written
                  else "")
            out.append(f"{head} OK: all {len(self.slices)} weight slices{kv} are on their nodes' memory")
        else:
            out.append(head)
            out += self.warnings()
        listed = list(self.slices) if verbose else self.below
        for s in listed[: None if verbose else MAX_LISTED]:
            out.append(f"  {_name(s)} on node {s.node} (memory node {s.mem_node}), "
                       f"{s.nbytes / 2**20:.2f} MiB: {pct(s.local)} local")
        if not verbose and len(listed) > MAX_LISTED:
            out.append(f"  ... and {len(listed) - MAX_LISTED} more (-v or --json list them all)")
        kv_listed = list(self.kv) if verbose else self.kv_below
        for k in kv_listed:
            share = "no pages written" if k.local is None else f"{pct(k.local)} of written pages local"
            out.append(f"  KV cache layer {k.layer} heads {k.heads[0]}-{k.heads[1]} on node {k.node} "
                       f"(memory node {k.mem_node}): {share}")
        return out

    @property
    def kv_written(self) -> bool:
        return any(k.local is not None for k in self.kv)

    def to_dict(self) -> dict:
        return {
            "strategy": self.strategy, "threshold": round(100 * self.threshold, 3),
            "verified": self.verified, "ok": self.ok, "warnings": self.warnings(),
            "notes": list(self.notes),
            "nodes": [{"node": n.node, "mem_node": n.mem_node, "slices": n.slices, "bytes": n.nbytes,
                       "local": _share(n.local), "worst_slice": _share(n.worst),
                       "kv_bytes": n.kv_nbytes, "kv_local_worst": _share(n.kv_local)} for n in self.nodes],
            "slices": [{"tensor": s.tensor, "node": s.node, "mem_node": s.mem_node, "rows": list(s.rows),
                        "cols": None if s.cols is None else list(s.cols), "bytes": s.nbytes,
                        "local": _share(s.local)} for s in self.slices],
            "kv": [{"layer": k.layer, "node": k.node, "mem_node": k.mem_node, "heads": list(k.heads),
                    "bytes": k.nbytes, "local": _share(k.local)} for k in self.kv],
        }


def check(placement, threshold: float = 1.0) -> Check:
    """Read back where every slice's (and every written KV) page is now; `threshold` 0..1."""
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold {threshold} is not a share between 0 and 1")
    if placement.strategy == "off":
        return Check("off", threshold, (), (), (), ())
    slices, kv = tuple(placement.report()), tuple(placement.kv_report())
    nodes = []
    for g in placement.groups:
        mine = [s for s in slices if s.node == g.node]
        seen = [s for s in mine if s.local is not None]
        total = sum(s.nbytes for s in seen)
        kmine = [k for k in kv if k.node == g.node]
        kseen = [k.local for k in kmine if k.local is not None]
        nodes.append(NodeCheck(
            g.node, g.mem_node, len(mine), sum(s.nbytes for s in mine),
            sum(s.local * s.nbytes for s in seen) / total if total else None,
            min((s.local for s in seen), default=None),
            sum(k.nbytes for k in kmine), min(kseen, default=None)))
    return Check(placement.strategy, threshold, tuple(nodes), slices, kv, tuple(placement.notes))


def _name(s) -> str:
    span = f"rows {s.rows[0]}-{s.rows[1]}" if s.cols is None else f"columns {s.cols[0]}-{s.cols[1]}"
    return f"{s.tensor} {span}"


def pct(share: float) -> str:
    """100% only when exactly all: 99.96% shows as 99.9%, never rounded up to 100."""
    return "100%" if share >= 1.0 else f"{math.floor(1000 * share) / 10:.1f}%"


def _share(x: float | None) -> float | None:
    return None if x is None else round(100 * x, 3)
