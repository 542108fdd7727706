"""The server process: the listening socket, uvicorn, the signals that stop it, and its log lines.

The server prints nothing itself: whoever starts it passes the function that gets its lines (the
command line passes its terminal UI's) and the one that announces it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import signal
import socket
import threading
import traceback
from collections.abc import Callable
from pathlib import Path

import uvicorn

from ..checkpoints.hub import DEFAULT_REPO
from ..engine.loader import Engine
from ..errors import UserError
from ..settings import ServeOptions
from .http import create_app
from .worker import Worker


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
        """`log` gets the server's lines: one per request, uvicorn's warnings, the stop."""
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
    if opts.cors_origins:
        log(f"CORS: web pages from {', '.join(opts.cors_origins)} may call the API from a browser")
    server.run()
    log("stopped")


def model_name(spec: str | None) -> str:
    """The name the API gives the model: the repo id, or a local checkpoint directory's name."""
    spec = spec or os.environ.get("MIXTRAL_MODEL") or DEFAULT_REPO
    path = Path(spec).expanduser()
    return path.resolve().name if path.is_dir() else spec
