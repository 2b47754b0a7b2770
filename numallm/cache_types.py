"""KV cache element types (llama.cpp's --cache-type-k / --cache-type-v names) and their bytes: the
one table the cache (numallm.kvcache), the KV size formula (models.base.BaseArgs.kv_bytes_per_token),
the planner and the CLI read. No Numba here: the commands that only plan import it.
"""
from __future__ import annotations

from .errors import OptionError

# name -> (values per block, bytes per block): f16 as IEEE half, q8_0 as GGML's block_q8_0
# (32 int8 codes and one half scale)
CACHE_TYPES = {"f32": (1, 4), "f16": (1, 2), "q8_0": (32, 34)}
# llama.cpp's default: half the memory of float32, logits within the parity bounds
DEFAULT_CACHE_TYPE = "f16"


def check_cache_type(name: str, flag: str = "cache_type_k") -> str:
    """`name` if it is a cache type, else a one-line OptionError naming `flag` and the choices."""
    if name not in CACHE_TYPES:
        raise OptionError(f"{flag} {name!r} is not a KV cache type; use one of "
                          f"{', '.join(CACHE_TYPES)}")
    return name


def row_bytes(cache_type: str, n: int) -> int:
    """Bytes of n cached values of `cache_type` (n a multiple of the type's block)."""
    block, size = CACHE_TYPES[cache_type]
    return n // block * size


def check_width(cache_type: str, width: int, what: str, flag: str) -> None:
    """A one-line OptionError when rows of `width` values cannot be stored as `cache_type`
    (q8_0 needs whole blocks of 32, as in llama.cpp)."""
    block = CACHE_TYPES[cache_type][0]
    if width % block:
        raise OptionError(f"{flag} {cache_type} stores blocks of {block} values, but this model's "
                          f"{what} holds {width}; use f16 or f32")
