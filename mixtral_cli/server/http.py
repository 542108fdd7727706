"""OpenAI's HTTP API over one loaded model: the ASGI app (FastAPI), its endpoints and the
server-sent events of a stream.

Handlers parse and validate a request (`protocol.py`), queue its job on the `Worker` and shape what
it generates. A request whose client goes away is cancelled between two tokens; a stream whose
reader stops reading is cut after a send timeout. Listening and stopping are `process.py`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace

import anyio
import pydantic
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from ..engine.generate import ContextOverflow, check_fits
from ..engine.loader import Engine
from ..settings import ServeOptions
from .protocol import (
    APIError,
    BodyModel,
    ChatRequest,
    CompletionRequest,
    Settings,
    bad_request,
    chat_chunk,
    chat_prompt_ids,
    chat_response,
    chat_settings,
    completion_chunk,
    completion_prompt,
    completion_response,
    completion_settings,
    context_length_exceeded,
    new_id,
    now,
    usage_chunk,
    validation_error,
)
from .worker import Job, Worker

DISCONNECT_POLL_S = 0.1  # how often a non-streaming request checks that its client is still there


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n"


class EventStream(StreamingResponse):
    """Server-sent events that cancel their job when the client disconnects or stops reading."""

    def __init__(self, events: AsyncIterator[str], job: Job, worker: Worker, send_timeout: float) -> None:
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.job, self.worker, self.send_timeout = job, worker, send_timeout
        self.sent = False  # every event is out

    async def __call__(self, scope, receive, send) -> None:
        async def watch(cancel: anyio.CancelScope) -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            if not self.sent:  # after the last byte a disconnect is just the client leaving
                self.job.disconnected = True
            cancel.cancel()

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(watch, tg.cancel_scope)
                try:
                    await self._send_all(send)
                except TimeoutError:
                    self.job.stalled = True
                tg.cancel_scope.cancel()
        finally:
            self.worker.cancel(self.job)

    async def _send_all(self, send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        async with contextlib.aclosing(self.body_iterator) as events:
            async for data in events:
                with anyio.fail_after(self.send_timeout):
                    await send({"type": "http.response.body", "body": data.encode(), "more_body": True})
        self.sent = True
        await send({"type": "http.response.body", "body": b"", "more_body": False})


@dataclass
class _Record:
    """What the request log line says besides method, path and status."""

    job: Job | None = None
    note: str = ""


def _log_line(scope, status: int, record: _Record, seconds: float) -> str:
    parts = [f"{scope['method']} {scope['path']} {status}"]
    job = record.job
    if job is not None:
        parts.append(f"prompt {job.prompt_tokens} ({job.cached_tokens} cached)")
        parts.append(f"completion {job.completion_tokens}")
        if job.completion is not None:
            parts.append(f"{job.completion.stats.decode_tokens_per_s:.1f} tok/s")
        if job.disconnected:
            parts.append("client disconnected")
        if job.stalled:
            parts.append("reader stalled: stream cut")
        if job.state == "failed":
            parts.append(f"failed: {type(job.error).__name__}: {job.error}")
    if record.note:
        parts.append(record.note)
    parts.append(f"{seconds:.2f} s")
    return " · ".join(parts)


class Gate:
    """ASGI middleware: the API key check (all but /health) and one log line per request."""

    def __init__(self, app, api_key: str | None, log: Callable[[str], None]) -> None:
        self.app, self.log = app, log
        self.key = api_key.encode() if api_key else None

    def _authorized(self, scope) -> bool:
        value = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        scheme, _, token = value.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        record = scope["mixtral.log"] = _Record()
        status = 0
        t0 = time.perf_counter()

        async def tracked(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            if self.key and scope["path"] != "/health" and not self._authorized(scope):
                err = APIError(401, "a valid API key is required: send 'Authorization: Bearer KEY'",
                               code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                record.note = err.message
                await error_response(err)(scope, receive, tracked)
            else:
                await self.app(scope, receive, tracked)
        finally:
            self.log(_log_line(scope, status or 500, record, time.perf_counter() - t0))


async def parse(request: Request, model: type[BodyModel]) -> BodyModel:
    """The request body as `model`, whatever its content type says (curl -d sends a form type)."""
    raw = await request.body()
    if not raw.strip():
        raise bad_request(None, "the request body is empty: send a JSON object")
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise bad_request(None, f"the request body is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise bad_request(None, "the request body must be a JSON object")
    try:
        return model.model_validate(data)
    except pydantic.ValidationError as e:
        raise validation_error(e.errors()) from None


class Api:
    """The endpoints. Handlers only validate, queue and shape; the worker generates."""

    def __init__(self, engine: Engine, worker: Worker, opts: ServeOptions) -> None:
        self.engine, self.worker, self.opts = engine, worker, opts
        self.ctx = engine.model.max_len
        self.defaults = replace(opts.gen, max_tokens=opts.gen.max_tokens or self.ctx)
        self.created = now()

    def app(self) -> FastAPI:
        app = FastAPI(title="mixtral serve", docs_url=None, redoc_url=None, openapi_url=None)
        app.add_api_route("/health", self.health, methods=["GET"])
        app.add_api_route("/v1/models", self.models, methods=["GET"])
        app.add_api_route("/v1/models/{model:path}", self.model, methods=["GET"])
        app.add_api_route("/v1/chat/completions", self.chat, methods=["POST"])
        app.add_api_route("/v1/completions", self.complete, methods=["POST"])
        app.add_exception_handler(APIError, self._api_error)
        app.add_exception_handler(RequestValidationError, self._invalid)
        app.add_exception_handler(HTTPException, self._http_error)
        return app

    # -- errors
    def _api_error(self, request: Request, err: APIError) -> JSONResponse:
        record = request.scope.get("mixtral.log")
        if record is not None:
            record.note = err.message
        return error_response(err)

    def _invalid(self, request: Request, exc: RequestValidationError) -> JSONResponse:
        return self._api_error(request, validation_error(exc.errors()))

    def _http_error(self, request: Request, exc: HTTPException) -> JSONResponse:
        message = {404: f"no such endpoint: {request.method} {request.url.path}",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(exc.status_code, str(exc.detail))
        return self._api_error(request, APIError(exc.status_code, message, headers=dict(exc.headers or {})))

    # -- endpoints
    async def health(self) -> dict:
        return {"status": "ok", "model": self.opts.model_name, "generating": self.worker.running is not None,
                "waiting": self.worker.waiting}

    def _card(self) -> dict:
        return {"id": self.opts.model_name, "object": "model", "created": self.created, "owned_by": "mixtral-cli",
                "context_length": self.ctx}

    async def models(self) -> dict:
        return {"object": "list", "data": [self._card()]}

    async def model(self, model: str) -> dict:
        if model != self.opts.model_name:
            raise APIError(404, f"model {model!r} is not served here; this server serves {self.opts.model_name!r}",
                           param="model", code="model_not_found")
        return self._card()

    async def chat(self, request: Request) -> Response:
        body = await parse(request, ChatRequest)
        s = chat_settings(body, self.defaults)
        ids = chat_prompt_ids(self.engine.tokenizer, body.messages, self.opts.system)
        self._check_fits(ids, "messages")
        return await self._answer(request, ids, s, chat=True)

    async def complete(self, request: Request) -> Response:
        body = await parse(request, CompletionRequest)
        s = completion_settings(body, self.defaults)
        ids = self.engine.tokenizer.encode(completion_prompt(body), bos=True)  # as `run --raw`
        self._check_fits(ids, "prompt")
        return await self._answer(request, ids, s, chat=False)

    def _check_fits(self, ids: list[int], what: str) -> None:
        """Refuse a prompt with no room for a reply here, with a 400 (on the worker it would be a 500)."""
        try:
            check_fits(len(ids), self.ctx)
        except ContextOverflow as e:
            raise context_length_exceeded(e.prompt_tokens, e.ctx, what) from None

    # -- generation
    async def _answer(self, request: Request, ids: list[int], s: Settings, *, chat: bool) -> Response:
        job = Job(ids, s, continuation=not chat)
        self.worker.submit(job)
        request.scope["mixtral.log"].job = job
        rid, created = new_id("chatcmpl" if chat else "cmpl"), now()
        if s.stream:
            return EventStream(self._events(job, rid, created, chat), job, self.worker, self.opts.send_timeout)
        watcher = asyncio.create_task(self._watch(request, job))
        try:
            while (await job.events.get())[0] != "end":
                pass
        finally:
            watcher.cancel()
            self.worker.cancel(job)  # a no-op once it has ended; else this handler itself was cancelled
        self._raise_unless_done(job)
        c = job.completion
        shape = chat_response if chat else completion_response
        return JSONResponse(shape(rid, created, self.opts.model_name, c.text, c.finish_reason, job.usage()))

    async def _watch(self, request: Request, job: Job) -> None:
        """Cancel a non-streaming job whose client has gone away."""
        while job.state in ("queued", "running"):
            if await request.is_disconnected():
                job.disconnected = True
                self.worker.cancel(job)
                return
            await asyncio.sleep(DISCONNECT_POLL_S)

    @staticmethod
    def _raise_unless_done(job: Job) -> None:
        if job.state == "failed":
            raise APIError(500, f"generation failed: {type(job.error).__name__}: {job.error}")
        if job.state == "cancelled":
            if job.disconnected:
                raise APIError(499, "the client closed the request")  # nginx's code; nobody reads it
            raise APIError(503, "the server is shutting down")

    async def _events(self, job: Job, rid: str, created: int, chat: bool) -> AsyncIterator[str]:
        """The SSE body: role, text pieces as they become final, the finish reason, usage, [DONE]."""
        model, include_usage = self.opts.model_name, job.settings.include_usage

        def chunk(text: str | None, finish_reason: str | None = None) -> dict:
            if chat:
                delta = {"content": text} if text is not None else {}
                return chat_chunk(rid, created, model, delta, finish_reason, include_usage=include_usage)
            return completion_chunk(rid, created, model, text or "", finish_reason, include_usage=include_usage)

        if chat:
            yield sse(chat_chunk(rid, created, model, {"role": "assistant", "content": ""},
                                 include_usage=include_usage))
        while True:
            kind, text = await job.events.get()
            if kind == "end":
                break
            yield sse(chunk(text))
        try:
            self._raise_unless_done(job)
        except APIError as err:  # the status line has gone out: report it in the stream
            yield sse(err.body())
            return
        yield sse(chunk(None, job.completion.finish_reason))
        if include_usage:
            yield sse(usage_chunk(chunk(None), job.usage()))
        yield sse("[DONE]")


def create_app(engine: Engine, worker: Worker, opts: ServeOptions, log: Callable[[str], None]) -> Gate:
    return Gate(Api(engine, worker, opts).app(), opts.api_key, log)
