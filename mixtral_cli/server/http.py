"""`mixtral serve`: OpenAI's HTTP API over one loaded model (FastAPI on uvicorn).

One model, one generation at a time: requests wait in a FIFO queue (`Worker`) whose single thread
does all tensor work, so the event loop keeps answering `/health` and `/v1/models` while a reply is
generated. The worker keeps one `Session` for the server's life, so a request that extends the
previous conversation (the next chat turn) only prefills its new tokens. A request whose client goes
away is cancelled between two tokens; a stream whose reader stops reading is cut after a send timeout.

Request parsing, validation and response shapes live in `openai_protocol.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import logging
import os
import signal
import socket
import threading
import time
import traceback
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import anyio
import pydantic
import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from ..engine.generate import Completion, Sampler, Session
from ..engine.loader import Engine
from ..errors import UserError
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
    check_context,
    completion_chunk,
    completion_prompt,
    completion_response,
    completion_settings,
    new_id,
    now,
    usage,
    usage_chunk,
    validation_error,
)

DISCONNECT_POLL_S = 0.1  # how often a non-streaming request checks that its client is still there


# -- generation: one at a time, on the worker thread ------------------------------------------------
def with_penalties(sample: Sampler, prompt_len: int, presence: float, frequency: float) -> Sampler:
    """OpenAI's presence and frequency penalties over the tokens generated so far, then `sample`:
    logit[t] -= frequency * count(t) + presence * (count(t) > 0)."""

    def penalized(logits: torch.Tensor, history: Sequence[int]) -> int:
        generated = history[prompt_len:]
        if generated:
            ids, counts = torch.tensor(list(generated)).unique(return_counts=True)
            ids, counts = ids.to(logits.device), counts.to(logits.device)
            logits = logits.float().clone()
            logits[ids] -= counts * frequency + presence
        return sample(logits, history)

    return penalized


class _Cancellable(Completion):
    """A Completion that stops before computing the next token once `cancelled` is set."""

    def __init__(self, *args, cancelled: threading.Event, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._cancelled = cancelled

    def tokens(self) -> Iterator[int]:
        if self._cancelled.is_set():
            return
        for token in super().tokens():
            yield token
            if self._cancelled.is_set():
                return


class Job:
    """One request's generation. The worker thread posts ("text", piece) and finally ("end", None)
    to `events`, an asyncio queue read on the event loop."""

    def __init__(self, prompt_ids: list[int], settings: Settings, *, continuation: bool) -> None:
        self.prompt_ids = prompt_ids
        self.settings = settings
        self.continuation = continuation
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue[tuple[str, str | None]] = asyncio.Queue()
        self.cancelled = threading.Event()
        self.state = "queued"  # then running, and done, cancelled or failed
        self.completion: Completion | None = None
        self.error: BaseException | None = None
        self.disconnected = False  # the client went away
        self.stalled = False  # the client stopped reading its stream
        self.queued_at = time.perf_counter()
        self.finished_at: float | None = None

    def post(self, kind: str, value: str | None = None) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening any more
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def completion_tokens(self) -> int:
        return self.completion.stats.completion_tokens if self.completion else 0

    @property
    def cached_tokens(self) -> int:
        """Prompt tokens whose KV entries were reused from the previous request."""
        if not self.completion or not self.completion.stats.completion_tokens:
            return 0
        return self.prompt_tokens - self.completion.stats.prefill_tokens

    def usage(self) -> dict:
        return usage(self.prompt_tokens, self.completion_tokens, self.cached_tokens)


class Worker:
    """A FIFO queue of jobs and the one thread that runs them against one `Session`."""

    def __init__(self, engine: Engine, max_queue: int) -> None:
        self.engine = engine
        self.session = Session(engine.model)
        self.max_queue = max_queue
        self.running: Job | None = None
        self.recent: deque[Job] = deque(maxlen=64)  # finished jobs, newest last
        self.closed = False
        self._queue: deque[Job] = deque()
        self._cv = threading.Condition()
        self._thread = threading.Thread(target=self._loop, name="mixtral-generate", daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        return len(self._queue)

    def submit(self, job: Job) -> None:
        """Queue `job`, or raise a 503 APIError when the queue is full or the server is stopping."""
        with self._cv:
            if self.closed:
                raise APIError(503, "the server is shutting down")
            if len(self._queue) + (self.running is not None) > self.max_queue:
                retry = self._retry_after()
                raise APIError(503, f"the server is busy: one request is generating and {len(self._queue)} are "
                                    f"waiting (the queue holds {self.max_queue}); retry in {retry} s",
                               headers={"Retry-After": str(retry)})
            self._queue.append(job)
            self._cv.notify()

    def _retry_after(self) -> int:
        done = [j.finished_at - j.queued_at for j in self.recent if j.state == "done" and j.finished_at]
        average = sum(done) / len(done) if done else 1.0
        return max(1, min(60, round(average * (len(self._queue) + 1))))

    def cancel(self, job: Job) -> None:
        """Stop `job`: a waiting one leaves the queue now, a running one stops before its next token."""
        with self._cv:
            if job.state == "queued" and job in self._queue:
                self._queue.remove(job)
                job.cancelled.set()
                self._finish(job, "cancelled")
            elif job.state == "running":
                job.cancelled.set()

    def close(self) -> None:
        """Refuse new jobs, cancel the waiting ones and the running one, let the thread end."""
        with self._cv:
            self.closed = True
            for job in self._queue:
                job.cancelled.set()
                self._finish(job, "cancelled")
            self._queue.clear()
            if self.running is not None:
                self.running.cancelled.set()
            self._cv.notify_all()

    def _finish(self, job: Job, state: str) -> None:
        job.state, job.finished_at = state, time.perf_counter()
        self.recent.append(job)
        job.post("end")

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self.closed:
                    self._cv.wait()
                if not self._queue:
                    return
                job = self.running = self._queue.popleft()
                job.state = "running"
            try:
                self._generate(job)
                state = "cancelled" if job.cancelled.is_set() else "done"
            except Exception as e:  # noqa: BLE001 - reported to the request as a 500, the server goes on
                job.error, state = e, "failed"
            with self._cv:
                self.running = None
                self._finish(job, state)

    def _generate(self, job: Job) -> None:
        s = job.settings
        completion = _Cancellable(self.session, self.engine.tokenizer, job.prompt_ids, s.gen,
                                  continuation=job.continuation, cancelled=job.cancelled)
        if s.presence_penalty or s.frequency_penalty:
            completion.sampler = with_penalties(completion.sampler, len(job.prompt_ids), s.presence_penalty,
                                                s.frequency_penalty)
        job.completion = completion
        for piece in completion:
            if job.cancelled.is_set():
                return
            if s.stream:
                job.post("text", piece)


# -- HTTP ------------------------------------------------------------------------------------------
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
        check_context(len(ids), self.ctx, "messages")
        return await self._answer(request, ids, s, chat=True)

    async def complete(self, request: Request) -> Response:
        body = await parse(request, CompletionRequest)
        s = completion_settings(body, self.defaults)
        ids = self.engine.tokenizer.encode(completion_prompt(body), bos=True)  # as `run --raw`
        check_context(len(ids), self.ctx, "prompt")
        return await self._answer(request, ids, s, chat=False)

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


# -- the server process ----------------------------------------------------------------------------
def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: a free one), or a UserError saying why not."""
    if not 0 <= port <= 65535:
        raise UserError(f"--port must be between 0 and 65535, got {port}")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        raise UserError(f"cannot use --host {host}: {e.strerror}", hint="pass an IP address or a host name") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(128)
    except OSError as e:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror}",
                        hint="pick another --port, or stop what is using it") from None
    return sock


def base_url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/v1"


class _UvicornLog(logging.Handler):
    """uvicorn's own warnings and errors as server log lines."""

    def __init__(self, level: int, log: Callable[[str], None]) -> None:
        super().__init__(level)
        self.log = log

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("ASGI callable returned without completing response"):
            return  # a stream we cut on purpose (its request's line says so)
        if record.exc_info:
            message += "\n" + "".join(traceback.format_exception(*record.exc_info)).rstrip()
        self.log(message)


class _Uvicorn(uvicorn.Server):
    """uvicorn that cancels in-flight work as soon as a stop is requested, and treats SIGINT/SIGTERM
    as the normal way to stop (no re-raised signal afterwards, so the process exits 0)."""

    def __init__(self, config: uvicorn.Config, on_exit: Callable[[], None], log: Callable[[str], None]) -> None:
        super().__init__(config)
        self.on_exit, self.log = on_exit, log

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame) -> None:
        if not self.should_exit:
            self.log(f"{signal.Signals(sig).name}: stopping (in-flight requests are cancelled)")
        super().handle_exit(sig, frame)
        # not from inside the signal handler: it may have interrupted the loop thread holding the worker's lock
        self._loop.call_soon_threadsafe(self.on_exit)

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


class Server:
    """The model behind OpenAI's API on a listening socket. `run()` blocks until `stop()` or a signal."""

    def __init__(self, engine: Engine, opts: ServeOptions, sock: socket.socket | None = None, *,
                 log: Callable[[str], None]) -> None:
        """`log` gets the server's lines: one per request, uvicorn's warnings, the stop (the command
        line passes its terminal UI's, so the server itself prints nothing)."""
        self.opts, self.log = opts, log
        self.sock = sock or listen(opts.host, opts.port)
        self.url = base_url(self.sock)
        self.worker = Worker(engine, opts.max_queue)
        config = uvicorn.Config(create_app(engine, self.worker, opts, log), interface="asgi3", http="h11", ws="none",
                                lifespan="off", loop="asyncio", log_config=None, access_log=False,
                                timeout_graceful_shutdown=10)
        self._uvicorn = _Uvicorn(config, on_exit=self.worker.close, log=log)

    def run(self) -> None:
        log = logging.getLogger("uvicorn.error")
        handler = _UvicornLog(logging.WARNING, self.log)
        log.addHandler(handler)
        try:
            self._uvicorn.run(sockets=[self.sock])
        finally:
            self.worker.close()
            log.removeHandler(handler)
            self.sock.close()

    def stop(self) -> None:
        """Cancel what runs and waits, then end `run()` (callable from any thread)."""
        self.worker.close()
        self._uvicorn.should_exit = True


def serve(engine: Engine, opts: ServeOptions, sock: socket.socket, log: Callable[[str], None],
          banner: Callable[[str, str, int, int, bool], None]) -> None:
    """Serve until a signal; `banner(url, model, ctx, max_queue, keyed)` announces the server first."""
    server = Server(engine, opts, sock, log=log)
    banner(server.url, opts.model_name, engine.model.max_len, opts.max_queue, bool(opts.api_key))
    server.run()
    log("stopped")


def model_name(spec: str | None) -> str:
    """The name the API gives the model: the repo id, or a local checkpoint directory's name."""
    from ..checkpoints.hub import DEFAULT_REPO

    spec = spec or os.environ.get("MIXTRAL_MODEL") or DEFAULT_REPO
    path = Path(spec).expanduser()
    return path.resolve().name if path.is_dir() else spec
