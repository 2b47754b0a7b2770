"""Structured output (numallm.grammar over llguidance) and logprobs, in the library.

Oracles: `json.loads` and `jsonschema` (independent of llguidance) on what comes out; the models
are untrained (a synthetic one) or random logits, so any valid JSON is the mask's doing.
"""
from __future__ import annotations

import json
import sys

import jsonschema
import numpy as np
import pytest

import numallm
from numallm.errors import GrammarError
from numallm.grammar import Grammar
from numallm.sampling import Sampler, SamplingParams, log_softmax
from numallm.synth import cached_model

PERSON = {"type": "object", "additionalProperties": False,
          "required": ["name", "age", "tags", "ok"],
          "properties": {"name": {"type": "string", "maxLength": 8},
                         "age": {"type": "integer", "minimum": 0, "maximum": 150},
                         "tags": {"type": "array", "items": {"enum": ["red", "blue"]}, "maxItems": 3},
                         "ok": {"type": "boolean"}}}
FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}


@pytest.fixture(scope="module")
def tiny(synth_dir):
    """Byte-level BPE vocab (llama-bpe style), untrained F32 weights (no activation rounding)."""
    path = str(cached_model(synth_dir, arch="llama", qtype="F32", shape="tiny", seed=3))
    loaded = numallm.LoadedModel(path, n_ctx=128, numa="off")
    yield loaded
    loaded.close()


@pytest.fixture(scope="module")
def spm(shared_models):
    """stories260K: a SentencePiece vocab with byte tokens and a space prefix."""
    loaded = numallm.LoadedModel(str(shared_models / "stories260K.gguf"), n_ctx=256, numa="off")
    yield loaded
    loaded.close()


def test_sampler_mask_keeps_to_allowed_tokens():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=300).astype(np.float32)
    allowed = np.zeros(300, bool)
    allowed[[3, 77, 150]] = True
    best = int(np.argmax(np.where(allowed, logits, -np.inf)))
    assert Sampler(SamplingParams(temperature=0))(logits, [], allowed) == best
    assert not allowed[int(np.argmax(logits))]       # unmasked greedy would pick another token
    for params in (SamplingParams(temperature=1.5, top_k=0, top_p=1.0, min_p=0.0, seed=1),
                   SamplingParams(temperature=0.8, top_k=2, seed=2),
                   SamplingParams(temperature=1.0, repeat_penalty=1.3, seed=3)):
        s = Sampler(params)
        picks = {s(logits, [3, 77], allowed) for _ in range(200)}
        assert picks <= {3, 77, 150} and len(picks) >= 2, (params, picks)
    with pytest.raises(numallm.errors.NumallmError, match="allows no token"):
        Sampler(SamplingParams(temperature=0))(logits, [], np.zeros(300, bool))


def _random_walk(loaded, grammar: Grammar, seed: int, steps: int = 400) -> tuple[str, bool]:
    """Sample from random logits under the grammar; tokens with closing characters get a bias
    so that strings and objects end within `steps`. (text, grammar finished)."""
    tok, n_vocab = loaded.tokenizer, loaded.args.n_vocab
    closing = np.array([any(c in tok.token_to_piece(i) for c in (b'"', b"}", b"]"))
                        for i in range(tok.vocab_size)] + [False] * (n_vocab - tok.vocab_size))
    rng = np.random.default_rng(seed)
    sampler = Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=seed))
    c, out = grammar.matcher(), []
    for _ in range(steps):
        logits = (rng.normal(size=n_vocab) + 4.0 * closing).astype(np.float32)
        t = sampler(logits, out, c.allowed())
        if t in tok.eot_ids:
            break
        c.accept(t)
        out.append(t)
        if c.done:
            return tok.decode(out), True
    return tok.decode(out), False


@pytest.mark.parametrize("vocab", ["tiny", "spm"])
def test_random_logits_under_the_mask_give_valid_json(vocab, request):
    loaded = request.getfixturevalue(vocab)
    tok, n_vocab = loaded.tokenizer, loaded.args.n_vocab
    person = Grammar.from_response_format(tok, n_vocab, FORMAT)
    anything = Grammar.from_response_format(tok, n_vocab, {"type": "json_object"})
    for seed in range(4):
        text, done = _random_walk(loaded, person, seed)
        assert done, text
        jsonschema.validate(json.loads(text), PERSON)
        text, done = _random_walk(loaded, anything, seed)
        assert done and isinstance(json.loads(text), dict), text


def test_spm_vocab_bridge_has_no_space_prefix(spm):
    tok = spm.tokenizer
    assert tok.encode("{", add_special=False)[0] != tok.encode_continuation("{")[0]
    assert tok.decode(tok.encode_continuation('{"a": 1}')) == '{"a": 1}'
    # the first token a JSON grammar allows is "{" itself, not the prefix space
    first = np.flatnonzero(Grammar.from_response_format(
        tok, spm.args.n_vocab, {"type": "json_object"}).matcher().allowed())
    assert [tok.token_to_piece(int(i)) for i in first] == [b"{"]


def test_generation_under_a_schema_is_valid_and_stops(tiny):
    g = Grammar.from_response_format(tiny.tokenizer, tiny.args.n_vocab, FORMAT)
    msgs = [{"role": "user", "content": "Who are you?"}]
    free = tiny.session().chat(msgs, 40, temperature=1.0, seed=0)
    with pytest.raises(ValueError):
        json.loads(free.text)                        # the untrained model writes no JSON alone
    for seed in range(3):
        r = tiny.session().chat(msgs, 100, temperature=1.0, seed=seed, grammar=g)
        assert r.finish_reason == "stop", r.text     # the grammar completed, no token wasted
        jsonschema.validate(json.loads(r.text), PERSON)
    greedy = [tiny.session().chat(msgs, 100, temperature=0, grammar=g).text for _ in range(2)]
    assert greedy[0] == greedy[1]


def test_bad_response_formats_are_one_line_errors(tiny):
    tok, n = tiny.tokenizer, tiny.args.n_vocab
    assert Grammar.from_response_format(tok, n, None) is None
    assert Grammar.from_response_format(tok, n, {"type": "text"}) is None
    bad = [{"type": "xml"}, {"type": "json_schema"}, "json",
           {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}},
           {"type": "json_schema", "json_schema": {"schema": {"type": "object", "$ref": "#/nope"}}}]
    for fmt in bad:
        with pytest.raises(GrammarError) as e:
            Grammar.from_response_format(tok, n, fmt)
        msg = str(e.value)
        assert "\n" not in msg and len(msg) <= 400 and "response_format" in msg, msg


def test_top_logprobs_are_the_models(tiny):
    tokens = tiny.tokenizer.encode("Hello world")
    r = list(tiny.session().stream(tokens, 4, temperature=0, logprobs=3))
    logits = tiny.session().logits(tokens + [c.token for c in r[:-1]])[len(tokens) - 1:]
    ref = [log_softmax(row) for row in logits]
    for c, row in zip(r, ref):
        assert len(c.top_logprobs) == 3
        ids = [t for t, _ in c.top_logprobs]
        assert ids[0] == c.token == int(np.argmax(row))        # greedy picks the top one
        assert [lp for _, lp in c.top_logprobs] == sorted((lp for _, lp in c.top_logprobs), reverse=True)
        # the reference runs every position in one prefill: other kernels and summation order
        # than token-by-token decode (float32 rounding on this F32 model)
        np.testing.assert_allclose([lp for _, lp in c.top_logprobs], row[ids], atol=1e-3)
        assert c.logprob == c.top_logprobs[0][1]
    assert all(c.top_logprobs == () for c in tiny.session().stream(tokens, 2, temperature=0))


def test_llama_compat_response_format_and_logprobs(tiny):
    llm = numallm.Llama(model_path=tiny.path, n_ctx=128, n_threads=1, seed=1, verbose=False)
    try:
        msgs = [{"role": "user", "content": "Who are you?"}]
        out = llm.create_chat_completion(messages=msgs, max_tokens=100, temperature=0.9,
                                         response_format={"type": "json_object", "schema": PERSON},
                                         logprobs=True, top_logprobs=2)
        choice = out["choices"][0]
        jsonschema.validate(json.loads(choice["message"]["content"]), PERSON)
        content = choice["logprobs"]["content"]
        assert len(content) == out["usage"]["completion_tokens"]
        assert all(len(e["top_logprobs"]) == 2 for e in content)
        parts = list(llm.create_chat_completion(messages=msgs, max_tokens=100, temperature=0,
                                                response_format=FORMAT, stream=True, logprobs=True))
        text = "".join(p["choices"][0]["delta"].get("content", "") for p in parts)
        jsonschema.validate(json.loads(text), PERSON)
        streamed = [e for p in parts if p["choices"][0]["logprobs"]
                    for e in p["choices"][0]["logprobs"]["content"]]
        assert "".join(e["token"] for e in streamed) == text
        c = llm("Hello world", max_tokens=6, temperature=0, logprobs=2)["choices"][0]
        lp = c["logprobs"]
        assert "".join(lp["tokens"]) == c["text"] and len(lp["token_logprobs"]) == 6
        assert lp["text_offset"][0] == len("Hello world") and all(len(d) <= 2 for d in lp["top_logprobs"])
        with pytest.raises(GrammarError):
            llm.create_chat_completion(messages=msgs, response_format={"type": "yaml"})
    finally:
        llm.close()


def test_without_llguidance_structured_output_says_what_to_install(tiny, monkeypatch):
    monkeypatch.setitem(sys.modules, "llguidance", None)   # its import fails
    assert Grammar.from_response_format(tiny.tokenizer, tiny.args.n_vocab, None) is None
    with pytest.raises(GrammarError, match=r"needs llguidance: pip install 'numallm\[serve\]'"):
        Grammar.from_response_format(tiny.tokenizer, tiny.args.n_vocab, {"type": "json_object"})


@pytest.mark.llamacpp
def test_completion_logprobs_match_llama_cpp_python(shared_models):
    """The same greedy tokens, token texts, offsets and log-probabilities as llama-cpp-python."""
    llama_cpp = pytest.importorskip("llama_cpp")
    path = str(shared_models / "stories260K.gguf")
    theirs = llama_cpp.Llama(model_path=path, n_ctx=128, logits_all=True, verbose=False, seed=1)
    ours = numallm.Llama(model_path=path, n_ctx=128, verbose=False, seed=1)
    try:
        a = theirs("Once upon a time", max_tokens=12, temperature=0, logprobs=3)["choices"][0]
        b = ours("Once upon a time", max_tokens=12, temperature=0, logprobs=3)["choices"][0]
    finally:
        ours.close()
    la, lb = a["logprobs"], b["logprobs"]
    assert b["text"] == a["text"] and lb["tokens"] == la["tokens"]
    assert lb["text_offset"] == la["text_offset"]
    # the engines' logits differ by float32 rounding (tests/test_llamacpp_parity.py), which
    # grows with the distance from the best token: ~2e-4 for the chosen ones, ~4e-3 at -8
    np.testing.assert_allclose(lb["token_logprobs"], la["token_logprobs"], atol=2e-3)
    for ta, tb in zip(la["top_logprobs"], lb["top_logprobs"]):
        assert list(tb) == list(ta)                             # same tokens, same order
        np.testing.assert_allclose(list(tb.values()), list(ta.values()), atol=1e-2)
