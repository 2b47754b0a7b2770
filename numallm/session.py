"""Sessions: one conversation over a loaded model (engine.LoadedModel), with its own KV cache, token
history and sampler state. Any number of sessions share one loaded model; each forward step
holds the model's lock and the thread activation (pinning, BLAS limits) only while it runs, never
across a `yield`, so sessions may take turns (or run from different threads) token by token.

    loaded = numallm.engine.LoadedModel("model.gguf", n_ctx=2048)
    a, b = loaded.session(), loaded.session()
    for chunk in a.stream("Once upon a time", max_tokens=50, temperature=0): ...

Context policy: the prompt must fit in `n_ctx` (else ContextOverflowError, a one-line error);
generation stops with finish_reason "length" when the context fills up or `max_tokens` is reached.
The KV cache is kept between calls: a new prompt that starts with the tokens already processed
(a chat turn) only prefills the new part.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np

from .errors import ContextOverflowError, NumallmError
from .placement import PREFILL_CHUNK
from .sampling import Sampler, SamplingParams, check, log_softmax, max_tokens_limit, top_logprobs


@dataclass(frozen=True)
class GenerationChunk:
    """One generated token, as `Session.stream` yields it.

    text: new text since the previous chunk ("" while a multi-byte character is incomplete, or
      while text that may start a stop string is held back); token: its id; logprob: its
      log-probability under the model (before sampling filters); prompt_tokens / prompt_tps: size
      and speed of the prefill; generation_tokens / generation_tps: tokens so far and decode
      speed; finish_reason: None while generating, else "stop" (EOS, end-of-turn or stop string)
      or "length" (max_tokens or the context is full); top_logprobs: the `logprobs` most likely
      tokens at this step, ((id, logprob), ...) best first, under the model like `logprob`
      (empty unless asked for).
    """

    text: str
    token: int
    logprob: float
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    finish_reason: str | None = None
    top_logprobs: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class GenerationResult:
    text: str
    tokens: list[int]
    finish_reason: str
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    logprobs: list[float] = field(default_factory=list)


class Session:
    """One sequence over `loaded` (an engine.LoadedModel): its KV cache and the tokens in it."""

    def __init__(self, loaded):
        self.loaded = loaded
        self.n_ctx = loaded.n_ctx
        self.tokenizer = loaded.tokenizer
        self.cache = loaded.new_cache()       # per layer: this session's K/V
        self.cached: list[int] = []           # tokens whose K/V are in self.cache
        self.n_prefilled = 0                  # prompt tokens the last prefill computed (not reused)

    # -- tokens ----------------------------------------------------------------------------------
    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        return self.tokenizer.encode(text, add_special=add_special, parse_special=parse_special)

    def detokenize(self, tokens: Sequence[int], skip_special: bool = False) -> str:
        return self.tokenizer.decode(list(tokens), skip_special=skip_special)

    # -- forward ---------------------------------------------------------------------------------
    def _check_fits(self, n: int) -> None:
        if n > self.n_ctx:
            raise ContextOverflowError(f"the prompt has {n} tokens but the context holds "
                                       f"{self.n_ctx}; raise the context size (-c) or shorten the prompt")

    def _keep(self, tokens: list[int]) -> int:
        """How many leading tokens of `tokens` the cache already holds (at least one is left to
        feed, for its logits)."""
        self._check_fits(len(tokens))
        keep, limit = 0, min(len(self.cached), len(tokens) - 1)
        while keep < limit and self.cached[keep] == tokens[keep]:
            keep += 1
        return keep

    def _feed(self, tokens: list[int], a: int, n: int, last_only: bool = True) -> np.ndarray:
        """Forward tokens[a:a+n] at positions a.. (tokens[:a] are in the cache)."""
        chunk = np.asarray(tokens[a:a + n], dtype=np.int64)
        self.cached = list(tokens[:a])         # a failed step leaves only what is surely there
        out = self.loaded.forward(chunk, self.cache, a, last_only=last_only)
        self.cached = list(tokens[:a + len(chunk)])
        return out

    def _prefill(self, tokens: list[int], all_logits: bool = False) -> np.ndarray:
        """Feed `tokens`, reusing the cached prefix; returns logits of the last (or every new) token."""
        keep = 0 if all_logits else self._keep(tokens)
        self._check_fits(len(tokens))
        self.n_prefilled = len(tokens) - keep  # what this call computed (the rest came from the cache)
        out = [self._feed(tokens, a, PREFILL_CHUNK, last_only=not all_logits)
               for a in range(keep, len(tokens), PREFILL_CHUNK)]
        return np.concatenate(out) if all_logits else out[-1][-1]

    def logits(self, tokens: Sequence[int]) -> np.ndarray:
        """Logits at every position of `tokens` (a fresh context): float32 (T, n_vocab)."""
        self.cached = []
        return self._prefill(list(tokens), all_logits=True)

    def reset(self) -> None:
        """Forget the cached context."""
        self.cached = []

    # -- generation ------------------------------------------------------------------------------
    def start(self, prompt: str | Sequence[int], max_tokens: int | None = 256, *, temperature: float = 0.8,
              top_k: int = 40, top_p: float = 0.95, min_p: float = 0.05,
              repeat_penalty: float = 1.0, repeat_last_n: int = 64, seed: int | None = None,
              stop: Sequence[str] = (), stop_tokens: Sequence[int] | None = None,
              add_special: bool = True, parse_special: bool = False, grammar=None,
              logprobs: int = 0) -> "Generation":
        """A generation from `prompt` (text, or token ids used as given) to drive step by step
        (see Generation; `stream` drives one to the end). Nothing runs yet.
        max_tokens: None or -1 = until end of text or the context is full; 0 = none (the prompt
        is only processed). grammar: a numallm.grammar.Grammar the text must follow (structured
        output; it ends with "stop" once complete). logprobs: how many of the most likely
        tokens each chunk lists in top_logprobs. Out-of-range options raise OptionError
        (numallm.sampling.LIMITS)."""
        tokens = (self.tokenize(prompt, add_special, parse_special) if isinstance(prompt, str)
                  else [int(t) for t in prompt])
        if not tokens:
            raise NumallmError("the prompt is empty and the model adds no BOS token; give a prompt")
        sampler = Sampler(SamplingParams(temperature, top_k, top_p, min_p, repeat_penalty,
                                         repeat_last_n, seed))
        max_tokens = max_tokens_limit(max_tokens)   # None or -1: no limit; 0: prefill only
        stops = set(self.tokenizer.eot_ids if stop_tokens is None else stop_tokens)
        return Generation(self, tokens, max_tokens, sampler, stops, [s for s in stop if s],
                          None if grammar is None else grammar.matcher(),
                          check("logprobs", logprobs))

    def stream(self, prompt: str | Sequence[int], max_tokens: int | None = 256, **kw) -> Iterator[GenerationChunk]:
        """Generate from `prompt` (text, or token ids used as given), yielding one chunk per token.
        Keyword arguments as `start`."""
        g = self.start(prompt, max_tokens, **kw)
        while not g.prefill():
            pass
        while g.finish_reason is None:
            chunk = g.emit()
            yield chunk
            if chunk.finish_reason is not None:
                return
            g.fed(self.loaded.forward(np.asarray([g.token]), self.cache, g.position)[-1])

    def generate(self, prompt: str | Sequence[int], max_tokens: int = 256, **kw) -> GenerationResult:
        """Like `stream`, collected into one result."""
        text, toks, lps, last = [], [], [], None
        for last in self.stream(prompt, max_tokens, **kw):
            text.append(last.text)
            toks.append(last.token)
            lps.append(last.logprob)
        if last is None:   # max_tokens=0: the prompt was only processed
            return GenerationResult("", [], "length", len(self.cached), 0.0, 0, 0.0)
        return GenerationResult("".join(text), toks, last.finish_reason, last.prompt_tokens,
                                last.prompt_tps, last.generation_tokens, last.generation_tps, lps)

    def chat_tokens(self, messages: list[dict]) -> list[int]:
        """The prompt tokens for `messages` with the model's chat template."""
        return self.loaded.chat_tokens(messages)

    def chat(self, messages: list[dict], max_tokens: int = 512, stream: bool = False, **kw):
        """Answer the last message of `messages` ([{"role": ..., "content": ...}, ...]).
        Returns a GenerationResult, or an iterator of GenerationChunk when stream=True."""
        toks = self.chat_tokens(messages)
        return self.stream(toks, max_tokens, **kw) if stream else self.generate(toks, max_tokens, **kw)


class Generation:
    """One generation on a session, driven a step at a time (the server's scheduler batches the
    decode steps of several sessions, engine.LoadedModel.forward_batch):

        g = session.start(prompt, max_tokens, temperature=0)
        while not g.prefill(): ...                 # a chunk of the prompt per call
        while True:
            chunk = g.emit()                       # sample from the last logits
            if chunk.finish_reason: break
            logits = forward of g.token at g.position over session.cache
            g.fed(logits)                          # logits float32 (n_vocab,)

    `Session.stream` is this loop over one sequence."""

    def __init__(self, session: Session, tokens: list[int], max_tokens: int, sampler: Sampler,
                 stops: set[int], stop: list[str], constraint=None, n_top: int = 0):
        self.session, self.tokens, self.max_tokens = session, tokens, max_tokens
        self.sampler, self.stops, self.stop = sampler, stops, stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.decoder = session.tokenizer.stream_decoder()
        self.next_prompt = session._keep(tokens)       # the next prompt position to feed
        session.n_prefilled = len(tokens) - self.next_prompt
        self.prefill_seconds = 0.0
        self.logits: np.ndarray | None = None          # (n_vocab,) for the next emit
        self.history, self.pending, self.n_gen = list(tokens), "", 0
        self.token: int | None = None                  # the last emitted token
        self.finish_reason: str | None = None
        self.t_decode = 0.0                            # when the prompt was in
        self.constraint = constraint                   # numallm.grammar.Constraint, if any
        self.n_top = n_top                             # top_logprobs per chunk

    @property
    def prefilled(self) -> bool:
        return self.next_prompt >= len(self.tokens)

    def prefill(self, limit: int = PREFILL_CHUNK) -> bool:
        """Feed the next (up to) `limit` prompt tokens; True once the whole prompt is in."""
        if self.prefilled:
            return True
        t0 = time.perf_counter()
        a = self.next_prompt
        out = self.session._feed(self.tokens, a, min(limit, PREFILL_CHUNK))
        self.next_prompt = a + min(limit, PREFILL_CHUNK, len(self.tokens) - a)
        self.t_decode = time.perf_counter()
        self.prefill_seconds += self.t_decode - t0
        if self.prefilled:
            self.logits = out[-1]
            if self.max_tokens <= 0:               # max_tokens=0: the prompt only, no token
                self.logits, self.finish_reason = None, "length"
        return self.prefilled

    @property
    def position(self) -> int:
        """Where `token` goes in the cache (the next forward's position)."""
        return len(self.history) - 1

    def emit(self) -> GenerationChunk:
        """Sample the next token from the last logits; its chunk (finish_reason set: the end)."""
        if self.logits is None or self.finish_reason is not None:
            raise NumallmError("emit() needs the prompt prefilled, or fed() after the last emit, "
                               "and a generation that has not finished")
        logits, self.logits = self.logits, None
        allowed = None if self.constraint is None else self.constraint.allowed()
        tok = self.sampler(logits, self.history, allowed)
        lps = log_softmax(logits)
        logprob = float(lps[tok])
        self.n_gen += 1
        self.history.append(tok)
        self.token = tok
        finish = None
        if tok in self.stops:
            finish, piece = "stop", ""
        else:
            piece = self.decoder.push(tok)
        pending = self.pending + piece
        hit = min((i for i in (pending.find(s) for s in self.stop) if i >= 0), default=-1)
        if hit >= 0:
            pending, finish = pending[:hit], "stop"
        if self.constraint is not None and finish is None:
            self.constraint.accept(tok)
            if self.constraint.done:                   # the grammar is complete
                finish = "stop"
        if finish is None and (self.n_gen >= self.max_tokens or len(self.history) >= self.session.n_ctx):
            finish = "length"
        if finish is not None:
            text, pending = pending + (self.decoder.flush() if hit < 0 else ""), ""
        else:
            cut = max(0, len(pending) - self.hold) if self.stop else len(pending)
            text, pending = pending[:cut], pending[cut:]
        self.pending, self.finish_reason = pending, finish
        gen_tps = self.n_gen / max(time.perf_counter() - self.t_decode, 1e-9)
        prompt_tps = self.session.n_prefilled / max(self.prefill_seconds, 1e-9)
        return GenerationChunk(text, tok, logprob, len(self.tokens), prompt_tps, self.n_gen,
                               gen_tps, finish, top_logprobs(lps, self.n_top))

    def fed(self, logits: np.ndarray) -> None:
        """`token` went through a forward at `position`: its logits (n_vocab,) are next."""
        self.session.cached.append(self.token)     # == history: the prefix is already there
        self.logits = logits
