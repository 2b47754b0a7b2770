"""Architectures, one file each, found by the GGUF `general.architecture` name.

Each module defines `ModelArgs` (a frozen dataclass read from metadata) and `Model`.
"""
from __future__ import annotations

import importlib
from types import ModuleType

from ..errors import UnsupportedError

# GGUF architecture name -> module implementing it (aliases for arches that are llama inside)
ALIASES = {"mistral": "llama", "llama3": "llama", "tinyllama": "llama"}
SUPPORTED = ("llama", "qwen2", "qwen3", "qwen2moe", "qwen3moe", "deepseek2")


def get_module(arch: str) -> ModuleType:
    name = ALIASES.get(arch, arch)
    if name not in SUPPORTED:
        raise UnsupportedError(f"architecture {arch!r} is not supported; numallm runs "
                               f"{', '.join(SUPPORTED)} models (and aliases {', '.join(ALIASES)})")
    return importlib.import_module(f"{__name__}.{name}")


def check_tensors(f) -> None:
    """Raise GGUFError for the first tensor the architecture needs that GGUFFile `f` lacks or
    holds in another shape, without loading or repacking any weight (`numallm info`): the model
    is built with a Weights that only checks. Returns the model's Args."""
    import numpy as np

    from ..errors import GGUFError
    from .base import Weights

    class Declared(Weights):
        def linear(self, name: str, shape: tuple[int, int]):
            qt = self.file.tensor(name)   # "tensor ... is missing"
            if qt.shape != shape:
                raise GGUFError(f"{self.file.path}: tensor {name} has shape {qt.shape}, expected "
                                f"{shape} from the metadata; the file is corrupt")

        def vector(self, name: str, size: int) -> np.ndarray:
            qt = self.file.tensor(name)
            if qt.n_elements != size:
                raise GGUFError(f"{self.file.path}: tensor {name} has {qt.n_elements} elements, "
                                f"expected {size}; the file is corrupt")
            return np.zeros(size, np.float32)

    model = get_module(f.architecture).Model
    a, w = model.Args.from_gguf(f), Declared(f)
    # the same names, in the same order, as Transformer.__init__ reads them
    w.linear("token_embd.weight", (a.n_vocab, a.n_embd))
    if w.has("rope_freqs.weight"):
        w.vector("rope_freqs.weight", a.rope_dim // 2)
    for i in range(a.n_layer):
        model.Block(a, w, i, None)
    w.vector("output_norm.weight", a.n_embd)
    if w.has("output.weight"):
        w.linear("output.weight", (a.n_vocab, a.n_embd))
    return a
