"""How the declared split units (models/decl.py) cut into whole pieces per node: KV heads in
groups whose attn_output columns are whole quant blocks, MLA heads alike, and the largest-
remainder split of n units in proportion to the nodes' weights. Pure arithmetic on a ModelSpec.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..models.decl import MLA_HEADS

if TYPE_CHECKING:
    from .spec import ModelSpec


def heads_per_unit(n_head: int, n_head_kv: int, head_dim: int, block_size: int) -> int:
    """KV heads a node must take together so its attn_output columns are whole quant blocks
    (all of them when no smaller group works)."""
    group = n_head // n_head_kv
    return next((g for g in range(1, n_head_kv + 1)
                 if n_head_kv % g == 0 and g * group * head_dim % block_size == 0), n_head_kv)


def mla_unit(spec: "ModelSpec") -> int | None:
    """MLA heads a node must take together (so its attn_output columns are whole quant
    blocks), or None for a model that declares no MLA heads."""
    a = spec.args
    cols = [a.dims(t.decl.shape)[1] // a.n_head for t in spec.tensors if t.decl.split == (1, MLA_HEADS)]
    if not cols:
        return None
    bs = spec.block_size((1, MLA_HEADS))
    return next((g for g in range(1, a.n_head + 1) if a.n_head % g == 0 and g * cols[0] % bs == 0),
                a.n_head)


def mla_heads(spec: "ModelSpec", weights: list[float]) -> list[tuple[int, int]] | None:
    """Node shares of the MLA heads in whole units (mla_unit), or None without MLA heads."""
    per = mla_unit(spec)
    if per is None:
        return None
    return [(s * per, e * per) for s, e in split_units(spec.args.n_head // per, weights)]


def split_units(n_units: int, weights: list[float]) -> list[tuple[int, int]]:
    """[a, b) ranges of `n_units` indivisible units in proportion to weights (largest remainder)."""
    total = float(sum(weights))
    exact = [n_units * w / total for w in weights]
    counts = [int(e) for e in exact]
    by_rest = sorted(range(len(weights)), key=lambda i: exact[i] - counts[i], reverse=True)
    for i in by_rest[: n_units - sum(counts)]:
        counts[i] += 1
    out, a = [], 0
    for c in counts:
        out.append((a, a + c))
        a += c
    return out
