"""The HTTP layer: FastAPI routes over a Scheduler. Here errors become responses in OpenAI's
error shape ({"error": {"message", "type", "param", "code"}}); the library below only raises.

Status codes: 400 malformed JSON, a prompt that does not fit (with the numbers), a bad value, a
response_format the grammar library rejects, n > 1;
422 a well-formed body with a wrong field; 401 a missing or wrong API key; 503 + Retry-After when
every slot is busy and the queue is full, or while shutting down.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import time
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from sse_starlette.sse import EventSourceResponse

from ..errors import GrammarError, NumallmError
from ..grammar import Grammar
from ..logprobs import chat_logprobs, completion_logprobs, text_chars
from . import protocol as P
from .metrics import prometheus_text
from .scheduler import OverloadedError, ShuttingDownError


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 code: str | None = None, headers: dict | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code = status, message, type_, code
        self.headers, self.param = headers or {}, param

    def response(self) -> JSONResponse:
        return JSONResponse(P.error_body(self.message, self.type, self.code, self.param),
                            status_code=self.status, headers=self.headers)


class _JsonBody:
    """POST bodies are JSON whatever their Content-Type says (curl -d sends form encoding), as
    llama.cpp's server reads them: otherwise FastAPI would not parse them at all."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "POST":
            headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
            scope = dict(scope, headers=headers + [(b"content-type", b"application/json")])
        await self.app(scope, receive, send)


def create_app(loaded, scheduler, model_name: str, api_key: str | None = None) -> FastAPI:
    """The app serving `loaded` through `scheduler`; `api_key` guards /v1/* when given."""

    @asynccontextmanager
    async def lifespan(app):
        yield
        scheduler.close()             # cancels whatever is still queued or decoding

    app = FastAPI(title="numallm", lifespan=lifespan)
    app.add_middleware(_JsonBody)
    stats = scheduler.stats

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        errs = exc.errors()
        stats.requests["invalid"] += 1
        if any(e.get("type") == "json_invalid" for e in errs):
            return ApiError(400, "the request body is not valid JSON", code="invalid_json").response()
        e = errs[0] if errs else {}
        where = ".".join(str(x) for x in e.get("loc", ())[1:]) or None
        return ApiError(422, f"{where or 'body'}: {e.get('msg', 'invalid value')}",
                        param=where).response()

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        token = given[7:] if given.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(token.encode(), api_key.encode()):
            stats.requests["unauthorized"] += 1
            raise ApiError(401, "missing or wrong API key (Authorization: Bearer KEY)",
                           type_="authentication_error", code="invalid_api_key")

    @app.get("/health")
    async def health():
        if scheduler.stopping:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        return {"status": "ok", "slots_idle": scheduler.parallel - scheduler.n_active(),
                "slots_processing": scheduler.n_active(), "queue_depth": scheduler.queue_depth()}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(prometheus_text(scheduler),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models", dependencies=[Depends(check_key)])
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model",
                                            "created": int(time.time()), "owned_by": "numallm",
                                            "meta": {"n_ctx": loaded.n_ctx,
                                                     "parallel": scheduler.parallel}}]}

    @app.post("/v1/chat/completions", dependencies=[Depends(check_key)])
    async def chat(body: P.ChatRequest, request: Request):
        try:
            tokens = loaded.chat_tokens([m.as_dict() for m in body.messages])
        except NumallmError as e:
            raise ApiError(400, str(e)) from None
        return await _complete(request, body, tokens, chat=True)

    @app.post("/v1/completions", dependencies=[Depends(check_key)])
    async def completions(body: P.CompletionRequest, request: Request):
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise ApiError(400, f"one prompt per request, got {len(prompt)}", param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            tokens = loaded.tokenizer.encode(prompt, add_special=True)
        else:
            tokens = list(prompt)
            n_vocab = loaded.args.n_vocab
            if any(not 0 <= t < n_vocab for t in tokens):
                raise ApiError(400, f"prompt token ids must be in 0..{n_vocab - 1}", param="prompt")
        # logprobs' text_offset counts from the start of the prompt, as OpenAI and llama.cpp do
        start = len(prompt if isinstance(prompt, str)
                    else loaded.tokenizer.decode(tokens, skip_special=True))
        return await _complete(request, body, tokens, chat=False, text_offset=start)

    async def _complete(request: Request, body, tokens: list[int], chat: bool,
                        text_offset: int = 0):
        if not tokens:
            raise ApiError(400, "the prompt is empty and the model adds no BOS token", param="prompt")
        n_ctx = loaded.n_ctx
        if len(tokens) > n_ctx:
            stats.requests["invalid"] += 1
            raise ApiError(400, f"the prompt has {len(tokens)} tokens but the context holds {n_ctx} "
                           f"(server started with -c {n_ctx}); shorten the prompt",
                           code="context_length_exceeded", param="messages" if chat else "prompt")
        limit = body.limit() or n_ctx       # Session.stream stops at a full context anyway
        sampling = dict(body.sampling(), grammar=await _grammar(body))
        try:
            job = scheduler.submit(tokens, limit, sampling, asyncio.get_running_loop())
        except OverloadedError as e:
            raise ApiError(503, str(e), type_="server_busy", code="overloaded",
                           headers={"Retry-After": str(e.retry_after)}) from None
        except ShuttingDownError as e:
            raise ApiError(503, str(e), type_="server_busy", code="shutting_down") from None
        rid = P.new_id("chatcmpl" if chat else "cmpl")
        first = await _next(job, request)       # errors before the first token keep their status
        if first is None:                       # the client left while waiting
            return JSONResponse({}, status_code=499)
        if body.stream:
            # on shutdown the scheduler ends every job with ShuttingDownError: the grace period
            # lets the stream send that as its last event before sse-starlette closes it
            return EventSourceResponse(_sse(job, request, body, rid, first, len(tokens), chat,
                                            text_offset),
                                       ping=15, shutdown_grace_period=3)
        text, evs, n_gen, finish, ev = [], [], 0, "length", first
        while ev is not None:
            text.append(ev.text)
            evs.append(ev)
            n_gen, finish = ev.generation_tokens, ev.finish_reason or finish
            ev = await _next(job, request)
        make = P.chat_response if chat else P.completion_response
        return make(rid, model_name, "".join(text), finish, len(tokens), n_gen,
                    _logprobs(body, chat, evs, text_offset))

    async def _grammar(body):
        """The request's structured-output grammar (None for text), compiled off the event loop;
        one a grammar library rejects is a 400. n > 1 is refused here too, before any work."""
        if body.n != 1:
            stats.requests["invalid"] += 1
            more = f"; send {body.n} requests instead (they decode together)" if body.n > 1 else ""
            raise ApiError(400, f"n={body.n}: this server returns one choice per request (n must "
                           f"be 1){more}", param="n")
        if body.response_format is None:
            return None
        try:
            return await asyncio.to_thread(Grammar.from_response_format, loaded.tokenizer,
                                           loaded.args.n_vocab, body.response_format)
        except GrammarError as e:
            stats.requests["invalid"] += 1
            raise ApiError(400, str(e), param="response_format") from None

    def _logprobs(body, chat: bool, evs: list, offset: int = 0):
        """OpenAI's logprobs object for the chunks `evs`, or None when not asked for."""
        if not body.wants_logprobs():
            return None
        tok = loaded.tokenizer
        return chat_logprobs(tok, evs) if chat else completion_logprobs(tok, evs, offset)

    async def _next(job, request: Request):
        """The job's next chunk; None at its end or when the client went away (job cancelled)."""
        while True:
            try:
                ev = await asyncio.wait_for(job.events.get(), timeout=1.0)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    job.cancel()
                    return None
                continue
            if isinstance(ev, BaseException):
                job.cancel()
                if isinstance(ev, ShuttingDownError):
                    raise ApiError(503, str(ev), type_="server_busy", code="shutting_down")
                if isinstance(ev, NumallmError):
                    raise ApiError(400, str(ev))
                raise ApiError(500, f"{type(ev).__name__}: {ev}", type_="server_error")
            return ev

    async def _sse(job, request, body, rid, first, n_prompt, chat, text_offset):
        created, obj = int(time.time()), "chat.completion.chunk" if chat else "text_completion"

        held, offset = [], text_offset     # chunks no event carried the logprobs of; their offset

        def chunk(text, finish=None):
            """One event; it carries the logprobs of every token since the previous one."""
            nonlocal offset
            lp = _logprobs(body, chat, held, offset)
            offset += text_chars(loaded.tokenizer, held)
            held.clear()
            if chat:
                delta = {"content": text} if text or finish is None else {}
                return P.chat_chunk(rid, model_name, created, delta, finish, lp)
            return P.completion_chunk(rid, model_name, created, text, finish, lp)

        ev, n_gen = first, 0
        try:
            if chat:
                yield json.dumps(P.chat_chunk(rid, model_name, created,
                                              {"role": "assistant", "content": ""}))
            while ev is not None:
                n_gen = ev.generation_tokens
                held.append(ev)
                if ev.finish_reason is not None:
                    if ev.text:
                        yield json.dumps(chunk(ev.text))
                    yield json.dumps(chunk("", ev.finish_reason))
                elif ev.text:
                    yield json.dumps(chunk(ev.text))
                try:
                    ev = await _next(job, request)
                except ApiError as e:   # mid-stream: an error event, then the stream ends
                    yield json.dumps(P.error_body(e.message, e.type, e.code))
                    return
            if body.include_usage():
                yield json.dumps(P.usage_chunk(rid, model_name, created, obj, n_prompt, n_gen))
            yield "[DONE]"
        finally:
            job.cancel()                # a client gone mid-stream frees its slot at the next step

    return app
