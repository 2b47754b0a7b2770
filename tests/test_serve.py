"""`numallm serve` against the official `openai` client, on loopback only (127.0.0.1).

The server runs as a subprocess (`python -m numallm serve`) on a tiny synthetic model; the
oracle for its text is the library itself (Session.generate on the same file). Every wait is
bounded: a test that hangs fails on its own timeout.
"""
from __future__ import annotations

import concurrent.futures as cf
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("sse_starlette")
psutil = pytest.importorskip("psutil")

import numallm  # noqa: E402
from numallm.synth import cached_model  # noqa: E402

KEY = "sk-test-numallm"
CTX = 128
HOST = "127.0.0.1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model: str, *flags: str):
        self.port = _free_port()
        self.base = f"http://{HOST}:{self.port}"
        cmd = [sys.executable, "-m", "numallm", "serve", model, "-c", str(CTX), "--host", HOST,
               "--port", str(self.port), "--api-key", KEY, "--numa", "off", *flags]
        self.proc = subprocess.Popen(cmd, env=dict(os.environ), stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 240           # a cold Numba cache compiles the kernels
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited: {self.proc.stdout.read()}")
            try:
                if self.get("/health")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.3)
        self.stop()
        raise AssertionError("server did not come up in 240 s")

    def get(self, path: str, key: str | None = None):
        req = urllib.request.Request(self.base + path)
        if key:
            req.add_header("Authorization", f"Bearer {key}")
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def post(self, path: str, body: bytes, key: str | None = KEY):
        req = urllib.request.Request(self.base + path, data=body, method="POST")
        req.add_header("Content-Type", "application/json")
        if key:
            req.add_header("Authorization", f"Bearer {key}")
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, r.headers, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.headers, e.read().decode()

    def health(self) -> dict:
        return json.loads(self.get("/health")[1])

    def client(self, **kw):
        kw = {"api_key": KEY, "max_retries": 0, "timeout": 60, **kw}
        return openai.OpenAI(base_url=self.base + "/v1", **kw)

    def wait_idle(self, timeout: float = 15.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            h = self.health()
            if h["slots_processing"] == 0 and h["queue_depth"] == 0:
                return h
            time.sleep(0.1)
        raise AssertionError(f"slots not freed in {timeout} s: {self.health()}")

    def stop(self, timeout: float = 20.0) -> str:
        """SIGTERM; the server's output. uvicorn re-raises the signal after its graceful
        shutdown, so the exit status is the signal's (or 0 if it finished first)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise AssertionError("server ignored SIGTERM") from None
        out = self.proc.stdout.read()
        assert rc in (0, -signal.SIGTERM) and "Traceback" not in out and "error" not in out, out
        return out

    def counter(self, outcome: str) -> float:
        text = self.get("/metrics")[1]
        return float(text.split(f'numallm_requests_total{{outcome="{outcome}"}} ')[1].split()[0])


@pytest.fixture(scope="module")
def model(synth_dir) -> str:
    return str(cached_model(synth_dir, arch="llama", qtype="Q8_0", shape="tiny", seed=3))


@pytest.fixture(scope="module")
def server(model):
    s = Server(model, "--parallel", "2", "--max-queue", "4")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def oracle(model):
    loaded = numallm.LoadedModel(model, n_ctx=CTX, numa="off")
    yield loaded
    loaded.close()


def _alone(loaded, tokens, n, **kw):
    return loaded.session().generate(tokens, n, temperature=0, **kw)


def test_models_health_metrics(server):
    assert server.get("/v1/models")[0] == 401
    models = server.client().models.list().data
    assert [m.id for m in models] == [os.path.basename(server.proc.args[4])]
    assert server.health()["slots_idle"] == 2
    status, text = server.get("/metrics")
    assert status == 200 and "numallm_slots 2" in text and "numallm_queue_depth 0" in text


def test_completion_matches_library(server, oracle):
    c = server.client()
    r = c.completions.create(model="x", prompt="Hello world", max_tokens=12, temperature=0)
    want = _alone(oracle, oracle.tokenizer.encode("Hello world"), 12)
    assert r.choices[0].text == want.text and r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (want.prompt_tokens, 12)
    parts = list(c.completions.create(model="x", prompt="Hello world", max_tokens=12,
                                      temperature=0, stream=True))
    assert "".join(p.choices[0].text for p in parts) == want.text
    assert parts[-1].choices[0].finish_reason == "length"


def test_chat_stream_and_not(server, oracle):
    c = server.client()
    msgs = [{"role": "user", "content": "Tell me a story"}]
    want = _alone(oracle, oracle.chat_tokens(msgs), 10)
    r = c.chat.completions.create(model="x", messages=msgs, max_tokens=10, temperature=0)
    assert r.choices[0].message.content == want.text and r.choices[0].message.role == "assistant"
    assert r.usage.completion_tokens == 10
    chunks = list(c.chat.completions.create(model="x", messages=msgs, max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == want.text
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 10 and chunks[-1].usage.prompt_tokens == len(
        oracle.chat_tokens(msgs))


def test_sampling_seed_is_reproducible(server):
    c = server.client()
    kw = dict(model="x", prompt="The cat", max_tokens=12, temperature=0.9, top_p=0.9)
    a, b = (c.completions.create(seed=5, **kw).choices[0].text for _ in range(2))
    assert a == b


def test_stop_string(server, oracle):
    want = _alone(oracle, oracle.tokenizer.encode("Hello world"), 24).text
    stop = want[len(want) // 2:len(want) // 2 + 2]
    assert stop.strip(), want
    r = server.client().completions.create(model="x", prompt="Hello world", max_tokens=24,
                                           temperature=0, stop=[stop])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == want[:want.index(stop)]


def test_concurrent_requests_each_as_if_alone(server, oracle):
    prompts = ["Hello world", "Once upon a time", "The cat sat"]
    want = [_alone(oracle, oracle.tokenizer.encode(p), 16).text for p in prompts]
    c = server.client()
    with cf.ThreadPoolExecutor(3) as ex:
        got = list(ex.map(lambda p: c.completions.create(
            model="x", prompt=p, max_tokens=16, temperature=0).choices[0].text, prompts))
    assert got == want


def _metric(server, name: str) -> float:
    text = server.get("/metrics")[1]
    return float(text.split(f"\nnumallm_{name} ")[1].split()[0])


def test_four_streams_decode_in_batched_forwards(model, oracle):
    prompts = ["Hello world", "Once upon a time", "The cat sat", "A B C"]
    n = 40
    alone = [_alone(oracle, oracle.tokenizer.encode(p), n) for p in prompts]
    want = [r.text for r in alone]
    s = Server(model, "--parallel", "4")
    try:
        c = s.client()
        with cf.ThreadPoolExecutor(4) as ex:
            got = list(ex.map(lambda p: c.completions.create(
                model="x", prompt=p, max_tokens=n, temperature=0).choices[0].text, prompts))
        assert got == want
        tokens = _metric(s, "generation_tokens_total")
        steps, passes = _metric(s, "decode_steps_total"), _metric(s, "forward_passes_total")
        print(f"4 streams: {tokens:.0f} tokens, {steps:.0f} decode steps, {passes:.0f} forward passes")
        assert tokens == sum(r.generation_tokens for r in alone)
        # alone, each token after a stream's first costs one forward: 4 * (n - 1) decode passes;
        # batched, the streams share them (they overlap for most of their n tokens)
        assert passes < tokens / 2 and steps < 2 * n
    finally:
        s.stop()


def test_errors(server):
    with pytest.raises(openai.AuthenticationError):
        server.client(api_key="wrong").completions.create(model="x", prompt="a", max_tokens=2)
    with pytest.raises(openai.BadRequestError) as e:
        server.client().completions.create(model="x", prompt="hello " * 200, max_tokens=2)
    assert f"the context holds {CTX}" in str(e.value) and "tokens" in str(e.value)
    with pytest.raises(openai.UnprocessableEntityError):
        server.client().completions.create(model="x", prompt="a", max_tokens=2, temperature=5)
    status, _, body = server.post("/v1/chat/completions", b'{"messages": [')
    assert status == 400 and json.loads(body)["error"]["code"] == "invalid_json"
    status, _, body = server.post("/v1/chat/completions", b'{"messages": "hi"}')
    assert status == 422 and "messages" in json.loads(body)["error"]["message"]
    server.wait_idle()


def _open_stream(server, max_tokens: int):
    """A raw streaming request held open (urllib: the response is read lazily)."""
    body = json.dumps({"prompt": "Once", "max_tokens": max_tokens, "temperature": 0,
                       "stream": True}).encode()
    req = urllib.request.Request(server.base + "/v1/completions", data=body, method="POST")
    req.add_header("Authorization", f"Bearer {KEY}")
    return urllib.request.urlopen(req, timeout=30)


def test_overload_503_then_every_held_request_ends(server):
    before = server.counter("completed") + server.counter("cancelled")
    with cf.ThreadPoolExecutor(6) as ex:          # 2 decoding + 4 queued = full
        futs = [ex.submit(_open_stream, server, CTX) for _ in range(6)]
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            h = server.health()
            if h["slots_processing"] == 2 and h["queue_depth"] == 4:
                break
            time.sleep(0.05)
        assert (h["slots_processing"], h["queue_depth"]) == (2, 4), h
        status, headers, body = server.post("/v1/completions", b'{"prompt": "a", "max_tokens": 2}')
        assert status == 503 and int(headers["Retry-After"]) >= 1
        assert json.loads(body)["error"]["code"] == "overloaded"
        for f in cf.as_completed(futs, timeout=120):   # each client reads a line and leaves
            r = f.result()
            r.readline()
            r.close()
    assert server.wait_idle()["slots_idle"] == 2
    assert server.counter("rejected") == 1
    deadline = time.monotonic() + 10
    while server.counter("completed") + server.counter("cancelled") < before + 6:
        assert time.monotonic() < deadline, "a held request never ended"
        time.sleep(0.1)


def test_client_closing_mid_stream_frees_its_slot(server):
    cancelled = server.counter("cancelled")
    stream = server.client().completions.create(model="x", prompt="Once", max_tokens=CTX,
                                                temperature=0, stream=True)
    it = iter(stream)
    next(it), next(it)
    assert server.health()["slots_processing"] == 1
    stream.close()
    server.wait_idle(timeout=2.0)           # far less than the 120 tokens left would take
    assert server.counter("cancelled") == cancelled + 1


def _load_round(server, n: int, rng: random.Random) -> dict:
    c = server.client(max_retries=3)      # as real clients do: retry a 503 after its Retry-After

    def one(i: int) -> str:
        kind = rng.choice(["plain", "stream", "drop", "chat"])
        try:
            if kind == "plain":
                c.completions.create(model="x", prompt="Once " * rng.randint(1, 30),
                                     max_tokens=rng.randint(1, 16), temperature=0.7, seed=i)
            elif kind == "chat":
                c.chat.completions.create(model="x", messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=rng.randint(1, 12), temperature=0)
            else:
                s = c.completions.create(model="x", prompt="The", max_tokens=24, stream=True)
                for k, _ in enumerate(s):
                    if kind == "drop" and k == 2:
                        break
                s.close()
            return "ok"
        except openai.APIStatusError as e:
            assert e.status_code == 503, e
            return "503"

    with cf.ThreadPoolExecutor(8) as ex:
        outcomes = list(ex.map(one, range(n), timeout=240))
    return {o: outcomes.count(o) for o in set(outcomes)}


def test_load_every_request_completes_or_is_refused(server):
    rng = random.Random(0)
    proc = psutil.Process(server.proc.pid)
    first = _load_round(server, 30, rng)
    server.wait_idle()
    rss1 = proc.memory_info().rss
    second = _load_round(server, 30, rng)
    server.wait_idle()
    rss2 = proc.memory_info().rss
    print("load rounds (outcome: count):", first, second, f"RSS {rss1 / 2**20:.1f} -> {rss2 / 2**20:.1f} MiB")
    assert first.get("ok", 0) >= 20 and second.get("ok", 0) >= 20, (first, second)
    assert rss2 - rss1 < 32 * 2**20, (rss1, rss2)    # no per-request growth across rounds
    r = server.client().completions.create(model="x", prompt="a", max_tokens=2)
    assert r.usage.completion_tokens == 2        # still answers


def test_sigterm_ends_streams_and_exits(model):
    s = Server(model, "--parallel", "1")
    try:
        r = _open_stream(s, CTX)
        r.readline()
        t0 = time.monotonic()
        s.proc.send_signal(signal.SIGTERM)
        rest = r.read()                      # the stream ends (cancelled) instead of hanging
        r.close()
        assert time.monotonic() - t0 < 15
        last = json.loads(rest.strip().split(b"\n")[-1].removeprefix(b"data: "))
        assert last["error"]["code"] == "shutting_down", rest[-300:]
    finally:
        s.stop()


def test_serve_without_web_dependencies_says_what_to_install(monkeypatch, capsys, model):
    import importlib.util

    from numallm import cli

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "sse_starlette" else real(name, *a))
    assert cli.main(["serve", model]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["numallm: error: numallm serve needs sse_starlette: pip install 'numallm[serve]'"]
