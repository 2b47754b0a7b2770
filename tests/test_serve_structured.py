"""`numallm serve`: structured output (response_format), logprobs, n, and the bounded load test,
with the official `openai` client on loopback (127.0.0.1) against an untrained synthetic model.

Oracles: `json.loads` + `jsonschema` for structured output (an untrained model writes no JSON
unless the mask makes it), the library (Session.stream) for logprobs.
"""
from __future__ import annotations

import concurrent.futures as cf
import json
import random
import time

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("sse_starlette")
psutil = pytest.importorskip("psutil")

import jsonschema  # noqa: E402

import numallm  # noqa: E402
from numallm.synth import cached_model  # noqa: E402
from test_grammar import PERSON  # noqa: E402
from test_serve import CTX, Server  # noqa: E402

ITEM = {"type": "object", "additionalProperties": False, "required": ["id", "in_stock"],
        "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 99},
                       "in_stock": {"type": "boolean"}}}
MSGS = [{"role": "user", "content": "Describe a person"}]


def fmt(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "out", "schema": schema, "strict": True}}


@pytest.fixture(scope="module")
def model(synth_dir) -> str:
    return str(cached_model(synth_dir, arch="llama", qtype="F32", shape="tiny", seed=3))


@pytest.fixture(scope="module")
def server(model):
    s = Server(model, "--parallel", "4", "--max-queue", "8")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def oracle(model):
    loaded = numallm.LoadedModel(model, n_ctx=CTX, numa="off")
    yield loaded
    loaded.close()


def test_json_schema_output_validates(server):
    c = server.client()
    free = c.chat.completions.create(model="x", messages=MSGS, max_tokens=40, temperature=1.0, seed=0)
    with pytest.raises(ValueError):
        json.loads(free.choices[0].message.content)      # without the mask: no JSON
    for seed in range(3):
        r = c.chat.completions.create(model="x", messages=MSGS, max_tokens=100, temperature=1.0,
                                      seed=seed, response_format=fmt(PERSON))
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].message.content), PERSON)
    chunks = list(c.chat.completions.create(model="x", messages=MSGS, max_tokens=100,
                                            temperature=0.8, seed=7, stream=True,
                                            response_format=fmt(PERSON)))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks)
    jsonschema.validate(json.loads(text), PERSON)
    assert chunks[-1].choices[0].finish_reason == "stop"
    r = c.completions.create(model="x", prompt="Once upon a time", max_tokens=100, temperature=1.0,
                             seed=3, extra_body={"response_format": fmt(ITEM)})
    jsonschema.validate(json.loads(r.choices[0].text), ITEM)
    # json_object (any object): the untrained model may write one string forever, so only the
    # start is certain here; tests/test_grammar.py checks complete objects from random logits
    r = c.chat.completions.create(model="x", messages=MSGS, max_tokens=8, temperature=0,
                                  response_format={"type": "json_object"})
    assert r.choices[0].message.content.startswith('{"')
    server.wait_idle()


def test_batched_streams_each_follow_their_own_schema(server):
    c = server.client()
    schemas = [PERSON, ITEM, PERSON, ITEM]

    def one(i: int) -> str:
        return c.chat.completions.create(model="x", messages=MSGS, max_tokens=100, temperature=1.0,
                                         seed=i, response_format=fmt(schemas[i])
                                         ).choices[0].message.content

    steps = _metric(server, "decode_steps_total")
    with cf.ThreadPoolExecutor(4) as ex:
        got = list(ex.map(one, range(4)))
    for text, schema in zip(got, schemas):
        jsonschema.validate(json.loads(text), schema)
    assert _metric(server, "decode_steps_total") > steps
    server.wait_idle()


def test_rejected_schema_is_a_400_with_one_line(server):
    c = server.client()
    for bad in (fmt({"type": "strin"}), {"type": "xml"}, {"type": "json_schema"}):
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model="x", messages=MSGS, max_tokens=4, response_format=bad)
        err = e.value.body
        assert err["param"] == "response_format" and "\n" not in err["message"], err
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="x", prompt="a", max_tokens=2, n=2)
    assert e.value.body["param"] == "n" and "one choice" in e.value.body["message"]
    with pytest.raises(openai.UnprocessableEntityError):
        c.chat.completions.create(model="x", messages=MSGS, max_tokens=2, top_logprobs=2)
    assert server.health()["status"] == "ok"


def _metric(server, name: str) -> float:
    text = server.get("/metrics")[1]
    return float(text.split(f"\nnumallm_{name} ")[1].split()[0])


def test_chat_logprobs_match_the_library(server, oracle):
    want = list(oracle.session().stream(oracle.chat_tokens(MSGS), 8, temperature=0, logprobs=3))
    c = server.client()
    r = c.chat.completions.create(model="x", messages=MSGS, max_tokens=8, temperature=0,
                                  logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == 8
    for e, w in zip(content, want):
        assert e.token == oracle.tokenizer.token_to_piece(w.token).decode("utf-8", "replace")
        assert bytes(e.bytes) == oracle.tokenizer.token_to_piece(w.token)
        # the server may reuse a cached prefix or decode in a batch (other kernels than the
        # library alone, another summation order: float32 rounding on this F32 model)
        assert e.logprob == pytest.approx(w.logprob, abs=1e-3)
        assert [t.logprob for t in e.top_logprobs] == pytest.approx(
            [lp for _, lp in w.top_logprobs], abs=1e-3)
        assert e.top_logprobs[0].token == e.token
    chunks = list(c.chat.completions.create(model="x", messages=MSGS, max_tokens=8, temperature=0,
                                            logprobs=True, top_logprobs=3, stream=True))
    streamed = [e for ch in chunks if ch.choices and ch.choices[0].logprobs
                for e in ch.choices[0].logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in content]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in content], abs=1e-3)
    plain = c.chat.completions.create(model="x", messages=MSGS, max_tokens=2, temperature=0)
    assert plain.choices[0].logprobs is None


def test_completion_logprobs_shape(server, oracle):
    c = server.client()
    r = c.completions.create(model="x", prompt="Hello world", max_tokens=10, temperature=0, logprobs=2)
    ch = r.choices[0]
    lp = ch.logprobs
    assert "".join(lp.tokens) == ch.text and len(lp.token_logprobs) == 10
    start = len("Hello world")                    # offsets count from the prompt's start
    assert lp.text_offset == [start + sum(len(t) for t in lp.tokens[:i]) for i in range(10)]
    assert all(len(d) <= 2 and max(d.values()) == pytest.approx(l, abs=1e-6)
               for d, l in zip(lp.top_logprobs, lp.token_logprobs))       # greedy: the top one
    parts = list(c.completions.create(model="x", prompt="Hello world", max_tokens=10, temperature=0,
                                      logprobs=2, stream=True))
    toks = [t for p in parts if p.choices[0].logprobs for t in p.choices[0].logprobs.tokens]
    offs = [o for p in parts if p.choices[0].logprobs for o in p.choices[0].logprobs.text_offset]
    assert toks == lp.tokens and offs == lp.text_offset


def _load_round(server, n: int, concurrency: int, rng: random.Random) -> dict:
    """n requests from `concurrency` clients, none retried: mixed prompt and output lengths,
    streams, clients leaving mid-stream, structured output. Outcome counts by kind, and "503"."""
    c = server.client(max_retries=0)
    kinds = [rng.choice(["plain", "stream", "drop", "chat", "json"]) for _ in range(n)]
    sizes = [(rng.randint(1, 40), rng.randint(1, 24)) for _ in range(n)]

    def one(i: int) -> str:
        kind, (words, max_tokens) = kinds[i], sizes[i]
        try:
            if kind == "plain":
                r = c.completions.create(model="x", prompt="Once " * words, max_tokens=max_tokens,
                                         temperature=0.7, seed=i)
                assert r.usage.completion_tokens <= max_tokens
            elif kind == "chat":
                msgs = [{"role": "user", "content": "hi " * (words // 2)}]
                c.chat.completions.create(model="x", messages=msgs, max_tokens=max_tokens,
                                          temperature=0)
            elif kind == "json":
                r = c.chat.completions.create(model="x", messages=MSGS, max_tokens=100, seed=i,
                                              temperature=1.0, response_format=fmt(ITEM))
                jsonschema.validate(json.loads(r.choices[0].message.content), ITEM)
            else:
                s = c.completions.create(model="x", prompt="The " * words, max_tokens=max_tokens + 8,
                                         stream=True)
                for k, _ in enumerate(s):
                    if kind == "drop" and k == 2:
                        break                       # the client leaves mid-stream
                s.close()
            return kind
        except openai.APIStatusError as e:
            assert e.status_code == 503, e
            # a polite client backs off for Retry-After (capped here) before its next request
            time.sleep(min(2.0, float(e.response.headers["retry-after"])))
            return "503"

    with cf.ThreadPoolExecutor(concurrency) as ex:
        outcomes = list(ex.map(one, range(n), timeout=300))
    return {o: outcomes.count(o) for o in sorted(set(outcomes))}


@pytest.mark.slow
def test_load_200_requests_16_concurrent(server):
    """Every request completes or gets a clean 503; slots and memory come back; it still answers."""
    rng = random.Random(1)
    proc = psutil.Process(server.proc.pid)
    _load_round(server, 20, 16, rng)                   # warm: allocator pools, grammar vocab
    server.wait_idle()
    before = {o: server.counter(o) for o in ("completed", "cancelled", "rejected", "failed")}
    rss, rounds, t0 = [proc.memory_info().rss], [], time.monotonic()
    for _ in range(4):
        rounds.append(_load_round(server, 50, 16, rng))
        server.wait_idle(timeout=30)                   # every slot free again, nothing queued
        rss.append(proc.memory_info().rss)
    took = time.monotonic() - t0
    total = {k: sum(r.get(k, 0) for r in rounds) for k in {k for r in rounds for k in r}}
    print(f"200 requests, 16 concurrent, {took:.1f} s: {total}; RSS MiB "
          f"{[round(x / 2**20, 1) for x in rss]}")
    assert sum(total.values()) == 200
    assert total.get("503", 0) < 150 and sum(v for k, v in total.items() if k != "503") >= 50
    after = {o: server.counter(o) for o in before}
    assert after["failed"] == before["failed"]
    assert after["rejected"] - before["rejected"] == total.get("503", 0)
    assert (after["completed"] + after["cancelled"] - before["completed"] - before["cancelled"]
            == 200 - total.get("503", 0))             # every admitted request ended and was counted
    assert max(rss[2:]) - rss[1] < 32 * 2**20, rss      # no growth from round to round
    h = server.health()
    assert h["slots_idle"] == 4 and h["queue_depth"] == 0
    r = server.client().completions.create(model="x", prompt="a", max_tokens=2)
    assert r.usage.completion_tokens == 2
