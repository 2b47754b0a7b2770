"""Sessions over one loaded model, and the plan checked before anything large is allocated."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import pytest

import numallm
from numallm import threads
from numallm.synth import cached_model

from test_bad_input import _kv_str, _kv_u32, _s, write_gguf

PROMPTS = ([1, 5, 9, 200, 33], [1, 700, 701, 702])


@pytest.fixture(scope="module")
def tiny(synth_dir):
    return str(cached_model(synth_dir, arch="qwen2", qtype="Q8_0", shape="tiny", seed=3))


def _alone(loaded, prompt, **kw):
    return loaded.session().generate(prompt, 12, **kw).tokens


@pytest.mark.parametrize("numa", ["off", "shard"])
def test_interleaved_sessions_match_each_alone(tiny, numa):
    opts = dict(numa=numa, virtual_nodes=2) if numa == "shard" else {}
    with numallm.load(tiny, n_ctx=64, **opts) as llm:
        loaded = llm.loaded
        kw = [dict(temperature=0), dict(temperature=0.9, seed=7)]
        alone = [_alone(loaded, p, **k) for p, k in zip(PROMPTS, kw)]
        assert alone[0] != alone[1]
        a, b = loaded.session(), loaded.session()
        streams = [a.stream(PROMPTS[0], 12, **kw[0]), b.stream(PROMPTS[1], 12, **kw[1])]
        got: list[list[int]] = [[], []]
        for _ in range(12):                      # one token of each, turn by turn
            for i, s in enumerate(streams):
                got[i].append(next(s).token)
        assert got == alone
        # a second turn of one conversation reuses its own cache only
        turn2 = PROMPTS[0] + got[0] + [42]
        r = a.generate(turn2, 4, temperature=0)
        assert a.n_prefilled == 2         # the last answer token (never fed back) and 42
        assert r.tokens == loaded.session().generate(turn2, 4, temperature=0).tokens


def test_no_thread_activation_across_a_yield(tiny):
    with numallm.load(tiny, n_ctx=64, numa="shard", virtual_nodes=2) as llm:
        before = os.sched_getaffinity(0)
        outside = threads.current()
        s = llm.stream(PROMPTS[0], 5, temperature=0)
        next(s)
        # between tokens the caller's pool, pinning and BLAS limits are its own again
        assert threads.current() is outside and threads.current() is not llm.pool
        assert os.sched_getaffinity(0) == before
        assert len(list(s)) == 4


def test_sessions_have_their_own_caches(tiny):
    with numallm.load(tiny, n_ctx=64) as llm:
        other = llm.session()
        assert other.cache is not llm.cache
        assert all(x is not y for x, y in zip(other.cache, llm.cache))
        np.testing.assert_array_equal(other.logits(PROMPTS[0]), llm.logits(PROMPTS[0]))


# -- a model larger than the machine ---------------------------------------------------------------

def huge_model(path) -> str:
    """A llama whose F16 tensors total ~120 GiB, as a sparse file: only the header is written."""
    E, FF, V, L = 8192, 28672, 32000, 60
    shapes = {"token_embd.weight": [E, V], "output_norm.weight": [E], "output.weight": [E, V]}
    for i in range(L):
        p = f"blk.{i}."
        shapes.update({p + "attn_norm.weight": [E], p + "attn_q.weight": [E, E],
                       p + "attn_k.weight": [E, 1024], p + "attn_v.weight": [E, 1024],
                       p + "attn_output.weight": [E, E], p + "ffn_norm.weight": [E],
                       p + "ffn_gate.weight": [E, FF], p + "ffn_up.weight": [E, FF],
                       p + "ffn_down.weight": [FF, E]})
    tensors, off = [], 0
    for n, ne in shapes.items():
        f16 = len(ne) == 2
        tensors.append((n, ne, 1 if f16 else 0, off))
        off += int(np.prod(ne)) * (2 if f16 else 4)
        off += -off % 32
    kvs = [_kv_str("general.architecture", "llama"), _kv_u32("llama.embedding_length", E),
           _kv_u32("llama.block_count", L), _kv_u32("llama.feed_forward_length", FF),
           _kv_u32("llama.attention.head_count", 64), _kv_u32("llama.attention.head_count_kv", 8),
           _kv_u32("llama.context_length", 4096), _kv_str("tokenizer.ggml.model", "llama"),
           _s("tokenizer.ggml.tokens") + __import__("struct").pack("<IIQ", 9, 8, 4)
           + b"".join(_s(t) for t in ["<unk>", "<s>", "</s>", "a"])]
    p = write_gguf(path, kvs, tensors, b"")
    os.truncate(p, os.path.getsize(p) + off)          # sparse: no data blocks on disk
    return p


@pytest.mark.parametrize("verb", ["run", "chat", "bench"])
def test_model_larger_than_memory_is_refused_from_the_plan(tmp_path, verb):
    path = huge_model(tmp_path / "huge.gguf")
    assert os.path.getsize(path) > 64 * 2**30 and os.stat(path).st_blocks * 512 < 2**20
    args = {"run": ["run", path, "hi", "-n", "1"], "chat": ["chat", path],
            "bench": ["bench", path, "-p", "8", "-n", "1", "-r", "1"]}[verb]
    env = {k: v for k, v in os.environ.items() if k != "NUMALLM_DEBUG"}
    t0 = time.monotonic()
    # the child's own high-water RSS (VmHWM of its memory map): ru_maxrss would also count what
    # this pytest process held when it forked the child
    hwm = tmp_path / "hwm"
    code = ("import atexit, runpy, sys\n"
            f"atexit.register(lambda: open({str(hwm)!r}, 'w').write(open('/proc/self/status').read()))\n"
            "sys.argv = ['numallm', *sys.argv[1:]]\n"
            "runpy.run_module('numallm', run_name='__main__')\n")
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env,
                       timeout=60, stdin=subprocess.DEVNULL)
    took = time.monotonic() - t0
    err = r.stderr.strip()
    rss = next(int(line.split()[1]) * 1024 for line in hwm.read_text().splitlines()
               if line.startswith("VmHWM:"))
    status = r.returncode
    assert status != 0, err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert "needs" in err and "available" in err and "GiB" in err, err
    assert took < 10, took
    assert rss < 2**30, rss


def test_load_reports_progress_per_block(tiny):
    seen = []
    with numallm.load(tiny, n_ctx=32, progress=lambda done, total: seen.append((done, total))) as llm:
        n = llm.args.n_layer
    assert seen == [(i + 1, n) for i in range(n)]


def test_cli_progress_bar_only_on_a_terminal():
    import argparse

    from numallm.commands.common import progress_bar

    assert progress_bar(argparse.Namespace(json=True)) is None   # scripts get no bar
    if not sys.stderr.isatty():
        assert progress_bar(argparse.Namespace(json=False)) is None
