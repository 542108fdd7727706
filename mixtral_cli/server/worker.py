"""Generation for the server: one at a time, on one worker thread, against one `Session`.

Requests wait in a FIFO queue (`Worker`) whose single thread does all tensor work, so the event loop
keeps answering while a reply is generated. The session lives as long as the server, so a request
that extends the previous conversation (the next chat turn) only prefills its new tokens. A job is
cancelled between two tokens.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import deque
from collections.abc import Iterator

from ..engine.evaluate import prompt_logprobs
from ..engine.generate import Completion, Session
from ..engine.loader import Engine
from ..engine.logprobs import TokenLogprob
from .protocol import APIError, Settings
from .responses import usage


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
    """One request's generation. The worker thread posts (with `echo`: ("prompt", None, the prompt's
    logprobs), then) ("text", piece, its tokens' logprobs) and finally ("end", None, []) to `events`,
    an asyncio queue read on the event loop."""

    def __init__(self, prompt_ids: list[int], settings: Settings, *, continuation: bool) -> None:
        self.prompt_ids = prompt_ids
        self.settings = settings
        self.continuation = continuation
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue[tuple[str, str | None, list[TokenLogprob]]] = asyncio.Queue()
        self.cancelled = threading.Event()
        self.state = "queued"  # then running, and done, cancelled or failed
        self.completion: Completion | None = None
        self.prompt_scores: list[TokenLogprob] = []  # the prompt's tokens scored (echo with logprobs)
        self.posted_logprobs = 0  # how many of the completion's logprobs went out with streamed text
        self.error: BaseException | None = None
        self.disconnected = False  # the client went away
        self.stalled = False  # the client stopped reading its stream
        self.queued_at = time.perf_counter()
        self.finished_at: float | None = None

    def post(self, kind: str, value: str | None = None, logprobs: list[TokenLogprob] | None = None) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening any more
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value, logprobs or []))

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
        if s.echo and s.logprobs is not None:
            job.prompt_scores = prompt_logprobs(self.session, job.prompt_ids, s.logprobs)
        if s.echo and s.stream:
            job.post("prompt", None, job.prompt_scores)
        if not s.generate:
            return
        completion = _Cancellable(self.session, self.engine.tokenizer, job.prompt_ids, s.gen,
                                  continuation=job.continuation, cancelled=job.cancelled, logprobs=s.logprobs)
        job.completion = completion
        for piece in completion:
            if job.cancelled.is_set():
                return
            if s.stream:
                job.post("text", piece, completion.logprobs[job.posted_logprobs:])
                job.posted_logprobs = len(completion.logprobs)
