"""What the planner reads of a model: its config and its declared tensors with their sizes, from
a GGUF header (nothing loaded) or from a built model."""
from __future__ import annotations

from dataclasses import dataclass

from ..models import get_module


@dataclass(frozen=True)
class TensorInfo:
    name: str          # GGUF name
    decl: object       # models.base.T
    nbytes: int        # as stored
    block_size: int    # values per quant block (1 for float types)
    layer: int | None  # block number, None outside the blocks


@dataclass(frozen=True)
class ModelSpec:
    """A model as the planner sees it: its config and its declared tensors with their sizes."""

    args: object                       # the architecture's ModelArgs
    tensors: tuple[TensorInfo, ...]
    extra_bytes: int = 0               # tensors in the file that the architecture does not read
    path: str = ""
    source: object = None              # the GGUFFile (the GPU planner reads its tensor types)

    @classmethod
    def from_gguf(cls, f) -> "ModelSpec":
        """From a gguf_file.GGUFFile's header: nothing is loaded. A required tensor that is
        missing, or any declared tensor stored in another shape, raises GGUFError (what `run`
        would refuse, `info` and `plan` refuse too)."""
        from ..errors import GGUFError
        from ..gguf_file import quant_sizes

        model = get_module(f.architecture).Model
        a = model.Args.from_gguf(f)
        out = []
        for name, decl in model.declared(a):
            qt = f.tensors.get(name)
            if qt is None:
                if decl.optional:
                    continue
                raise GGUFError(f"{f.path}: tensor {name} is missing; the {a.arch} architecture "
                                f"needs it (the file is incomplete or of another architecture)")
            want = a.dims(decl.shape)
            if (tuple(qt.shape) != want if len(want) > 1 else qt.n_elements != want[0]):
                raise GGUFError(f"{f.path}: tensor {name} has shape {tuple(qt.shape)}, expected "
                                f"{want} from the metadata; the file is corrupt")
            out.append(TensorInfo(name, decl, int(qt.nbytes), quant_sizes(qt.qtype)[0], _layer(name)))
        known = {t.name for t in out}
        extra = sum(int(t.nbytes) for n, t in f.tensors.items() if n not in known)
        return cls(a, tuple(out), extra, str(f.path), f)

    @classmethod
    def from_model(cls, model) -> "ModelSpec":
        """From a built model (all on the host): its declared tensors as loaded."""
        a = model.args
        out = []
        for name, decl in type(model).declared(a):
            layer = _layer(name)
            owner = model if layer is None else model.blk[layer]
            v = getattr(owner, decl.attr, None)
            if v is None or (decl.attr == "output" and v is model.token_embd):
                continue
            bs = v.unit.block_size if decl.kind in ("matrix", "experts") else 1
            out.append(TensorInfo(name, decl, int(v.nbytes), bs, layer))
        return cls(a, tuple(out))

    @property
    def weight_bytes(self) -> int:
        """Every tensor of the file as stored (what `info` lists)."""
        return sum(t.nbytes for t in self.tensors) + self.extra_bytes

    @property
    def active_bytes(self) -> int:
        """Weight bytes one decoded token reads: every tensor but the embedding table (one row of
        it, unless it is also the output matrix), and of the routed experts only the k of
        n_expert it uses (the expected share; which ones the router picks)."""
        a = self.args
        frac = a.n_expert_used / a.n_expert if a.n_expert else 1.0
        untied = any(t.name == "output.weight" for t in self.tensors)
        return int(sum(t.nbytes * (frac if t.decl.kind == "experts" else 1.0) for t in self.tensors
                       if not (untied and t.name == "token_embd.weight")) + self.extra_bytes)

    def block_size(self, attr_split: tuple[int, str]) -> int:
        """The largest quant block of the tensors cut along columns by this split."""
        return max((t.block_size for t in self.tensors
                    if t.decl.split == attr_split and t.decl.kind in ("matrix", "experts")),
                   default=1)


def _layer(name: str) -> int | None:
    return int(name.split(".")[1]) if name.startswith("blk.") else None


