"""The ASGI middleware in front of the endpoints (`Gate`): the API key check (all but /health),
opt-in CORS for browser pages (`--cors-origin`: preflights answered without the key, the headers
on every response), and one log line per request."""

from __future__ import annotations

import hmac
import time
from collections.abc import Callable
from dataclasses import dataclass

from fastapi.responses import JSONResponse, Response

from .protocol import APIError
from .worker import Job


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


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


CORS_METHODS = b"GET, POST, OPTIONS"
CORS_HEADERS = b"Authorization, Content-Type"  # allowed when a preflight names none
CORS_MAX_AGE_S = 600  # how long a browser may reuse a preflight's answer


def _origin_key(origin: str) -> str:
    """An origin as a browser's Origin header spells it: lower case, no default port."""
    origin = origin.lower()
    for scheme, port in (("http://", ":80"), ("https://", ":443")):
        if origin.startswith(scheme) and origin.endswith(port):
            return origin[: -len(port)]
    return origin


class Cors:
    """Which browser origins may call the API (`ServeOptions.cors_origins`; '*': any)."""

    def __init__(self, origins: list[str]) -> None:
        self.any = "*" in origins
        self.origins = {_origin_key(o).encode() for o in origins if o != "*"}

    def allow(self, origin: bytes | None) -> bytes | None:
        """The Access-Control-Allow-Origin value for a request from `origin` (None: no CORS headers)."""
        if origin is None:
            return None
        if self.any:
            return b"*"
        return origin if _origin_key(origin.decode("latin-1")).encode() in self.origins else None

    def vary(self) -> list[tuple[bytes, bytes]]:
        """Responses to named origins differ by Origin (all of them: a cache must not mix them up)."""
        return [] if self.any else [(b"vary", b"Origin")]

    def actual(self, allowed: bytes | None) -> list[tuple[bytes, bytes]]:
        """The headers every response (errors and streams too) gets."""
        if allowed is None:
            return self.vary()
        return [(b"access-control-allow-origin", allowed), (b"access-control-expose-headers", b"Retry-After"),
                *self.vary()]

    def preflight(self, allowed: bytes, requested: bytes | None) -> Response:
        """The answer to a browser's preflight (OPTIONS with Access-Control-Request-Method): no API
        key asked, since a browser sends none on a preflight."""
        headers = [(b"access-control-allow-origin", allowed), (b"access-control-allow-methods", CORS_METHODS),
                   (b"access-control-allow-headers", requested.strip() if requested and requested.strip()
                    else CORS_HEADERS),
                   (b"access-control-max-age", str(CORS_MAX_AGE_S).encode()),
                   (b"vary", b"Access-Control-Request-Headers"), *self.vary()]
        response = Response(status_code=204)
        response.raw_headers.extend(headers)
        return response


def _header(scope, name: bytes) -> bytes | None:
    return next((v for k, v in scope["headers"] if k == name), None)


class Gate:
    """ASGI middleware: CORS (with `cors_origins`: preflights answered here, the Allow-Origin header
    added to every response), the API key check (all but /health and preflights) and one log line
    per request."""

    def __init__(self, app, api_key: str | None, log: Callable[[str], None], cors_origins: list[str] | None = None) -> None:
        self.app, self.log = app, log
        self.key = api_key.encode() if api_key else None
        self.cors = Cors(cors_origins) if cors_origins else None

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
        allowed = self.cors.allow(_header(scope, b"origin")) if self.cors else None
        preflight = allowed is not None and scope["method"] == "OPTIONS" and \
            _header(scope, b"access-control-request-method") is not None
        extra = self.cors.actual(allowed) if self.cors and not preflight else []

        async def tracked(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                if extra:
                    message = {**message, "headers": [*message.get("headers", ()), *extra]}
            await send(message)

        try:
            if preflight:
                record.note = "CORS preflight"
                await self.cors.preflight(allowed, _header(scope, b"access-control-request-headers"))(
                    scope, receive, tracked)
            elif self.key and scope["path"] != "/health" and not self._authorized(scope):
                err = APIError(401, "a valid API key is required: send 'Authorization: Bearer KEY'",
                               code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                record.note = err.message
                await error_response(err)(scope, receive, tracked)
            else:
                await self.app(scope, receive, tracked)
        finally:
            self.log(_log_line(scope, status or 500, record, time.perf_counter() - t0))
