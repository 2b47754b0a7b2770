"""OpenAI's `logprobs` shapes from generated chunks (GenerationChunk: token, logprob,
top_logprobs), shared by the server (numallm.server) and numallm.Llama.

Log-probabilities are the model's (log-softmax of the raw logits, before repetition penalty,
grammar mask, top-k/p or temperature), as llama.cpp's server and vLLM report them by default.
"""
from __future__ import annotations

from typing import Sequence


def _text(tok, tid: int) -> tuple[str, list[int]]:
    raw = tok.token_to_piece(tid)
    return raw.decode("utf-8", errors="replace"), list(raw)


def chat_logprobs(tok, chunks: Sequence) -> dict:
    """{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}, ...]} (chat)."""
    def entry(tid: int, lp: float) -> dict:
        text, raw = _text(tok, tid)
        return {"token": text, "logprob": lp, "bytes": raw}

    return {"content": [dict(entry(c.token, c.logprob),
                             top_logprobs=[entry(t, lp) for t, lp in c.top_logprobs])
                        for c in chunks]}


def completion_logprobs(tok, chunks: Sequence, offset: int = 0) -> dict:
    """{"tokens", "token_logprobs", "top_logprobs": [{token: logprob}], "text_offset"} (legacy
    completions); `offset`: where the first chunk's text starts in the completion."""
    tokens, offsets = [], []
    for c in chunks:
        tokens.append(_text(tok, c.token)[0])
        offsets.append(offset)
        offset += text_chars(tok, [c])
    return {"tokens": tokens, "token_logprobs": [c.logprob for c in chunks],
            "top_logprobs": [_by_text(tok, c.top_logprobs) for c in chunks],
            "text_offset": offsets}


def _by_text(tok, top) -> dict[str, float]:
    """{token text: logprob}; tokens with the same text keep the best (first) one's."""
    out: dict[str, float] = {}
    for t, lp in top:
        out.setdefault(_text(tok, t)[0], lp)
    return out


def text_chars(tok, chunks: Sequence) -> int:
    """Characters the chunks' tokens add to the text (control tokens add none)."""
    return sum(0 if tok.is_control(c.token) else len(_text(tok, c.token)[0]) for c in chunks)
