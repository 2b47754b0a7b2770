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
