"""One layer's KV cache in a chosen element type (numallm.cache_types: f32, f16, q8_0), and
attention over it. Keys and values are converted once, when stored; the attention kernels
(numallm_kernels.attention) read the cache as stored.
"""
from __future__ import annotations

import weakref

import numpy as np
from numallm_kernels import fused, fused_decode, kvcache as kv

from . import threads
from .cache_types import DEFAULT_CACHE_TYPE, check_cache_type

# Up to this many query positions attention runs as one Numba pass per head (decode, short
# chunks); longer prefills batch each KV head's queries into BLAS matmuls.
FUSED_ATTENTION_MAX_T = 8
# query positions per block of the batched path
ATTENTION_BLOCK = 64
# From this many cached positions on, one decode position's attention is cut over the pool's
# threads by KV heads (_split_attend); below it the whole layer's attention takes less than
# waking the other threads costs (~32 us at 64 positions for TinyLlama's 32 heads, one thread).
SPLIT_ATTENTION_MIN = 64

# cache type -> numpy dtype of its value array (numallm_kernels.kvcache's layouts)
_DTYPES = {"f32": np.float32, "f16": np.uint16, "q8_0": np.int8}


class KVArray:
    """Cached keys (or values) of one layer: `a` (n_kv, n_ctx, hd) in the type's dtype, and `d`
    its scales (q8_0: uint16 half bits (n_kv, n_ctx, hd // 32); other types: `a` itself, unused),
    the pair the kernels take. `zeros(shape, dtype)` allocates (placement's puts the pages on a
    node)."""

    def __init__(self, cache_type: str, shape: tuple[int, int, int], zeros=np.zeros):
        self.type = check_cache_type(cache_type)
        if cache_type == "q8_0" and shape[2] % kv.QK8_0:
            raise ValueError(f"q8_0 rows of {shape[2]} values: a multiple of {kv.QK8_0} is needed")
        self.a = zeros(shape, _DTYPES[cache_type])
        self.d = zeros((*shape[:2], shape[2] // kv.QK8_0), np.uint16) if cache_type == "q8_0" else self.a

    @property
    def nbytes(self) -> int:
        return self.a.nbytes + (self.d.nbytes if self.d is not self.a else 0)

    def store(self, x: np.ndarray, pos0: int) -> None:
        """x: float32 (T, n_kv, hd) -> rows pos0..pos0+T-1, converted to the type."""
        if self.type == "f32":
            self.a[:, pos0:pos0 + x.shape[0]] = x.transpose(1, 0, 2)
        elif self.type == "f16":
            kv.store_f16(np.ascontiguousarray(x, dtype=np.float32), self.a, pos0)
        else:
            kv.store_q8_0(np.ascontiguousarray(x, dtype=np.float32), self.a, self.d, pos0)

    def rows(self, end: int) -> np.ndarray:
        """Positions 0..end-1 as float32 (n_kv, end, hd): a view for f32, else decoded once."""
        if self.type == "f32":
            return self.a[:, :end]
        out = np.empty((self.a.shape[0], end, self.a.shape[2]), dtype=np.float32)
        kv.load_rows(self.a, self.d, end, out)
        return out

    def part(self, g0: int, g1: int) -> tuple[np.ndarray, np.ndarray]:
        """(a, d) of KV heads g0..g1-1 (C-contiguous views, for a kernel task)."""
        return self.a[g0:g1], self.d[g0:g1]


class HostCache:
    """A layer cache in host memory whose `attend` takes one sequence's rows: a batch of them
    can decode together (ops.BatchCaches, LoadedModel.forward_batch)."""


class KVCache(HostCache):
    """Keys and values of one layer for positions 0..n_ctx-1, in types type_k / type_v.

    k, v: KVArray (n_head_kv, n_ctx, head_dim); `n` positions are filled. `zeros(shape, dtype)`
    allocates them (placement passes one that puts the pages on a chosen node).
    """

    def __init__(self, n_ctx: int, n_head_kv: int, head_dim: int, zeros=np.zeros,
                 type_k: str = DEFAULT_CACHE_TYPE, type_v: str = DEFAULT_CACHE_TYPE):
        self.k = KVArray(type_k, (n_head_kv, n_ctx, head_dim), zeros)
        self.v = KVArray(type_v, (n_head_kv, n_ctx, head_dim), zeros)
        self.n = 0

    @property
    def n_ctx(self) -> int:
        return self.k.a.shape[1]

    @property
    def types(self) -> tuple[str, str]:
        return self.k.type, self.v.type

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    @property
    def arrays(self) -> list[np.ndarray]:
        """The numpy arrays holding the cache (placement checks where their pages are)."""
        out: list[np.ndarray] = []
        for x in (self.k.a, self.k.d, self.v.a, self.v.d):
            if not any(x is y for y in out):      # f32/f16 scales are the values; MLA's v is k
                out.append(x)
        return out

    def store(self, k: np.ndarray, v: np.ndarray, pos0: int) -> None:
        """k, v: float32 (T, n_head_kv, hd) at positions pos0.. into the cache."""
        self.k.store(k, pos0)
        self.v.store(v, pos0)
        self.n = pos0 + k.shape[0]

    def attend(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, pos0: int) -> np.ndarray:
        return attend(q, k, v, self, pos0)

    # every query head reads all of it (one latent row per token): a node running some of the
    # heads needs a whole copy rather than a share of the KV heads (placement)
    shared = False

    def part(self, h0: int, h1: int, zeros) -> "KVCache":
        """An empty cache of the same length and types for what KV heads [h0, h1) need: their
        own rows here; a whole copy of a shared cache."""
        return KVCache(self.n_ctx, h1 - h0, self.k.a.shape[2], zeros, *self.types)


def attend(q: np.ndarray, k: np.ndarray, v: np.ndarray, cache: KVCache, pos0: int) -> np.ndarray:
    """KVCache.attend: store k, v at pos0.. in `cache`, then attention of q over positions 0..
    (shapes as ops.attention)."""
    t, n_head, hd = q.shape
    n_kv = k.shape[1]
    group = n_head // n_kv
    end = pos0 + t
    split = _split_attend(cache, q, pos0)
    if split is not None:
        cache.store(k, v, pos0)
        return split(q, pos0)
    cache.store(k, v, pos0)
    if t <= FUSED_ATTENTION_MAX_T:
        out = np.empty((t, n_head * hd), dtype=np.float32)
        ck, cv = cache.k, cache.v
        fused.attend(np.ascontiguousarray(q, dtype=np.float32), ck.a, ck.d, cv.a, cv.d, pos0,
                     np.float32(1.0 / np.sqrt(hd)), out, np.empty((n_head, end), dtype=np.float32))
        return out
    # query heads h = g*group + j share kv head g; blocks of queries see only the keys up to
    # their last position (half the work of scoring every query against every key, causally).
    # The cached prefix is decoded to float32 once per call (a prefill chunk's T queries share it)
    keys, values = cache.k.rows(end), cache.v.rows(end)                      # (n_kv, end, hd)
    qg = q.reshape(t, n_kv, group, hd).transpose(1, 0, 2, 3)                 # (n_kv, T, group, hd)
    out = np.empty((n_kv, t, group, hd), dtype=np.float32)
    # KV heads over the pool's threads (BLAS runs one thread per caller under activate; numpy
    # releases the GIL in the products and the exp): each head's numbers are the same either way
    pool = threads.current()
    cuts = np.linspace(0, n_kv, min(pool.n_threads, n_kv) + 1).astype(int)
    if len(cuts) == 2:
        _attend_heads(qg, keys, values, pos0, 0, n_kv, out)
    else:
        pool.run_tasks([[(lambda a=a, b=b: _attend_heads(qg, keys, values, pos0, a, b, out))]
                        for a, b in zip(cuts, cuts[1:])])
    return out.transpose(1, 0, 2, 3).reshape(t, n_head * hd)


def rope_attend(rope, q: np.ndarray, k: np.ndarray, v: np.ndarray, cache: KVCache,
                pos0: int) -> np.ndarray:
    """RoPE on q and k, then `attend` (shapes as there), for a few positions (at most
    FUSED_ATTENTION_MAX_T): one native call (numallm_kernels.fused_decode), the same arithmetic
    as rope(q), rope(k) and attend one after the other. q, k are rotated in place."""
    t, n_head, hd = q.shape
    cos, sin = rope.tables(pos0 + t)
    ck, cv = cache.k, cache.v
    split = _split_attend(cache, q, pos0)
    if split is not None:
        fused_decode.rope_store(q, k, v, cos[pos0:pos0 + t], sin[pos0:pos0 + t], rope.dim,
                                rope.neox, ck.a, ck.d, cv.a, cv.d, pos0)
        cache.n = pos0 + t
        return split(q, pos0)
    out = np.empty((t, n_head * hd), dtype=np.float32)                       # (T, H * hd)
    fused_decode.rope_store_attend(q, k, v, cos[pos0:pos0 + t], sin[pos0:pos0 + t], rope.dim,
                                   rope.neox, ck.a, ck.d, cv.a, cv.d, pos0,
                                   np.float32(1.0 / np.sqrt(hd)), out)
    cache.n = pos0 + t
    return out


class BatchCaches:
    """One layer's caches of a batch of sequences decoding together (LoadedModel.forward_batch):
    passed where the layer's cache goes, with pos0 an int array (B,) of each row's position.
    The block's matrices see all B rows at once; attention splits them again, row i attending
    over caches[i] (one token per sequence per step)."""

    def __init__(self, caches: list):
        self.caches = caches

    def _check(self, q: np.ndarray, pos0) -> None:
        if not isinstance(pos0, np.ndarray) or len(pos0) != q.shape[0] or len(self.caches) != q.shape[0]:
            raise ValueError(f"a batch of {len(self.caches)} caches needs one query row and one "
                             f"position per cache, got {q.shape[0]} rows and positions {pos0!r}")

    def attend(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, pos0: np.ndarray) -> np.ndarray:
        """q: (B, n_head, hd), k/v: (B, n_head_kv, hd), pos0: (B,) -> (B, n_head * hd)."""
        self._check(q, pos0)
        out = np.empty((q.shape[0], q.shape[1] * q.shape[2]), dtype=np.float32)   # (B, n_head*hd)
        for i, c in enumerate(self.caches):
            p = int(pos0[i])
            out[i] = c.attend(q[i:i + 1], k[i:i + 1], v[i:i + 1], p)[0]
        return out

    def rope_attend(self, rope, q: np.ndarray, k: np.ndarray, v: np.ndarray,
                    pos0: np.ndarray) -> np.ndarray:
        """rope(q, pos0), rope(k, pos0), then attend (shapes as there). Each host KVCache's row
        goes the way a single sequence's decode step goes (`rope_attend`: one native call, or
        the split attention over the pool's threads from SPLIT_ATTENTION_MIN positions), so a
        sequence gets the same bits alone or in a batch, without a Python attend per row."""
        self._check(q, pos0)
        if not all(type(c) is KVCache for c in self.caches):
            rope(q, pos0)
            rope(k, pos0)
            return self.attend(q, k, v, pos0)
        b, n_head, hd = q.shape
        cos, sin = rope.tables(int(pos0.max()) + 1)
        scale = np.float32(1.0 / np.sqrt(hd))
        out = np.empty((b, n_head * hd), dtype=np.float32)                   # (B, H * hd)
        for i, c in enumerate(self.caches):
            p = int(pos0[i])
            split = _split_attend(c, q[i:i + 1], p)
            ck, cv = c.k, c.v
            if split is None:
                fused_decode.rope_store_attend(q[i:i + 1], k[i:i + 1], v[i:i + 1], cos[p:p + 1],
                                               sin[p:p + 1], rope.dim, rope.neox, ck.a, ck.d,
                                               cv.a, cv.d, p, scale, out[i:i + 1])
                c.n = p + 1
            else:
                fused_decode.rope_store(q[i:i + 1], k[i:i + 1], v[i:i + 1], cos[p:p + 1],
                                        sin[p:p + 1], rope.dim, rope.neox, ck.a, ck.d, cv.a, cv.d, p)
                c.n = p + 1
                out[i] = split(q[i:i + 1], p)[0]
        return out


def _attend_heads(qg: np.ndarray, keys: np.ndarray, values: np.ndarray, pos0: int, h0: int,
                  h1: int, out: np.ndarray) -> None:
    """The batched causal attention of KV heads [h0, h1) (attend's prefill path) into out;
    keys/values: float32 (n_kv, >= pos0 + T, hd)."""
    n_kv, t, group, hd = qg.shape
    n = h1 - h0
    scale = np.float32(1.0 / np.sqrt(hd))
    for a in range(0, t, ATTENTION_BLOCK):
        b = min(a + ATTENTION_BLOCK, t)
        n_s = pos0 + b
        qb = qg[h0:h1, a:b].reshape(n, (b - a) * group, hd)                  # rows (i, j)
        sc = np.matmul(qb, keys[h0:h1, :n_s].transpose(0, 2, 1))             # (n, rows, S)
        sc *= scale
        # query pos0 + i (i in a..b) must not see keys past itself: the last b - a columns
        tri = np.triu(np.full((b - a, b - a), -np.inf, np.float32), 1)       # (B, B)
        sc.reshape(n, b - a, group, n_s)[..., pos0 + a:] += tri[None, :, None, :]
        sc -= sc.max(axis=-1, keepdims=True)
        np.exp(sc, out=sc)
        sc /= sc.sum(axis=-1, keepdims=True)
        out[h0:h1, a:b] = np.matmul(sc, values[h0:h1, :n_s]).reshape(n, b - a, group, hd)


class AttendReplay:
    """One decode position's attention on one pool, encoded once per cache and pool: q and out
    are buffers of this object, the score rows the pool's scratch (shared_scores); each part
    (h0, h1, k0, k1), query heads [h0, h1) over KV heads [k0, k1) of `keys` / `values`, is one
    native attention task (the per-head arithmetic of fused.attend, so the result does not
    depend on the cut); a token copies q in and writes its position into the table. Made by
    `replayed_attend`; used by the split attention below and heads.attend_latent."""

    def __init__(self, keys: KVArray, values: KVArray, pool, n_head: int, width: int, parts):
        from numallm_kernels import _native

        from . import ops

        self.epoch, self.k = ops.REPLAY_EPOCH, keys.a
        self.q = np.empty((1, n_head, width), dtype=np.float32)             # (1, H, width)
        self.out = np.empty((1, n_head * width), dtype=np.float32)          # (1, H * width)
        self.scores = shared_scores(pool, n_head, keys.a.shape[1])          # (H, n_ctx)
        jobs = [[_native.attention_task(self.q[:, h0:h1], *keys.part(k0, k1), *values.part(k0, k1),
                                        self.out[:, h0 * width:h1 * width], self.scores[h0:h1], 0,
                                        1.0 / np.sqrt(width))] for h0, h1, k0, k1 in parts]
        self.table, spans = pool.encode(jobs)
        self.run = pool.bind_encoded(self.table, spans)

    def __call__(self, q: np.ndarray, pos0: int) -> np.ndarray:
        from numallm_kernels import _native

        np.copyto(self.q, q)
        self.table[:, _native.ATTN_POS0] = pos0
        self.run()
        return self.out.copy()


def replay_pool() -> "threads.RowPool | None":
    """The current pool where a replayed one-position attention can run on it (several threads,
    native tasks on this CPU), else None."""
    from numallm_kernels import _native

    pool = threads.current()
    if pool.n_threads == 1 or type(pool) is not threads.RowPool or not _native.available():
        return None
    return pool


def replayed_attend(cache, pool, q: np.ndarray, values: KVArray, parts) -> AttendReplay:
    """The AttendReplay of `cache` (its keys, and `values`) on `pool` for q (1, H, width), made
    on first use and again when the cache's arrays or the replay epoch changed; parts(n_threads)
    gives the cut (see AttendReplay)."""
    from . import ops

    reps = cache.__dict__.setdefault("_attends", {})
    r = reps.get(pool)
    if r is None or r.epoch != ops.REPLAY_EPOCH or r.k is not cache.k.a or r.q.shape != q.shape:
        r = reps[pool] = AttendReplay(cache.k, values, pool, q.shape[1], q.shape[2],
                                      parts(pool.n_threads))
    return r


_SCORES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def shared_scores(pool, n_head: int, n_ctx: int) -> np.ndarray:
    """float32 (n_head, n_ctx) score rows shared by every layer's AttendReplay on `pool`: the
    layers attend one after another on it, and one per layer would cost n_layers x n_head x n_ctx
    floats (GBs at a long context)."""
    per_pool = _SCORES.setdefault(pool, {})
    key = (n_head, n_ctx)
    if key not in per_pool:
        per_pool[key] = np.empty(key, dtype=np.float32)
    return per_pool[key]


def _split_attend(cache: KVCache, q: np.ndarray, pos0) -> "AttendReplay | None":
    """The split attention for this decode position (one query, SPLIT_ATTENTION_MIN or more
    positions, several KV heads, a pool where replay_pool allows it): the KV heads cut over the
    threads; else None."""
    t, n_head, hd = q.shape
    n_kv = cache.k.a.shape[0]
    if t != 1 or type(pos0) is not int or pos0 + 1 < SPLIT_ATTENTION_MIN \
            or type(q) is not np.ndarray or n_kv < 2:
        return None
    pool = replay_pool()
    if pool is None:
        return None
    group = n_head // n_kv

    def parts(n_threads):
        n = min(n_threads, n_kv)
        cuts = [n_kv * j // n for j in range(n + 1)]                          # KV heads per task
        return [(g0 * group, g1 * group, g0, g1) for g0, g1 in zip(cuts, cuts[1:])]
    return replayed_attend(cache, pool, q, cache.v, parts)
