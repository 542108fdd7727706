"""OpenAI's HTTP API over one loaded model: the ASGI app (FastAPI), its endpoints and the
server-sent events of a stream.

Handlers parse and validate a request (`protocol.py`), queue its job on the `Worker` and shape what
it generates. A request whose client goes away is cancelled between two tokens; a stream whose
reader stops reading is cut after a send timeout. Listening and stopping are `process.py`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import replace

import anyio
import pydantic
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from ..engine.generate import ContextOverflow, check_fits
from ..engine.grammar import Grammar, GrammarError, token_bytes
from ..engine.loader import Engine
from ..settings import ServeOptions
from .gate import Gate, error_response
from .protocol import (
    APIError,
    BodyModel,
    ChatRequest,
    CompletionRequest,
    Settings,
    bad_request,
    chat_prompt_ids,
    chat_settings,
    completion_prompts,
    completion_settings,
    context_length_exceeded,
    validation_error,
)
from .responses import (
    Envelope,
    TokenText,
    add_usage,
    chat_choice,
    chat_delta,
    chat_logprobs,
    completion_choice,
    completion_logprobs,
    new_id,
    now,
)
from .tool_calls import ReplyReader, reply_grammar, tool_plan
from .worker import Job, Worker

DISCONNECT_POLL_S = 0.1  # how often a non-streaming request checks that its client is still there
GRAMMAR_TIMEOUT_S = 10.0  # a response_format, grammar or tool set that takes longer to compile gets a 400


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
        self.spell = TokenText(token_bytes(engine.tokenizer))  # also readies the grammar engine's vocabulary

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
        tok = self.engine.tokenizer
        s = chat_settings(body, self.defaults, tok.vocab_size)
        plan = tool_plan(body)
        ids = chat_prompt_ids(tok, body.messages, self.opts.system, plan.tools if plan else None)
        self._check_fits(ids, "messages")
        if plan is not None:
            s = replace(s, gen=replace(s.gen, grammar=reply_grammar(plan, tok, s.gen.grammar)))
        await self._check_grammar(s.gen.grammar)
        job = self._submit(request, ids, s, continuation=False)
        envelope = Envelope("chat.completion", new_id("chatcmpl"), now(), self.opts.model_name, s.include_usage)
        reader = ReplyReader(plan, tok)
        if s.stream:
            return EventStream(self._chat_events(job, envelope, reader), job, self.worker, self.opts.send_timeout)
        await self._wait(request, job)
        c = job.completion
        reader.feed(c.text)
        calls = reader.calls()
        logprobs = chat_logprobs(self._chat_entries(c.logprobs), self.spell) if s.logprobs is not None else None
        finish = "tool_calls" if calls else c.finish_reason
        choice = chat_choice(None if calls else c.text, finish, logprobs, calls)
        return JSONResponse(envelope.response([choice], job.usage()))

    async def complete(self, request: Request) -> Response:
        body = await parse(request, CompletionRequest)
        tok = self.engine.tokenizer
        s = completion_settings(body, self.defaults, tok.vocab_size)
        prompts = completion_prompts(body, tok, s.stream)
        for ids, _ in prompts:
            self._check_fits(ids, "prompt")
        await self._check_grammar(s.gen.grammar)
        envelope = Envelope("text_completion", new_id("cmpl"), now(), self.opts.model_name, s.include_usage)
        if s.stream:
            (ids, text), = prompts
            job = self._submit(request, ids, s, continuation=True)
            return EventStream(self._completion_events(job, envelope, text), job, self.worker,
                               self.opts.send_timeout)
        choices, used = [], None
        for ids, text in prompts:  # one after another, each its own job in the queue
            job = self._submit(request, ids, s, continuation=True)
            await self._wait(request, job)
            choices.append(self._completion_choice(job, text))
            used = job.usage() if used is None else add_usage(used, job.usage())
        return JSONResponse(envelope.response(choices, used))

    def _completion_choice(self, job: Job, prompt_text: str) -> dict:
        s, c = job.settings, job.completion
        text, finish = (c.text, c.finish_reason) if c is not None else ("", "length")
        logprobs = None
        if s.logprobs is not None:
            parts = [completion_logprobs(c.logprobs if c else [], self.spell, offset=len(prompt_text) * s.echo)]
            if s.echo:
                parts.insert(0, completion_logprobs(job.prompt_scores, self.spell, fresh=True))
            logprobs = {key: [v for part in parts for v in part[key]] for key in parts[0]}
        return completion_choice(prompt_text + text if s.echo else text, finish, logprobs)

    def _check_fits(self, ids: list[int], what: str) -> None:
        """Refuse a prompt with no room for a reply here, with a 400 (on the worker it would be a 500)."""
        try:
            check_fits(len(ids), self.ctx)
        except ContextOverflow as e:
            raise context_length_exceeded(e.prompt_tokens, e.ctx, what) from None

    async def _check_grammar(self, grammar: Grammar | None) -> None:
        """Compile the request's grammar off the event loop and off the generation thread, so a
        costly one holds up neither; one that takes longer than GRAMMAR_TIMEOUT_S is refused."""
        if grammar is None:
            return
        try:
            with anyio.fail_after(GRAMMAR_TIMEOUT_S):
                await anyio.to_thread.run_sync(grammar.check, self.engine.tokenizer, abandon_on_cancel=True)
        except TimeoutError:
            raise bad_request(grammar.source, f"compiling it took longer than {GRAMMAR_TIMEOUT_S:g} s; "
                                              "simplify it") from None
        except GrammarError as e:
            raise bad_request(e.source, e.problem) from None

    # -- generation
    def _submit(self, request: Request, ids: list[int], s: Settings, *, continuation: bool) -> Job:
        job = Job(ids, s, continuation=continuation)
        self.worker.submit(job)
        request.scope["mixtral.log"].job = job
        return job

    async def _wait(self, request: Request, job: Job) -> None:
        """Until a non-streaming `job` ends; raise unless it is done."""
        watcher = asyncio.create_task(self._watch(request, job))
        try:
            while (await job.events.get())[0] != "end":
                pass
        finally:
            watcher.cancel()
            self.worker.cancel(job)  # a no-op once it has ended; else this handler itself was cancelled
        self._raise_unless_done(job)

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
            if isinstance(job.error, GrammarError):  # the request's grammar outgrew the engine's limits
                raise bad_request(job.error.source, job.error.problem)
            raise APIError(500, f"generation failed: {type(job.error).__name__}: {job.error}")
        if job.state == "cancelled":
            if job.disconnected:
                raise APIError(499, "the client closed the request")  # nginx's code; nobody reads it
            raise APIError(503, "the server is shutting down")

    async def _pieces(self, job: Job) -> AsyncIterator[tuple[str, str, list]]:
        """The job's events ("prompt" once scored, then "text" pieces) with their tokens' logprobs,
        then the job's end checked."""
        while True:
            kind, text, logprobs = await job.events.get()
            if kind == "end":
                break
            yield kind, text, logprobs
        self._raise_unless_done(job)

    def _chat_entries(self, entries: list) -> list:
        """A chat reply's logprobs leave out the end token (completions keep it: lm-eval counts on
        one entry per generated token)."""
        return [e for e in entries if e.token != self.engine.tokenizer.eos_id]

    def _leftover_logprobs(self, job: Job) -> list:
        """Logprobs of tokens whose text never went out (a stop string's, a held-back tail's)."""
        return job.completion.logprobs[job.posted_logprobs:] if job.completion else []

    async def _chat_events(self, job: Job, envelope: Envelope, reader: ReplyReader) -> AsyncIterator[str]:
        """The SSE body: role, content or tool-call deltas as they become final, the finish reason,
        usage, [DONE]."""
        want_logprobs = job.settings.logprobs is not None

        def logprobs(entries: list) -> dict | None:
            return chat_logprobs(self._chat_entries(entries), self.spell) if want_logprobs else None

        yield sse(envelope.chunk(chat_delta({"role": "assistant", "content": ""})))
        held: list = []  # logprobs of text the reader has not turned into a delta yet
        try:
            async for _, text, entries in self._pieces(job):
                held += entries
                for delta in reader.feed(text):
                    yield sse(envelope.chunk(chat_delta(delta, logprobs=logprobs(held))))
                    held = []
        except APIError as err:  # the status line has gone out: report it in the stream
            yield sse(err.body())
            return
        held += self._leftover_logprobs(job)
        finish = "tool_calls" if reader.calls() else job.completion.finish_reason
        yield sse(envelope.chunk(chat_delta({}, finish, logprobs(held) if held else None)))
        if envelope.include_usage:
            yield sse(envelope.usage_chunk(job.usage()))
        yield sse("[DONE]")

    async def _completion_events(self, job: Job, envelope: Envelope, prompt_text: str) -> AsyncIterator[str]:
        """The SSE body of a completion: (the echoed prompt,) text pieces, the finish reason, usage, [DONE]."""
        s = job.settings
        offset = len(prompt_text) if s.echo else 0

        def logprobs(entries: list, **kw) -> dict | None:
            return completion_logprobs(entries, self.spell, **kw) if s.logprobs is not None else None

        try:
            async for kind, text, entries in self._pieces(job):
                if kind == "prompt":
                    yield sse(envelope.chunk(completion_choice(prompt_text, None, logprobs(entries, fresh=True))))
                    continue
                yield sse(envelope.chunk(completion_choice(text, None, logprobs(entries, offset=offset))))
                offset += len(text)
        except APIError as err:
            yield sse(err.body())
            return
        c = job.completion
        left = self._leftover_logprobs(job)
        yield sse(envelope.chunk(completion_choice("", c.finish_reason if c else "length",
                                                   logprobs(left, offset=offset) if left else None)))
        if envelope.include_usage:
            yield sse(envelope.usage_chunk(job.usage()))
        yield sse("[DONE]")


def create_app(engine: Engine, worker: Worker, opts: ServeOptions, log: Callable[[str], None]) -> Gate:
    return Gate(Api(engine, worker, opts).app(), opts.api_key, log, opts.cors_origins)
