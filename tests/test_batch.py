"""Batched decode (LoadedModel.forward_batch / decode, Session.start): several sequences through
one forward give what each gives alone."""
from __future__ import annotations

import numpy as np
import pytest

import numallm
from numallm import ops
from numallm.errors import NumallmError
from numallm.synth import cached_model
from numallm.synth_deepseek import cached_deepseek

PROMPTS = ([1, 5, 9, 200, 33], [1, 700, 701], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [1, 99])
MODELS = [("llama", "tiny"), ("qwen2", "tiny"), ("qwen3", "tiny"), ("qwen3moe", "tiny-moe"),
          ("qwen2moe", "tiny-moe"), ("deepseek2", "tiny-v3")]


def _load(synth_dir, arch, shape, n_threads=1, **kw):
    if arch == "deepseek2":                  # MLA: a latent cache per layer, routed experts
        path = cached_deepseek(synth_dir, "Q8_0", shape, seed=1)
        # float32 latents: batched and lone rows differ by float32 rounding, which an f16 cache
        # turns into whole f16 steps of some values; on this random model (top-2 gap 0.1 of 13
        # at the 12th token, group-limited routing) that flips the 12th token
        kw = dict(cache_type_k="f32", cache_type_v="f32", **kw)
    else:
        path = cached_model(synth_dir, arch=arch, qtype="Q4_0", shape=shape, seed=1)
    return numallm.LoadedModel(str(path), n_ctx=64, n_threads=n_threads, **kw)


@pytest.fixture(scope="module", params=MODELS, ids=["-".join(m) for m in MODELS])
def loaded(request, synth_dir):
    lm = _load(synth_dir, *request.param)
    yield lm
    lm.close()


def test_rope_rows_at_their_own_positions():
    rope = ops.Rope(16, 10000.0, neox=True)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 2, 16)).astype(np.float32)
    pos = np.array([7, 0, 30])
    want = np.concatenate([rope(x[i:i + 1].copy(), int(p)) for i, p in enumerate(pos)])
    np.testing.assert_array_equal(rope(x.copy(), pos), want)


def test_batched_logits_match_each_alone(loaded):
    alone, sessions = [], []
    for p in PROMPTS:
        s = loaded.session()
        s._prefill(p)
        alone.append(loaded.forward(np.array([42]), s.cache, len(p))[-1])
        sessions.append(loaded.session())
        sessions[-1]._prefill(p)
    n0 = loaded.passes
    got = loaded.forward_batch([42] * len(PROMPTS), [s.cache for s in sessions],
                               [len(p) for p in PROMPTS])
    assert loaded.passes == n0 + 1                       # one pass for the whole batch
    assert got.shape == (len(PROMPTS), loaded.args.n_vocab)
    for g, a in zip(got, alone):
        # the same products row by row, possibly another kernel variant: float32 rounding
        np.testing.assert_allclose(g, a, rtol=0, atol=1e-4 * max(1.0, np.abs(a).max()))
        assert g.argmax() == a.argmax()


def _drive(loaded, jobs, chunk=512):
    """Decode every job ((prompt, max_tokens, sampling) each) in batched steps after prefills
    of `chunk` tokens a call; tokens per job."""
    gens = [loaded.session().start(p, n, **kw) for p, n, kw in jobs]
    out: list[list[int]] = [[] for _ in jobs]
    for g in gens:
        while not g.prefill(chunk):
            pass
    live = list(range(len(gens)))
    steps = 0
    while live:
        for i in list(live):
            c = gens[i].emit()
            out[i].append(c.token)
            if c.finish_reason is not None:
                live.remove(i)
        if live:
            loaded.decode([gens[i] for i in live])
            steps += 1
    return out, steps


def test_batched_generation_matches_each_alone(loaded):
    jobs = [(PROMPTS[0], 12, dict(temperature=0)), (PROMPTS[1], 7, dict(temperature=0)),
            (PROMPTS[2], 12, dict(temperature=0.9, seed=7)), (PROMPTS[3], 10, dict(temperature=0))]
    alone = [loaded.session().generate(p, n, **kw).tokens for p, n, kw in jobs]
    got, steps = _drive(loaded, jobs)
    assert got == alone
    assert steps == 11                       # the longest job's tokens - 1, whatever the batch size


def test_chunked_prefill_greedy_matches(loaded):
    # prompt chunks of 4 (the scheduler interleaves chunks with decode steps) change how the
    # prefill's sums are ordered, not the greedy tokens
    jobs = [(PROMPTS[2], 8, dict(temperature=0)), (PROMPTS[0], 8, dict(temperature=0))]
    alone = [loaded.session().generate(p, n, **kw).tokens for p, n, kw in jobs]
    assert _drive(loaded, jobs, chunk=4)[0] == alone


@pytest.mark.parametrize("arch,shape", [("llama", "tiny"), ("qwen3moe", "tiny-moe")])
def test_shard_batches_in_one_pass(synth_dir, arch, shape):
    """Under NUMA shard (2 virtual nodes) a batch is one pass too: each node's views run every
    sequence's rows, attending over that node's heads of each sequence's cache. The greedy tokens
    are each sequence's alone (shard's partial sums reorder float additions, as alone)."""
    lm = _load(synth_dir, arch, shape, numa="shard", virtual_nodes=2)
    try:
        assert lm.batchable([lm.session().cache, lm.session().cache])
        jobs = [(PROMPTS[0], 6, dict(temperature=0)), (PROMPTS[1], 6, dict(temperature=0)),
                (PROMPTS[2], 4, dict(temperature=0))]
        alone = [lm.session().generate(p, n, **kw).tokens for p, n, kw in jobs]
        n0 = lm.passes
        got, steps = _drive(lm, jobs)
        assert got == alone
        prefills = lm.passes - n0 - steps
        assert prefills == len(jobs)           # one pass per prompt, then one per batched step
    finally:
        lm.close()


def test_batch_errors(synth_dir):
    lm = _load(synth_dir, "llama", "tiny")
    try:
        s = lm.session()
        with pytest.raises(NumallmError, match="one token, position and cache"):
            lm.forward_batch([1, 2], [s.cache], [0, 0])
        with pytest.raises(NumallmError, match="outside the context"):
            lm.forward_batch([1, 2], [s.cache, lm.session().cache], [0, 64])
        g = s.start([1, 2, 3], 4, temperature=0)
        with pytest.raises(NumallmError, match="prefilled"):
            g.emit()
        g.prefill()
        g.emit()
        with pytest.raises(NumallmError, match="one generation per session"):
            lm.decode([g, g])
    finally:
        lm.close()


@pytest.mark.parametrize("threads", [1, 2])
def test_batched_step_replays_its_products_exactly(synth_dir, monkeypatch, threads):
    """A batched step of B plain matrices replays its encoded dispatches (ops._Replay, keyed by
    (B, K)) as one token does, with the same numbers as the step encoded afresh; a prefill chunk
    of a few tokens keeps no replay."""
    lm = _load(synth_dir, "llama", "tiny", n_threads=threads)
    try:
        def step(replay_rows: int) -> np.ndarray:
            monkeypatch.setattr(ops, "REPLAY_BATCH_T", replay_rows)
            ss = [lm.session() for _ in PROMPTS]
            for s, p in zip(ss, PROMPTS):
                s._prefill(p)
            return lm.forward_batch([42] * len(PROMPTS), [s.cache for s in ss],
                                    [len(p) for p in PROMPTS])
        fresh = step(1)
        assert not any(k[2][0] == len(PROMPTS) for k in lm.model.blk[0].attn_q._replays or {})
        first, again = step(16), step(16)
        keys = lm.model.blk[0].attn_q._replays
        assert any(k[2] == (len(PROMPTS), lm.args.n_embd) for k in keys)
        assert {k[2][0] for k in keys} <= {1, len(PROMPTS)}    # not the prompts' 5, 3, 11, 2
        np.testing.assert_array_equal(first, fresh)
        np.testing.assert_array_equal(again, fresh)
    finally:
        lm.close()


def test_batched_moe_step_replays_each_token_as_alone(synth_dir):
    """A batched step's routed feed-forward replays one-token products per (token, slot)
    (experts._MoEReplay over T*k slots): each row's logits are its lone decode's, bit for bit,
    and the step encodes no tasks afresh after the first."""
    lm = _load(synth_dir, "qwen3moe", "tiny-moe")
    try:
        alone, sessions = [], []
        for p in PROMPTS:
            s = lm.session()
            s._prefill(p)
            alone.append(lm.forward(np.array([42]), s.cache, len(p))[-1])
            sessions.append(lm.session())
            sessions[-1]._prefill(p)
        got = lm.forward_batch([42] * len(PROMPTS), [s.cache for s in sessions],
                               [len(p) for p in PROMPTS])
        np.testing.assert_array_equal(got, np.stack(alone))
        blk = lm.model.blk[0]
        assert {key[-1] for key in blk.ffn_gate_exps._moe_replays} == {1, len(PROMPTS)}
    finally:
        lm.close()


@pytest.mark.parametrize("cache_type", ["f32", "f16", "q8_0"])
@pytest.mark.parametrize("n_threads", [1, 2])
def test_batched_rope_attention_is_each_sequence_alone(cache_type, n_threads):
    """A batch's attention (BatchCaches.rope_attend) gives each row the bits its sequence's own
    decode step gives (ops.rope_attention on its cache alone), below and past
    SPLIT_ATTENTION_MIN positions (split over the pool's threads there), and fills the caches
    alike."""
    from numallm import kvcache, threads

    rng = np.random.default_rng(3)
    rope = ops.Rope(64, 10000.0, False)
    starts = [0, 3, kvcache.SPLIT_ATTENTION_MIN + 5, 40]            # (B,) first positions
    mk = lambda: [ops.KVCache(200, 4, 64, type_k=cache_type, type_v=cache_type) for _ in starts]
    alone, batched = mk(), mk()
    pool = threads.RowPool(n_threads)
    try:
        with threads.activate(pool):
            for step in range(kvcache.SPLIT_ATTENTION_MIN):
                pos = np.array(starts) + step                                # (B,)
                if step == 0:        # earlier positions: each cache filled by one prefill
                    for s, a, b in zip(starts, alone, batched):
                        if s:
                            k, v = (rng.standard_normal((s, 4, 64), dtype=np.float32)
                                    for _ in range(2))
                            a.store(k, v, 0)
                            b.store(k, v, 0)
                q = rng.standard_normal((len(starts), 16, 64), dtype=np.float32)
                k, v = (rng.standard_normal((len(starts), 4, 64), dtype=np.float32)
                        for _ in range(2))
                want = np.concatenate([ops.rope_attention(rope, q[i:i + 1].copy(),
                                                          k[i:i + 1].copy(), v[i:i + 1].copy(),
                                                          alone[i], int(pos[i]))
                                       for i in range(len(starts))])
                got = ops.rope_attention(rope, q.copy(), k.copy(), v.copy(),
                                         ops.BatchCaches(batched), pos)
                np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
        for a, b in zip(alone, batched):
            assert a.n == b.n
            for x, y in zip(a.arrays, b.arrays):
                np.testing.assert_array_equal(x, y)
        if n_threads == 2:      # the long sequence's attention ran split, as alone
            assert pool in batched[2].__dict__.get("_attends", {})
    finally:
        pool.close()
