"""numallm: NUMA-aware CPU inference for GGUF language models."""
from __future__ import annotations

__version__ = "0.1.0"

from .engine import LLM, GenerationChunk, GenerationResult, LoadedModel, Session, load  # noqa: E402
from .llama_compat import Llama  # noqa: E402

__all__ = ["load", "LLM", "Llama", "LoadedModel", "Session", "GenerationChunk", "GenerationResult", "__version__"]
