"""`numallm.Llama`: llama-cpp-python's `Llama` class over numallm, so a script written for
llama-cpp-python runs by changing its import:

    from numallm import Llama          # was: from llama_cpp import Llama
    llm = Llama(model_path="model.gguf", n_ctx=2048, n_threads=4, seed=1, verbose=False)
    out = llm("Q: Name the planets. A:", max_tokens=32, stop=["Q:"])
    print(out["choices"][0]["text"])
    for chunk in llm.create_chat_completion(messages=[...], stream=True):
        print(chunk["choices"][0]["delta"].get("content", ""), end="")

The same constructor arguments (model_path, n_ctx, n_threads, n_gpu_layers, seed, verbose, and
type_k / type_v as ggml types 0 (f32), 1 (f16, the default), 8 (q8_0);
other llama.cpp tuning arguments are accepted and ignored), the same call signatures and
defaults, and the same response / chunk dicts, with `logprobs` (completion: an int; chat:
logprobs=True, top_logprobs=k) and chat's `response_format` ({"type": "json_object"} with an
optional "schema", or OpenAI's {"type": "json_schema", ...}: numallm.grammar). One
conversation's KV cache is kept between calls, as llama-cpp-python does: a prompt that extends
the previous one only prefills the rest.
"""
from __future__ import annotations

import logging
import time
import uuid
from typing import Iterator, Sequence

import numpy as np

from .cache_types import DEFAULT_CACHE_TYPE
from .engine import LoadedModel
from .errors import OptionError
from .grammar import Grammar
from .logprobs import chat_logprobs, completion_logprobs, text_chars

LLAMA_DEFAULT_SEED = 0xFFFFFFFF       # llama-cpp-python's "random seed"
log = logging.getLogger("numallm")


# llama.cpp's ggml_type values of the KV cache types numallm has (llama-cpp-python's type_k / type_v)
GGML_CACHE_TYPES = {0: "f32", 1: "f16", 8: "q8_0"}


def _cache_type(ggml_type: int | None, name: str) -> str:
    if ggml_type is None:
        return DEFAULT_CACHE_TYPE
    if ggml_type not in GGML_CACHE_TYPES:
        raise OptionError(f"{name}={ggml_type!r}: numallm's KV cache takes the ggml types "
                          f"{', '.join(f'{k} ({v})' for k, v in GGML_CACHE_TYPES.items())}")
    return GGML_CACHE_TYPES[ggml_type]


class Llama:
    def __init__(self, model_path: str, *, n_gpu_layers: int = 0, seed: int = LLAMA_DEFAULT_SEED,
                 n_ctx: int = 512, n_threads: int | None = None, verbose: bool = True,
                 chat_format: str | None = None, type_k: int | None = None,
                 type_v: int | None = None, **ignored):
        offload = None
        if n_gpu_layers:                    # -1: every layer, as llama-cpp-python reads it
            from .gpu import OffloadRequest

            offload = OffloadRequest(gpu_layers="all" if n_gpu_layers < 0 else int(n_gpu_layers))
        self.model_path = str(model_path)
        self.verbose = verbose
        self._loaded = LoadedModel(self.model_path, n_ctx=n_ctx or None, n_threads=n_threads,
                                   numa="auto", offload=offload,
                                   cache_type_k=_cache_type(type_k, "type_k"),
                                   cache_type_v=_cache_type(type_v, "type_v"))
        self._session = self._loaded.session()
        self.tokenizer_ = self._loaded.tokenizer
        self._rng = np.random.default_rng(None if seed in (LLAMA_DEFAULT_SEED, -1) else seed)
        if verbose:
            for line in self._loaded.notices:
                log.info(line)

    # -- llama-cpp-python's small accessors ---------------------------------------------------------
    def n_ctx(self) -> int:
        return self._loaded.n_ctx

    def n_vocab(self) -> int:
        return self._loaded.args.n_vocab

    def token_bos(self) -> int:
        return -1 if self.tokenizer_.bos_id is None else self.tokenizer_.bos_id

    def token_eos(self) -> int:
        return -1 if self.tokenizer_.eos_id is None else self.tokenizer_.eos_id

    def tokenize(self, text: bytes, add_bos: bool = True, special: bool = False) -> list[int]:
        if isinstance(text, str):
            text = text.encode("utf-8")
        return self.tokenizer_.encode(text.decode("utf-8", "replace"), add_special=add_bos,
                                      parse_special=special)

    def detokenize(self, tokens: Sequence[int], prev_tokens: Sequence[int] | None = None,
                   special: bool = False) -> bytes:
        if prev_tokens:                     # the text `tokens` add after `prev_tokens`
            whole = self.tokenizer_.decode(list(prev_tokens) + list(tokens), skip_special=not special)
            return whole[len(self.tokenizer_.decode(list(prev_tokens), skip_special=not special)):
                         ].encode("utf-8")
        out = self.tokenizer_.decode(list(tokens), skip_special=not special).encode("utf-8")
        # llama-cpp-python drops the space SentencePiece puts after a leading BOS
        if tokens and tokens[0] == self.tokenizer_.bos_id and out[:1] == b" ":
            out = out[1:]
        return out

    def reset(self) -> None:
        self._session.reset()

    def close(self) -> None:
        self._loaded.close()

    # -- generation ----------------------------------------------------------------------------------
    def _stream(self, tokens: list[int], max_tokens, temperature, top_p, top_k, min_p,
                repeat_penalty, stop, seed, logprobs: int = 0, response_format=None):
        if max_tokens is None or max_tokens <= 0:
            max_tokens = self._loaded.n_ctx   # until the context is full
        if seed is None:
            seed = int(self._rng.integers(0, 2**31))
        stop = [stop] if isinstance(stop, str) else list(stop or [])
        grammar = Grammar.from_response_format(self.tokenizer_, self.n_vocab(), response_format)
        return self._session.stream(tokens, max_tokens, temperature=temperature, top_p=top_p,
                                    top_k=top_k, min_p=min_p, repeat_penalty=repeat_penalty,
                                    seed=seed, stop=stop, logprobs=logprobs, grammar=grammar)

    def create_completion(self, prompt: str | list[int], suffix: str | None = None,
                          max_tokens: int | None = 16, temperature: float = 0.8,
                          top_p: float = 0.95, min_p: float = 0.05, echo: bool = False,
                          stop: str | list[str] | None = None, repeat_penalty: float = 1.0,
                          top_k: int = 40, stream: bool = False, seed: int | None = None,
                          logprobs: int | None = None, **ignored):
        tokens = (self.tokenize(prompt.encode("utf-8")) if isinstance(prompt, str)
                  else [int(t) for t in prompt])
        chunks = self._stream(tokens, max_tokens, temperature, top_p, top_k, min_p,
                              repeat_penalty, stop, seed, logprobs or 0)
        rid, created = f"cmpl-{uuid.uuid4()}", int(time.time())
        head = prompt if echo and isinstance(prompt, str) else ""
        # logprobs' text_offset counts from the start of the prompt, as llama-cpp-python's does
        start = len(prompt if isinstance(prompt, str)
                    else self.tokenizer_.decode(tokens, skip_special=True))

        def choice(text, finish, done=(), offset=0):
            lp = None if logprobs is None else completion_logprobs(self.tokenizer_, done, offset)
            return {"id": rid, "object": "text_completion", "created": created,
                    "model": self.model_path,
                    "choices": [{"text": text, "index": 0, "logprobs": lp,
                                 "finish_reason": finish}]}

        if stream:
            def gen() -> Iterator[dict]:
                offset, held = start, []          # tokens whose logprobs no chunk carried yet
                if head:
                    yield choice(head, None)
                for c in chunks:
                    held.append(c)
                    if c.text or c.finish_reason:
                        yield choice(c.text, c.finish_reason, held, offset)
                        offset += text_chars(self.tokenizer_, held)
                        held = []
            return gen()
        text, done = [head], []
        for c in chunks:
            text.append(c.text)
            done.append(c)
        last = done[-1]
        out = choice("".join(text), last.finish_reason, done, start)
        out["usage"] = {"prompt_tokens": len(tokens), "completion_tokens": last.generation_tokens,
                        "total_tokens": len(tokens) + last.generation_tokens}
        return out

    __call__ = create_completion

    def create_chat_completion(self, messages: list[dict], temperature: float = 0.2,
                               top_p: float = 0.95, top_k: int = 40, min_p: float = 0.05,
                               stream: bool = False, stop: str | list[str] | None = None,
                               seed: int | None = None, max_tokens: int | None = None,
                               repeat_penalty: float = 1.0, response_format: dict | None = None,
                               logprobs: bool | None = None, top_logprobs: int | None = None,
                               **ignored):
        tokens = self._loaded.chat_tokens(messages)
        chunks = self._stream(tokens, max_tokens, temperature, top_p, top_k, min_p,
                              repeat_penalty, stop, seed, (top_logprobs or 0) if logprobs else 0,
                              response_format)
        rid, created = f"chatcmpl-{uuid.uuid4()}", int(time.time())

        def lp(done):
            return chat_logprobs(self.tokenizer_, done) if logprobs else None

        def chunk(delta, finish, done=()):
            return {"id": rid, "object": "chat.completion.chunk", "created": created,
                    "model": self.model_path,
                    "choices": [{"index": 0, "delta": delta, "logprobs": lp(done) if done else None,
                                 "finish_reason": finish}]}

        if stream:
            def gen() -> Iterator[dict]:
                held = []                         # tokens whose logprobs no chunk carried yet
                yield chunk({"role": "assistant"}, None)
                for c in chunks:
                    held.append(c)
                    if c.text:
                        yield chunk({"content": c.text}, None, held)
                        held = []
                    if c.finish_reason:
                        yield chunk({}, c.finish_reason, held)
            return gen()
        text, done = [], []
        for c in chunks:
            text.append(c.text)
            done.append(c)
        last = done[-1]
        return {"id": rid, "object": "chat.completion", "created": created, "model": self.model_path,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(text)},
                             "logprobs": lp(done), "finish_reason": last.finish_reason}],
                "usage": {"prompt_tokens": len(tokens), "completion_tokens": last.generation_tokens,
                          "total_tokens": len(tokens) + last.generation_tokens}}
