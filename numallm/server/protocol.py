"""OpenAI request bodies (pydantic: FastAPI validates them and answers 422 with the field) and the
response / chunk dicts the official clients parse. Unknown fields are ignored, as OpenAI-compatible
servers do; llama.cpp's extra sampling fields (top_k, min_p, repeat_penalty) are honoured."""
from __future__ import annotations

import time
import uuid
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: Optional[str] = None
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)      # OpenAI's defaults
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: Optional[int] = None
    stop: Union[str, list[str], None] = None
    stream: bool = False
    stream_options: Optional[dict] = None
    n: int = 1                                             # more than 1: 400 (app.py)
    response_format: Optional[dict] = None                 # numallm.grammar.schema_of reads it
    # llama.cpp server extras (numallm's defaults otherwise)
    top_k: int = Field(40, ge=0)
    min_p: float = Field(0.05, ge=0.0, le=1.0)
    repeat_penalty: float = Field(1.0, gt=0.0)

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def sampling(self) -> dict:
        """Session.stream keyword arguments (max_tokens and grammar aside)."""
        return dict(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                    min_p=self.min_p, repeat_penalty=self.repeat_penalty, seed=self.seed,
                    stop=self.stops(), logprobs=self.n_top())

    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: Union[str, list[TextPart], None] = None

    def as_dict(self) -> dict:
        c = self.content
        text = c if isinstance(c, str) else "".join(p.text for p in c or [])
        return {"role": self.role, "content": text}


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)   # the newer name of max_tokens
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)

    def limit(self) -> Optional[int]:
        return self.max_completion_tokens or self.max_tokens

    @model_validator(mode="after")
    def _top_needs_logprobs(self):
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    def wants_logprobs(self) -> bool:
        return self.logprobs

    def n_top(self) -> int:
        return (self.top_logprobs or 0) if self.logprobs else 0


class CompletionRequest(_Sampling):
    prompt: Union[str, list[int], list[str]]
    max_tokens: Optional[int] = Field(16, ge=1)               # OpenAI's default for completions
    logprobs: Optional[int] = Field(None, ge=0, le=5)         # OpenAI's range for completions

    def limit(self) -> Optional[int]:
        return self.max_tokens

    def wants_logprobs(self) -> bool:
        return self.logprobs is not None

    def n_top(self) -> int:
        return self.logprobs or 0


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def chat_response(rid: str, model: str, text: str, finish: str, n_prompt: int, n_gen: int,
                  logprobs: Optional[dict] = None) -> dict:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "logprobs": logprobs, "finish_reason": finish}],
            "usage": usage(n_prompt, n_gen)}


def chat_chunk(rid: str, model: str, created: int, delta: dict, finish: Optional[str] = None,
               logprobs: Optional[dict] = None) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": logprobs,
                         "finish_reason": finish}]}


def completion_response(rid: str, model: str, text: str, finish: str, n_prompt: int,
                        n_gen: int, logprobs: Optional[dict] = None) -> dict:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}],
            "usage": usage(n_prompt, n_gen)}


def completion_chunk(rid: str, model: str, created: int, text: str,
                     finish: Optional[str] = None, logprobs: Optional[dict] = None) -> dict:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}]}


def usage_chunk(rid: str, model: str, created: int, obj: str, n_prompt: int, n_gen: int) -> dict:
    """The last chunk when stream_options.include_usage: no choices, the usage."""
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [],
            "usage": usage(n_prompt, n_gen)}


def error_body(message: str, type_: str, code: Optional[str] = None, param: Optional[str] = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
