"""numallm_kernels: quantized GGUF matmul kernels (installed from the `kernels/` folder).

One self-registering unit per GGML type (see `base.KernelUnit`). The engine asks for a unit by
`GGMLQuantizationType` and calls, for a weight matrix W of shape (N, K) stored as raw GGUF rows:

    w = unit.prepare(raw)                   # raw: uint8 (N, row_bytes); may re-lay out, once, at load
    unit.dequantize(w, out, r0, r1)         # out: float32 (r1 - r0, K)
    unit.matvec(w, x, out, r0, r1)          # x: float32 (K,);   writes out[r0:r1], out: (N,)
    unit.matmul(w, X, out, r0, r1)          # X: float32 (T, K); writes out[:, r0:r1], out: (T, N)

The engine's path encodes the input once and then runs row ranges, possibly concurrently:

    acts = Activations(X)                   # one per input, shared by every matrix reading it
    unit.prepare_x(acts)                    # on the caller's thread: e.g. int8 blocks of X
    unit.matmul_x(w, acts, out, r0, r1)     # per row range; reads only what prepare_x made

Row ranges let a caller give each thread (or NUMA node) its own rows; all kernels release the GIL.
Ranges starting at multiples of `unit.row_multiple` avoid recomputing a row group; a unit with
`repacks` copies the rows at prepare() and no longer reads `raw`.
Every module in this folder is imported here, so a new unit registers itself by existing.
"""
from __future__ import annotations

import importlib
import pkgutil

from .base import (Activations, KernelUnit, describe, drop_stale_caches, get, register,
                   registered_types)

drop_stale_caches()     # before any cached kernel loads
for _m in pkgutil.iter_modules(__path__):
    if not _m.name.startswith("_") and _m.name != "base":
        importlib.import_module(f"{__name__}.{_m.name}")

__all__ = ["Activations", "KernelUnit", "describe", "get", "register", "registered_types"]
