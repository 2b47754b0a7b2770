"""Token sampling: repetition penalty, temperature, top-k, top-p, min-p, seeded randomness, and
a grammar's mask of allowed tokens (structured output, numallm.grammar).

The order follows llama.cpp's default chain: penalties -> grammar mask -> top-k -> top-p ->
min-p -> temperature -> draw. temperature 0 is greedy (argmax, ties to the lowest id).

Every option's allowed range is in LIMITS, the one table both the library (SamplingParams,
LLM.stream's max_tokens) and the CLI flags (numallm.commands.common.check_args) are checked
against, so a value is refused the same way, with the same range, wherever it comes from.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, fields

import numpy as np

from .errors import NumallmError, OptionError


@dataclass(frozen=True)
class Limit:
    """Allowed values of one option: `kind` int or float, from `low` to `high` (inclusive; a float
    must also be finite); `above`: `low` itself is excluded; `none`: None is allowed too."""

    kind: type
    low: float
    high: float = math.inf
    note: str = ""
    above: bool = False
    none: bool = False

    def allowed(self, note: str | None = None) -> str:
        what = "an integer" if self.kind is int else "a number"
        num = (lambda x: str(int(x))) if self.kind is int else (lambda x: f"{x:g}")
        if self.high == math.inf:
            rng = f"{what} {'above' if self.above else 'of at least'} {num(self.low)}"
        else:
            rng = f"{what} from {num(self.low)} to {num(self.high)}"
        note = self.note if note is None else note
        return rng + (f" ({note})" if note else "")

    def ok(self, v) -> bool:
        if v is None:
            return self.none
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            return False
        if self.kind is int and not isinstance(v, numbers.Integral):
            return False
        if self.kind is float and not math.isfinite(float(v)):
            return False
        return (v > self.low if self.above else v >= self.low) and v <= self.high


# llama.cpp's ranges and special values where it documents them (common/arg.cpp)
LIMITS = {
    "max_tokens": Limit(int, -1, note="-1 or None = until end of text or the context is full, "
                        "0 = none: the prompt is only processed", none=True),
    "temperature": Limit(float, 0, note="0 = greedy"),
    "top_k": Limit(int, 0, note="0 = off"),
    "top_p": Limit(float, 0, 1, note="1 = off"),
    "min_p": Limit(float, 0, 1, note="0 = off"),
    "repeat_penalty": Limit(float, 0, note="1 = off", above=True),
    "repeat_last_n": Limit(int, -1, note="0 = off, -1 = the whole context"),
    "seed": Limit(int, 0, 2**64 - 1, note="None = random", none=True),   # numpy's seed range
    "logprobs": Limit(int, 0, 20, note="most likely tokens listed per step; OpenAI's range"),
}


def check(name: str, value, label: str | None = None, note: str | None = None):
    """`value` if LIMITS[name] allows it, else OptionError naming `label` (a CLI flag such as
    "--top-p"; default the keyword, "top_p="), the value and the allowed range (`note`: the
    special values as that flag spells them)."""
    limit = LIMITS[name]
    if limit.ok(value):
        return value
    shown = f"{label} {value}" if label else f"{name}={value!r}"
    raise OptionError(f"{shown} is not allowed: give {limit.allowed(note)}")


def max_tokens_limit(max_tokens: int | None) -> float:
    """The checked `max_tokens` as a bound on generated tokens (inf: until EOS or a full context)."""
    check("max_tokens", max_tokens)
    return math.inf if max_tokens is None or max_tokens < 0 else max_tokens


@dataclass(frozen=True)
class SamplingParams:
    """Ranges: LIMITS (out-of-range values raise OptionError, a ValueError)."""

    temperature: float = 0.8
    top_k: int = 40            # 0: off
    top_p: float = 0.95        # 1: off
    min_p: float = 0.05        # 0: off
    repeat_penalty: float = 1.0  # 1: off; applied to the last `repeat_last_n` tokens
    repeat_last_n: int = 64    # -1: the whole context
    seed: int | None = None

    def __post_init__(self):
        for f in fields(self):
            check(f.name, getattr(self, f.name))


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x -= x.max()
    return x - np.log(np.exp(x).sum())


def top_logprobs(logprobs: np.ndarray, k: int) -> tuple[tuple[int, float], ...]:
    """The `k` most likely tokens of a log_softmax row, best first: ((id, logprob), ...)."""
    k = min(k, logprobs.shape[0])
    if k <= 0:
        return ()
    ids = np.argpartition(-logprobs, k - 1)[:k]
    ids = ids[np.lexsort((ids, -logprobs[ids]))]               # best first, ties to the lowest id
    return tuple((int(i), float(logprobs[i])) for i in ids)


class Sampler:
    def __init__(self, params: SamplingParams):
        self.p = params
        self.rng = np.random.default_rng(params.seed)

    def penalize(self, logits: np.ndarray, history: list[int]) -> np.ndarray:
        """llama.cpp's repeat penalty: divide positive logits, multiply negative ones."""
        p = self.p
        if p.repeat_penalty == 1.0 or not history or p.repeat_last_n == 0:
            return logits
        recent = history[-p.repeat_last_n:] if p.repeat_last_n > 0 else history
        ids = np.unique(np.asarray(recent, dtype=np.int64))
        ids = ids[(ids >= 0) & (ids < logits.shape[0])]
        out = logits.copy()
        v = out[ids]
        out[ids] = np.where(v > 0, v / p.repeat_penalty, v * p.repeat_penalty)
        return out

    def __call__(self, logits: np.ndarray, history: list[int],
                 allowed: np.ndarray | None = None) -> int:
        """logits: float32 (n_vocab,) -> the chosen token id. `allowed`: bool (n_vocab,), the
        tokens a grammar permits (numallm.grammar); the others are out before any other step,
        so top-k / top-p / min-p choose among permitted tokens only."""
        p = self.p
        logits = self.penalize(logits, history)
        if allowed is not None:
            if not allowed.any():
                raise NumallmError("the grammar allows no token here "
                                   "(structured output cannot go on)")
            logits = np.where(allowed, logits, np.float32(-np.inf))
        if p.temperature <= 0:
            return int(np.argmax(logits))
        ids = np.argsort(-logits, kind="stable")                        # best first
        if p.top_k > 0:
            ids = ids[: p.top_k]
        x = logits[ids].astype(np.float64)
        probs = np.exp(x - x[0])
        probs /= probs.sum()
        if p.top_p < 1.0:
            keep = int(np.searchsorted(np.cumsum(probs), p.top_p) + 1)  # smallest set with mass >= top_p
            ids, x, probs = ids[:keep], x[:keep], probs[:keep]
        if p.min_p > 0:
            keep = probs >= p.min_p * probs[0]
            ids, x = ids[keep], x[keep]
        z = (x - x[0]) / p.temperature
        w = np.exp(z)
        w /= w.sum()
        return int(ids[self.rng.choice(len(ids), p=w)])
