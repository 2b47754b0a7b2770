"""What crosses PCIe per decoded token under an offload plan, and the decode speed the plan
predicts from bandwidths. Pure arithmetic over the plan (numallm.gpu.plan) and the model config;
numallm.gpu.offload's executor moves exactly these bytes (tests/test_gpu_hybrid.py counts them).

Per decoded token (one row of float32 activations, n_embd wide):
  - the residual stream enters a run of GPU blocks once (upload) and leaves it once (download);
    between two GPUs it goes through the host (download + upload);
  - a GPU block whose routed experts stay on the CPU sends the router's logits (n_expert) and the
    normed hidden state down, the CPU routes and runs the experts, and their sum comes back up;
  - a MoE block whose experts are on the GPU sends only the router's logits down (the CPU picks
    the experts; their ids and weights go with the kernel launches);
  - output_norm is a host vector: the last row comes down if it is on a GPU; with the head on a
    GPU the normed row goes up and the logits (n_vocab) come down.

Prediction (`predict`): per token, each GPU reads its weights (routed experts: the expected
share n_expert_used / n_expert), each NUMA node reads its share of the host's weights alike (the
nodes in parallel), and the PCIe transfers cost bytes / PCIE_GBPS + PCIE_LATENCY_S each. These
add up (no overlap counted: the shared expert overlapping the CPU's experts is a gain on top).
The KV cache reads and compute are not counted: decode is bound by weight reads.
"""
from __future__ import annotations

from dataclasses import dataclass

F32 = 4
PCIE_GBPS = 25.0          # assumed host <-> GPU copy rate (PCIe 4.0 x16 in practice)
PCIE_LATENCY_S = 10e-6    # assumed cost of one small copy (launch + synchronisation)


@dataclass(frozen=True)
class Traffic:
    down: int          # bytes GPU -> host per token
    up: int            # bytes host -> GPU per token
    transfers: int     # copies per token

    @property
    def bytes(self) -> int:
        return self.down + self.up

    def seconds(self) -> float:
        return self.bytes / (PCIE_GBPS * 1e9) + self.transfers * PCIE_LATENCY_S

    def to_dict(self) -> dict:
        return {"down": self.down, "up": self.up, "bytes": self.bytes, "transfers": self.transfers,
                "assumed_gbps": PCIE_GBPS, "assumed_latency_s": PCIE_LATENCY_S}


def pcie_per_token(plan, args) -> Traffic:
    """The copies of one decode step (T = 1) under `plan` (an OffloadPlan)."""
    from .sizes import declared_kinds

    kinds = declared_kinds(args.arch, args)
    row = args.n_embd * F32
    down = up = n = 0
    where = None                                   # None: the stream is on the host
    for lp in plan.layers:
        if lp.device != where:
            if where is not None:                  # leaves a GPU
                down, n = down + row, n + 1
            if lp.device is not None:              # enters one
                up, n = up + row, n + 1
            where = lp.device
        if lp.device is None or not any(kinds.get(t) == "experts" for t in lp.tensors + lp.host_tensors):
            continue                                            # on the CPU, or no router (dense)
        down, n = down + args.n_expert * F32, n + 1            # router logits: the CPU routes
        if lp.host_tensors:                                     # experts on the CPU
            down, up, n = down + row, up + row, n + 2
    if where is not None:                          # output_norm is a host vector
        down, n = down + row, n + 1
    if plan.output.device is not None:
        up, down, n = up + row, down + args.n_vocab * F32, n + 2
    return Traffic(down, up, n)


@dataclass(frozen=True)
class Prediction:
    tok_s: float
    gpu_s: dict          # GPU index -> seconds of weight reads per token
    node_s: dict         # node -> seconds of weight reads per token
    pcie_s: float

    def line(self) -> str:
        g = ", ".join(f"GPU {i} {1e3 * s:.2f} ms" for i, s in self.gpu_s.items())
        h = ", ".join(f"node {i} {1e3 * s:.2f} ms" for i, s in self.node_s.items())
        return (f"predicted decode: {self.tok_s:.1f} tok/s ({g + '; ' if g else ''}CPU {h}; PCIe "
                f"{1e3 * self.pcie_s:.2f} ms per token; weight reads at the listed/assumed bandwidths, "
                f"no overlap)")

    def to_dict(self) -> dict:
        return {"tok_s": self.tok_s, "gpu_s": self.gpu_s, "node_s": self.node_s, "pcie_s": self.pcie_s}


def active_bytes(names, sizes: dict[str, int], kinds: dict[str, str], args) -> float:
    """Bytes one decoded token reads of these tensors: routed experts at n_expert_used /
    n_expert, the rest whole (the caller leaves out the embedding table: one row of it)."""
    frac = args.n_expert_used / args.n_expert if getattr(args, "n_expert", 0) else 1.0
    return sum(sizes[n] * (frac if kinds.get(n) == "experts" else 1.0) for n in names)


def predict(full, sizes: dict[str, int], kinds: dict[str, str], args, node_gbps: dict[int, float]
            ) -> Prediction | None:
    """Decode tok/s of the placement Plan `full` (its .gpu the offload plan): GPU weight reads at
    each device's bandwidth, host weight reads split over the nodes as the plan splits the
    host's bytes, each node at node_gbps[node], and the PCIe traffic. sizes: GGUF name -> bytes
    as stored; kinds: declared kinds (numallm.gpu.sizes.declared_kinds). None when a GPU's
    bandwidth is unknown."""
    plan = full.gpu
    head = plan.output.tensors[0]                  # output.weight, or token_embd when tied
    skip = {head, "token_embd.weight"}             # the head is added once, where it runs
    gpu_s = {}
    for i, d in plan.devices.items():
        if not d.device.bandwidth_gbps:
            return None
        names = [n for u in plan.layers if u.device == i for n in u.tensors if n not in skip]
        read = active_bytes(names, sizes, kinds, args) + (sizes[head] if plan.output.device == i else 0)
        gpu_s[i] = read / (d.device.bandwidth_gbps * 1e9)
    on_gpu = {n for u in (*plan.layers, plan.output) if u.device is not None for n in u.tensors}
    host = [n for n in sizes if n not in on_gpu and n not in skip]
    host_read = active_bytes(host, sizes, kinds, args) + (sizes[head] if plan.output.device is None else 0)
    total = sum(n.weights for n in full.nodes) or 1
    node_s = {n.node: host_read * n.weights / total / ((node_gbps.get(n.node) or 0.0) * 1e9 or 1.0)
              for n in full.nodes}
    pcie_s = plan.pcie.seconds() if plan.pcie is not None else 0.0
    per_token = sum(gpu_s.values()) + max(node_s.values(), default=0.0) + pcie_s
    return Prediction(1.0 / per_token if per_token else 0.0, gpu_s, node_s, pcie_s)


def predict_plan(full, spec, topo) -> Prediction | None:
    """`predict` for a placement Plan from its ModelSpec and topology: tensor sizes and kinds
    from the declaration, each node's bandwidth as `numallm topo` assumes it (node -1, not
    placed: all the CPU nodes together). None without a GPU part, a topology or a GPU bandwidth."""
    from ..topology.plan import assumed_bandwidth

    if full.gpu is None or topo is None:
        return None
    sizes = {t.name: t.nbytes for t in spec.tensors}
    kinds = {t.name: "experts" if t.decl.routed else "matrix" if t.decl.kind == "experts" else t.decl.kind
             for t in spec.tensors}
    gbps = {n.id: assumed_bandwidth(n) for n in topo.cpu_nodes}
    gbps[-1] = sum(gbps.values())
    return predict(full, sizes, kinds, spec.args, gbps)
