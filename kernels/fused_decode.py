"""The attention half of a decode step between its products, as one native call: RoPE on the
new queries and keys, the keys and values stored into the KV cache in its element type, and
attention over the cache. As separate calls (two RoPEs, two stores, attention) each paid a
Python dispatch and array checks on a cache the products had just evicted, several times the
arithmetic of one token.
"""
from __future__ import annotations

import numpy as np
from numba import njit, types
from numba.extending import overload

from .attention import attend
from .fused import rope
from .kvcache import store_f16, store_q8_0


def kv_store(x, a, d, pos0):
    """x float32 (T, n_kv, hd) into cache array a (with its scale array d) at pos0.. as the
    type of a stores it (kvcache.py's layouts)."""
    raise NotImplementedError("kv_store is called from Numba code only")


@overload(kv_store, inline="always")
def _kv_store(x, a, d, pos0):
    if a.dtype == types.float32:
        def impl(x, a, d, pos0):
            for t in range(x.shape[0]):
                for g in range(x.shape[1]):
                    for j in range(x.shape[2]):
                        a[g, pos0 + t, j] = x[t, g, j]
    elif a.dtype == types.uint16:
        def impl(x, a, d, pos0):
            store_f16(x, a, pos0)
    elif a.dtype == types.int8:
        def impl(x, a, d, pos0):
            store_q8_0(x, a, d, pos0)
    else:
        return None
    return impl


@njit(nogil=True, cache=True)
def rope_store(q, k, v, cos, sin, dim, neox, kc, kd, vc, vd, pos0):
    """rope_store_attend without the attention (the caller then runs it over several threads):
    q and k rotated in place, k and v stored into the cache arrays at pos0.."""
    rope(q, cos, sin, dim, neox)
    rope(k, cos, sin, dim, neox)
    kv_store(k, kc, kd, pos0)
    kv_store(v, vc, vd, pos0)


@njit(nogil=True, cache=True)
def rope_store_attend(q, k, v, cos, sin, dim, neox, kc, kd, vc, vd, pos0, scale, out):
    """q float32 (T, H, hd), k and v float32 (T, n_kv, hd) at positions pos0..pos0+T-1:
    q and k rotated in place (fused.rope; cos/sin float32 (T, dim/2) of those positions), k and
    v stored into the cache arrays kc, vc (n_kv, n_ctx, hd) with their scale arrays kd, vd
    (f32 / f16: kc, vc again), then attention.attend of q over positions 0..pos0+T-1 into out
    float32 (T, H * hd). The same arithmetic as those calls one after the other."""
    rope(q, cos, sin, dim, neox)
    rope(k, cos, sin, dim, neox)
    kv_store(k, kc, kd, pos0)
    kv_store(v, vc, vd, pos0)
    scores = np.empty((q.shape[1], pos0 + q.shape[0]), dtype=np.float32)   # (H, positions)
    attend(q, kc, kd, vc, vd, pos0, scale, out, scores)
