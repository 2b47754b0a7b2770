"""Structured output: sampling constrained to a JSON schema (OpenAI's `response_format`), through
llguidance, a maintained grammar engine (Rust, no other Python dependencies, numpy bitmasks).

    g = Grammar.from_response_format(loaded.tokenizer, n_vocab, {"type": "json_object"})
    session.start(prompt, 200, grammar=g)     # each Generation gets its own matcher

A `Grammar` is compiled and checked once per request (a schema llguidance rejects raises
GrammarError, one line); `Grammar.matcher()` makes a `Constraint` per sequence. Per step the
constraint gives the tokens allowed next (a bool mask the sampler applies before it samples,
numallm.sampling.Sampler) and advances with the sampled token; once the grammar is complete it
is `done` and the generation ends with finish_reason "stop". End-of-text tokens are allowed only
where the grammar may end.

The vocabulary llguidance sees is the GGUF tokenizer's own (numallm.tokenizer): each token's
bytes, control tokens marked as llguidance expects (a 0xFF prefix, so no text can produce them),
and `encode_continuation` to tokenize forced bytes. It is built once per tokenizer.
"""
from __future__ import annotations

import json
import weakref

import numpy as np

from .errors import GrammarError, NumallmError

# JSON without optional whitespace: an untrained or weak model cannot wander into endless blank
# space, and the output is as short as the schema allows ("x-guidance" in a schema overrides it).
JSON_DEFAULTS = {"whitespace_flexible": False}
# Tokenizer -> {n_vocab: LLTokenizer}, built once per vocabulary
_VOCABS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _llguidance():
    try:
        import llguidance
    except ImportError:
        raise GrammarError("response_format (structured output) needs llguidance: "
                           "pip install 'numallm[serve]'") from None
    return llguidance


class _Vocab:
    """The TokenizerWrapper protocol llguidance builds its LLTokenizer from."""

    def __init__(self, tok, n_vocab: int):
        pieces = [b"\xff" + tok.token_to_piece(i) if tok.is_control(i) else tok.token_to_piece(i)
                  for i in range(tok.vocab_size)]
        self.tokens = pieces + [b""] * (n_vocab - len(pieces))   # output rows beyond the vocab
        self.eos_token_id = tok.eos_id
        self.bos_token_id = tok.bos_id
        self.special_token_ids = [i for i in range(tok.vocab_size) if tok.is_control(i)]
        self._tok = tok

    def __call__(self, text) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return self._tok.encode_continuation(text)


def vocabulary(tok, n_vocab: int):
    """llguidance's LLTokenizer for `tok` with `n_vocab` logits (built once, then cached)."""
    llg = _llguidance()
    per_tok = _VOCABS.setdefault(tok, {})
    if n_vocab not in per_tok:
        eos = sorted(tok.eot_ids) or ([tok.eos_id] if tok.eos_id is not None else None)
        per_tok[n_vocab] = llg.LLTokenizer(llg.TokenizerWrapper(_Vocab(tok, n_vocab)),
                                           n_vocab=n_vocab, eos_token=eos)
    return per_tok[n_vocab]


def schema_of(response_format: dict | None) -> dict | None:
    """The JSON schema a `response_format` asks for; None for plain text.

    OpenAI's {"type": "json_object"} (any object), {"type": "json_schema", "json_schema":
    {"name", "schema", "strict"}}, and llama-cpp-python's {"type": "json_object", "schema": {...}}.
    """
    if response_format is None:
        return None
    if not isinstance(response_format, dict):
        raise GrammarError("response_format must be an object such as {\"type\": \"json_object\"}")
    kind = response_format.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        schema = response_format.get("schema", {"type": "object"})
    elif kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict):
            raise GrammarError("response_format json_schema needs \"json_schema\": "
                               "{\"name\": ..., \"schema\": {...}}")
        schema = spec.get("schema", {"type": "object"})
    else:
        raise GrammarError(f"response_format type {kind!r} is not supported: give text, "
                           f"json_object or json_schema")
    if not isinstance(schema, (dict, bool)):
        raise GrammarError("response_format schema must be a JSON object")
    return schema


def _one_line(msg: str, limit: int = 300) -> str:
    line = " ".join(msg.split())
    return line if len(line) <= limit else line[:limit - 3] + "..."


class Grammar:
    """A compiled, checked grammar over one vocabulary; `matcher()` for each sequence."""

    def __init__(self, grammar: str, vocab, n_vocab: int):
        self.grammar, self.vocab, self.n_vocab = grammar, vocab, n_vocab

    @classmethod
    def from_schema(cls, tok, n_vocab: int, schema) -> "Grammar":
        llg = _llguidance()
        try:
            text = llg.LLMatcher.grammar_from_json_schema(
                schema if isinstance(schema, str) else json.dumps(schema), defaults=JSON_DEFAULTS)
        except (ValueError, TypeError) as e:
            raise GrammarError(f"response_format schema: {_one_line(str(e))}") from None
        vocab = vocabulary(tok, n_vocab)
        limits = llg.LLParserLimits(verbose_errors=False)
        is_error, msgs = llg.LLMatcher.validate_grammar_with_warnings(text, vocab, limits=limits)
        if is_error:
            raise GrammarError(f"response_format schema rejected: {_one_line(msgs[0])}")
        return cls(text, vocab, n_vocab)

    @classmethod
    def from_response_format(cls, tok, n_vocab: int,
                             response_format: dict | None) -> "Grammar | None":
        """None for plain text; GrammarError (one line) for a format or schema it cannot compile."""
        schema = schema_of(response_format)
        return None if schema is None else cls.from_schema(tok, n_vocab, schema)

    def matcher(self) -> "Constraint":
        return Constraint(self)


class Constraint:
    """One sequence's matcher: `allowed()` before sampling, `accept(token)` after."""

    def __init__(self, grammar: Grammar):
        llg = _llguidance()
        self.n_vocab = grammar.n_vocab
        self._m = llg.LLMatcher(grammar.vocab, grammar.grammar, log_level=0,
                                limits=llg.LLParserLimits(verbose_errors=False))
        self._check()

    def _check(self) -> None:
        if self._m.is_error():
            raise NumallmError(f"structured output failed: {_one_line(self._m.get_error())}")

    def allowed(self) -> np.ndarray:
        """bool (n_vocab,): the tokens the grammar allows next."""
        bits = np.frombuffer(self._m.compute_bitmask(), dtype=np.uint8)   # 1 bit per token
        self._check()
        return np.unpackbits(bits, bitorder="little", count=self.n_vocab).view(bool)

    def accept(self, token: int) -> None:
        """Advance past the sampled `token` (one the mask allowed)."""
        self._m.consume_token(int(token))
        self._check()

    @property
    def done(self) -> bool:
        """The grammar is complete: nothing but end of text may follow."""
        return self._m.is_stopped()
