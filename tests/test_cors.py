"""`mixtral serve --cors-origin`: browsers' preflights answered without the API key, the
Allow-Origin header on every response (errors and streams too), nothing for other origins, and
nothing at all without the option. Real servers on 127.0.0.1 with the tiny checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from email.message import Message

import pytest

from mixtral_cli.server.process import Server
from mixtral_cli.settings import GenerationConfig, ServeOptions

KEY = "sk-cors-test"
APP = "http://localhost:5173"
OTHER = "https://evil.example"
CHAT = {"model": "tiny-mixtral", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0}


@contextmanager
def serving(ckpt, cors_origins: list[str], log: list[str]) -> Iterator[Server]:
    from mixtral_cli.engine.loader import RuntimeOptions, load_engine

    engine = load_engine(ckpt, RuntimeOptions(device="cpu", dtype="float32"))
    opts = ServeOptions(model_name="tiny-mixtral", gen=GenerationConfig(max_tokens=None), host="127.0.0.1", port=0,
                        api_key=KEY, max_queue=2, send_timeout=5.0, cors_origins=cors_origins)
    opts.validate()
    srv = Server(engine, opts, log=log.append)
    thread = threading.Thread(target=srv.run, name="cors-test-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while True:
        try:
            if request(srv, "GET", "/health")[0] == 200:
                break
        except OSError:
            pass
        assert time.monotonic() < deadline, "the server did not come up"
        time.sleep(0.05)
    yield srv
    srv.stop()
    thread.join(60)
    assert not thread.is_alive()


def request(server, method: str, path: str, body: dict | None = None, key: str | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, Message, bytes]:
    """One raw request: (status, headers, body), errors included."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(server.url.removesuffix("/v1") + path, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    if key is not None:
        req.add_header("Authorization", f"Bearer {key}")
    for name, value in (headers or {}).items():
        req.add_header(name, value)
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def preflight(server, path: str, origin: str, headers: str = "authorization, content-type"):
    return request(server, "OPTIONS", path, headers={"Origin": origin, "Access-Control-Request-Method": "POST",
                                                      "Access-Control-Request-Headers": headers})


def cors_headers(headers: Message) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items() if k.lower().startswith("access-control-")}


def vary(headers: Message) -> list[str]:
    return [v.strip().lower() for value in headers.get_all("vary") or [] for v in value.split(",")]


@pytest.fixture(scope="module")
def named(tiny_ckpt):
    log: list[str] = []
    with serving(tiny_ckpt, [APP, "https://app.example:443"], log) as srv:
        srv.test_log = log
        yield srv


@pytest.fixture(scope="module")
def anyone(tiny_ckpt):
    with serving(tiny_ckpt, ["*"], []) as srv:
        yield srv


@pytest.fixture(scope="module")
def plain(tiny_ckpt):
    with serving(tiny_ckpt, [], []) as srv:
        yield srv


def test_preflight_is_answered_without_the_api_key_on_every_path(named):
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/no/such/path"):
        status, headers, body = preflight(named, path, APP)
        assert status == 204 and body == b"", (path, status, body)
        cors = cors_headers(headers)
        assert cors["access-control-allow-origin"] == APP
        assert cors["access-control-allow-methods"] == "GET, POST, OPTIONS"
        assert {h.strip() for h in cors["access-control-allow-headers"].lower().split(",")} >= \
            {"authorization", "content-type"}
        assert int(cors["access-control-max-age"]) > 0
        assert "origin" in vary(headers)
    # the requested headers are echoed; none requested: the two a client needs
    _, headers, _ = preflight(named, "/v1/chat/completions", APP, "x-stainless-os, authorization")
    assert headers["Access-Control-Allow-Headers"] == "x-stainless-os, authorization"
    status, headers, _ = request(named, "OPTIONS", "/v1/models", headers={"Origin": APP,
                                                                          "Access-Control-Request-Method": "GET"})
    assert status == 204 and headers["Access-Control-Allow-Headers"] == "Authorization, Content-Type"
    # a configured default port matches the origin a browser sends without it
    status, headers, _ = preflight(named, "/v1/models", "https://app.example")
    assert status == 204 and headers["Access-Control-Allow-Origin"] == "https://app.example"
    assert any("CORS preflight" in line and "OPTIONS /v1/chat/completions 204" in line for line in named.test_log)


def test_actual_responses_carry_the_origin_errors_and_streams_too(named):
    origin = {"Origin": APP}
    status, headers, body = request(named, "POST", "/v1/chat/completions", CHAT, key=KEY, headers=origin)
    assert status == 200 and json.loads(body)["choices"]
    assert headers["Access-Control-Allow-Origin"] == APP and "origin" in vary(headers)
    # the key is still required on the actual request, and the 401 says so to the page
    status, headers, body = request(named, "POST", "/v1/chat/completions", CHAT, headers=origin)
    assert status == 401 and json.loads(body)["error"]["code"] == "invalid_api_key"
    assert headers["Access-Control-Allow-Origin"] == APP
    status, headers, _ = request(named, "POST", "/v1/chat/completions", {"messages": []}, key=KEY, headers=origin)
    assert status == 400 and headers["Access-Control-Allow-Origin"] == APP
    status, headers, _ = request(named, "GET", "/v1/nothing", key=KEY, headers=origin)
    assert status == 404 and headers["Access-Control-Allow-Origin"] == APP
    status, headers, body = request(named, "POST", "/v1/chat/completions", CHAT | {"stream": True}, key=KEY,
                                    headers=origin)
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    assert headers["Access-Control-Allow-Origin"] == APP
    assert body.rstrip().endswith(b"data: [DONE]")
    status, headers, _ = request(named, "GET", "/health", headers=origin)
    assert status == 200 and headers["Access-Control-Allow-Origin"] == APP


def test_other_origins_get_no_cors_headers(named):
    status, headers, _ = preflight(named, "/v1/chat/completions", OTHER)
    assert status == 401 and cors_headers(headers) == {}  # not answered as a preflight: the key check stands
    status, headers, _ = request(named, "POST", "/v1/chat/completions", CHAT, key=KEY, headers={"Origin": OTHER})
    assert status == 200 and cors_headers(headers) == {}
    status, headers, _ = request(named, "POST", "/v1/chat/completions", CHAT, key=KEY)  # no Origin: not a browser
    assert status == 200 and cors_headers(headers) == {}
    assert "origin" in vary(headers)  # a cache must still keep the origins' answers apart


def test_wildcard_allows_any_origin(anyone):
    status, headers, _ = preflight(anyone, "/v1/chat/completions", OTHER)
    assert status == 204 and headers["Access-Control-Allow-Origin"] == "*"
    assert "origin" not in vary(headers)
    status, headers, _ = request(anyone, "POST", "/v1/chat/completions", CHAT, key=KEY, headers={"Origin": OTHER})
    assert status == 200 and headers["Access-Control-Allow-Origin"] == "*"
    status, headers, _ = request(anyone, "GET", "/v1/models", headers={"Origin": OTHER})
    assert status == 401 and headers["Access-Control-Allow-Origin"] == "*"


def test_without_the_option_there_is_no_cors_at_all(plain):
    status, headers, _ = preflight(plain, "/v1/chat/completions", APP)
    assert status == 401 and cors_headers(headers) == {}
    status, headers, _ = preflight(plain, "/health", APP)
    assert status == 405 and cors_headers(headers) == {}
    for key in (KEY, None):
        status, headers, _ = request(plain, "POST", "/v1/chat/completions", CHAT, key=key, headers={"Origin": APP})
        assert status == (200 if key else 401) and cors_headers(headers) == {} and vary(headers) == []


@pytest.mark.parametrize("origin, needles", [
    ("http://localhost:3000/", ["--cors-origin 'http://localhost:3000/' is not an origin",
                                "drop the trailing slash: http://localhost:3000"]),
    ("localhost:3000", ["is not an origin", "scheme://host[:port]"]),
    ("http://app.example/path", ["is not an origin"]),
])
def test_serve_refuses_a_malformed_origin(origin, needles):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "mixtral_cli", "serve", "--cors-origin", origin, "-m", "/nonexistent"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    for needle in needles:
        assert needle in lines[0]
