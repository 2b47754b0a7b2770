"""Token sampling: repetition penalty, temperature, top-k, top-p, min-p, seeded randomness.

The order follows llama.cpp's default chain: penalties -> top-k -> top-p -> min-p -> temperature
-> draw. temperature <= 0 is greedy (argmax, ties to the lowest id).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.8
    top_k: int = 40            # <= 0: off
    top_p: float = 0.95        # >= 1: off
    min_p: float = 0.05        # <= 0: off
    repeat_penalty: float = 1.0  # 1: off; applied to the last `repeat_last_n` tokens
    repeat_last_n: int = 64
    seed: int | None = None


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x -= x.max()
    return x - np.log(np.exp(x).sum())


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

    def __call__(self, logits: np.ndarray, history: list[int]) -> int:
        """logits: float32 (n_vocab,) -> the chosen token id."""
        p = self.p
        logits = self.penalize(logits, history)
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
