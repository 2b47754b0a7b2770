"""The decode step's fused pieces give the numbers of the unfused ones: RoPE + KV store +
attention in one native call (ops.rope_attention), the norm written into a replayed product's
input (ops.norm_matmuls), and claimed dispatches (RowPool.bind_claimed: rows taken by whichever
thread is free), bit for bit."""
from __future__ import annotations

import numpy as np
import pytest

import numallm
from numallm import ops, threads
from numallm.kvcache import KVCache
from numallm.synth import cached_model
from numallm_kernels import _native

native = pytest.mark.skipif(not _native.available(), reason="no native kernel tasks on this CPU")


@pytest.mark.parametrize("cache_type", ["f32", "f16", "q8_0"])
@pytest.mark.parametrize("neox", [False, True])
@pytest.mark.parametrize("t", [1, 3])
def test_rope_attention_is_rope_then_attention(cache_type, neox, t):
    rng = np.random.default_rng(1)
    rope = ops.Rope(64, 10000.0, neox, freq_scale=0.5)
    fused, plain = (KVCache(32, 2, 64, type_k=cache_type, type_v=cache_type) for _ in range(2))
    pos = 0
    for _ in range(4):
        q = rng.standard_normal((t, 8, 64), dtype=np.float32)
        k, v = (rng.standard_normal((t, 2, 64), dtype=np.float32) for _ in range(2))
        q2, k2, v2 = q.copy(), k.copy(), v.copy()
        rope(q, pos)
        rope(k, pos)
        want = ops.attention(q, k, v, plain, pos)
        got = ops.rope_attention(rope, q2, k2, v2, fused, pos)
        np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
        np.testing.assert_array_equal(q2, q)                # rotated in place, as rope() does
        pos += t
    assert fused.n == plain.n == pos
    for a, b in zip(fused.arrays, plain.arrays):
        np.testing.assert_array_equal(a, b)


@native
@pytest.mark.parametrize("cache_type", ["f32", "f16", "q8_0"])
def test_split_attention_on_two_threads_equals_one_thread(cache_type):
    # from SPLIT_ATTENTION_MIN positions on, a decode position's attention is cut over the
    # pool's threads by KV heads (kvcache._split_attend): same bits as the one-thread fused call
    from numallm import kvcache

    rng = np.random.default_rng(2)
    rope = ops.Rope(64, 10000.0, False)
    one, two = (KVCache(160, 4, 64, type_k=cache_type, type_v=cache_type) for _ in range(2))
    pool = threads.RowPool(2)
    try:
        for pos in range(150):
            q = rng.standard_normal((1, 16, 64), dtype=np.float32)
            k, v = (rng.standard_normal((1, 4, 64), dtype=np.float32) for _ in range(2))
            want = ops.rope_attention(rope, q.copy(), k.copy(), v.copy(), one, pos)
            with threads.activate(pool):
                got = (ops.rope_attention if pos % 2 else ops.attention)(
                    *((rope,) if pos % 2 else ()), q.copy() if pos % 2 else _roped(rope, q, pos),
                    k.copy() if pos % 2 else _roped(rope, k, pos), v.copy(), two, pos)
            np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
        assert pool in two.__dict__.get("_attends", {})       # the split path ran
        assert not one.__dict__.get("_attends")               # one thread: never split
        assert kvcache.SPLIT_ATTENTION_MIN < 150
        # every layer's replay on a pool shares one (H, n_ctx) score scratch, not one per layer
        c = KVCache(160, 4, 64)
        other = kvcache.AttendReplay(c.k, c.v, pool, 16, 64, [(0, 16, 0, 4)])
        assert other.scores is two.__dict__["_attends"][pool].scores
        for a, b in zip(one.arrays, two.arrays):
            np.testing.assert_array_equal(a, b)
    finally:
        pool.close()


def _roped(rope, x, pos):
    x = x.copy()
    rope(x, pos)
    return x


def _decode(path, n_threads: int, n_tokens: int = 12) -> tuple[np.ndarray, list]:
    """Logits of an 8-token prefill and n_tokens decode steps, and the model's replays."""
    llm = numallm.load(str(path), n_ctx=64, n_threads=n_threads, numa="off")
    toks = np.arange(3, 3 + 8 + n_tokens, dtype=np.int64)
    try:
        with threads.activate(llm.pool):
            outs = [llm.model(toks[:8], llm.cache, 0)]
            outs += [llm.model(toks[i:i + 1], llm.cache, i) for i in range(8, 8 + n_tokens)]
        replays = [r for lin in llm.model.linears() for r in (lin._replays or {}).values()]
        return np.concatenate(outs), replays
    finally:
        llm.close()


@native
@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_K"])
def test_decode_same_on_one_and_two_threads_with_claimed_rows(synth_dir, qtype, monkeypatch):
    from numallm import kvcache

    monkeypatch.setattr(kvcache, "SPLIT_ATTENTION_MIN", 12)   # the split attention runs too
    path = cached_model(synth_dir, "llama", qtype)
    one, _ = _decode(path, 1)
    two, replays = _decode(path, 2)
    assert replays and all(r.ok for r in replays)
    assert all(r.run.__qualname__.startswith("RowPool.bind_claimed") for r in replays)
    np.testing.assert_array_equal(two.view(np.uint32), one.view(np.uint32))


def test_norm_matmuls_is_matmuls_of_the_norm(synth_dir):
    llm = numallm.load(str(cached_model(synth_dir, "llama", "Q8_0")), n_ctx=16, n_threads=2)
    b = llm.model.blk[0]
    rng = np.random.default_rng(2)
    try:
        with threads.activate(llm.pool):
            for t in (1, 1, 3):                # the first one-row call makes the replay
                x = rng.standard_normal((t, b.attn_q.shape[1]), dtype=np.float32)
                lins = (b.attn_q, b.attn_k, b.attn_v)
                want = ops.matmuls(ops.rms_norm(x, b.attn_norm, 1e-5), *lins)
                got = ops.norm_matmuls(x, b.attn_norm, 1e-5, *lins)
                for g, w in zip(got, want):
                    np.testing.assert_array_equal(g.view(np.uint32), w.view(np.uint32))
    finally:
        llm.close()


@native
def test_claimed_dispatches_interleave_with_the_other_commands():
    """A claimed dispatch, then Python calls, static native dispatches and claimed ones again, many
    times over: every command sees only its own fields (RowPool._quiesce), results stay exact."""
    import numallm_kernels as nk
    from numallm.gguf_file import GGMLQuantizationType as Q
    from numallm_kernels.base import Activations

    rng = np.random.default_rng(3)
    unit = nk.get(Q.Q4_0)
    n, k = 8 * 40, 256
    w = unit.prepare(unit.synthetic(n, k, rng))
    acts = Activations(rng.standard_normal((1, k)).astype(np.float32))
    unit.prepare_x(acts)
    ref = np.zeros((1, n), np.float32)
    unit.matmul_x(w, acts, ref, 0, n)
    pool = threads.RowPool(2)
    try:
        out = np.zeros_like(ref)
        jobs = [[] for _ in range(pool.claim_shares())]
        for i, (a, b) in enumerate(threads.split_rows(n, len(jobs), unit.row_multiple)):
            jobs[i].append(ops.task(unit, w, acts, out, a, b))
        run = pool.bind_claimed(jobs)
        assert run is not None and len(jobs) == 2 * threads.CLAIM_CHUNKS
        hits = []
        for i in range(300):
            out[:] = 0
            run()
            np.testing.assert_array_equal(out.view(np.uint32), ref.view(np.uint32))
            if i % 3 == 0:
                pool.run_each([lambda: hits.append(0), lambda: hits.append(1)])
            if i % 5 == 0:
                out[:] = 0
                pool.run_tasks([[ops.task(unit, w, acts, out, a, b)]
                                for a, b in threads.split_rows(n, 2, unit.row_multiple)])
                np.testing.assert_array_equal(out.view(np.uint32), ref.view(np.uint32))
        assert sorted(set(hits)) == [0, 1] and len(hits) == 200
    finally:
        pool.close()
