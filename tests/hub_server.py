"""A small Hugging Face Hub look-alike on 127.0.0.1 for download tests.

It speaks the parts of the Hub protocol that ``huggingface_hub`` uses to download a model:

* ``GET /api/models/{repo}`` and ``GET /api/models/{repo}/revision/{rev}`` (``?blobs=true`` adds
  size, blobId and lfs {size, sha256, pointerSize} to every sibling);
* ``HEAD``/``GET /{repo}/resolve/{rev}/{path}``: regular files are served directly with ``ETag`` =
  git blob id; LFS files answer ``302`` to a second origin (the "CDN") with ``X-Linked-Etag`` =
  sha256 and ``X-Linked-Size``, as the real Hub does. Every answer carries ``X-Repo-Commit``;
* errors with the ``X-Error-Code`` / ``X-Error-Message`` headers the client maps to
  ``RepositoryNotFoundError``, ``RevisionNotFoundError``, ``EntryNotFoundError``, ``GatedRepoError``;
* ``Range: bytes=N-`` / ``bytes=N-M`` with ``206`` + ``Content-Range`` (``416`` past the end).

Test hooks: gated repos (``401`` without a token, ``403`` with a token not granted access), cutting
a transfer after N bytes, ignoring Range headers, serving corrupted bytes (a number of times, or always), and a log of every
request (method, path, headers) to check Range resumes and that some files were never asked for.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".pt", ".bin", ".model", ".gguf")


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(data: bytes) -> bytes:
    sha = hashlib.sha256(data).hexdigest()
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha}\nsize {len(data)}\n".encode()


@dataclass
class Commit:
    sha: str
    files: dict[str, bytes]


@dataclass
class Repo:
    repo_id: str
    commits: dict[str, Commit] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)  # branch/tag -> sha
    gated: bool = False
    granted_tokens: set[str] = field(default_factory=set)

    def resolve(self, rev: str) -> Commit | None:
        sha = self.refs.get(rev, rev)
        return self.commits.get(sha)


@dataclass
class Request:
    server: str  # "hub" or "cdn"
    method: str
    path: str
    headers: dict[str, str]
    status: int | None = None  # the status the server answered with

    @property
    def range(self) -> str | None:
        return self.headers.get("range")


class FakeHub:
    """Start with ``with FakeHub() as hub:``; ``hub.url`` is the value for ``HF_ENDPOINT``."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.requests: list[Request] = []
        self.cut: dict[str, list[int]] = {}  # filename -> [bytes to send before closing, times left]
        self.corrupt: dict[str, int] = {}  # filename -> times left (-1: always)
        self.ignore_range = False  # answer 200 with the whole file, as some proxies do
        self._lock = threading.Lock()
        self._blobs: dict[str, tuple[str, bytes]] = {}  # sha256 -> (filename, content)
        self._hub = self._make_server("hub")
        self._cdn = self._make_server("cdn")
        self._threads: list[threading.Thread] = []

    # ---- setup -----------------------------------------------------------------------------

    def add_repo(
        self,
        repo_id: str,
        files: dict[str, bytes],
        *,
        branch: str = "main",
        gated: bool = False,
        granted_tokens: tuple[str, ...] = (),
    ) -> str:
        """Create (or add a commit to) ``repo_id`` with ``files`` at ``branch``; return the commit sha."""
        repo = self.repos.setdefault(repo_id, Repo(repo_id))
        repo.gated = repo.gated or gated
        repo.granted_tokens.update(granted_tokens)
        return self.add_commit(repo_id, files, ref=branch)

    def add_commit(self, repo_id: str, files: dict[str, bytes], *, ref: str | None = None) -> str:
        repo = self.repos[repo_id]
        h = hashlib.sha1(repo_id.encode())
        for name in sorted(files):
            h.update(name.encode() + b"\0" + hashlib.sha256(files[name]).digest())
        h.update(str(len(repo.commits)).encode())
        sha = h.hexdigest()
        repo.commits[sha] = Commit(sha, dict(files))
        for name, data in files.items():
            if self.is_lfs(name):
                self._blobs[hashlib.sha256(data).hexdigest()] = (name, data)
        if ref is not None:
            repo.refs[ref] = sha
        return sha

    @staticmethod
    def is_lfs(name: str) -> bool:
        return name.endswith(LFS_SUFFIXES)

    def cut_after(self, filename: str, nbytes: int, times: int = 1) -> None:
        """Close the connection after ``nbytes`` of the body of ``filename``, ``times`` times."""
        self.cut[filename] = [nbytes, times]

    def corrupt_file(self, filename: str, times: int = 1) -> None:
        """Serve ``filename`` with altered bytes ``times`` times (``-1``: always)."""
        self.corrupt[filename] = times

    def requests_for(self, filename: str, method: str | None = None) -> list[Request]:
        """Requests that fetched ``filename`` (on the hub or, for LFS files, on the CDN)."""
        out = []
        for r in self.requests:
            path = unquote(urlsplit(r.path).path)
            name = None
            if r.server == "hub" and "/resolve/" in path:
                name = path.split("/resolve/", 1)[1].split("/", 1)[1]
            elif r.server == "cdn":
                name = parse_qs(urlsplit(r.path).query).get("file", [None])[0]
            if name == filename and (method is None or r.method == method):
                out.append(r)
        return out

    # ---- lifecycle -------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._hub.server_address[1]}"

    @property
    def cdn_url(self) -> str:
        return f"http://127.0.0.1:{self._cdn.server_address[1]}"

    def __enter__(self) -> FakeHub:
        for srv in (self._hub, self._cdn):
            t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def __exit__(self, *exc: object) -> None:
        for srv in (self._hub, self._cdn):
            srv.shutdown()
            srv.server_close()

    def _make_server(self, kind: str) -> ThreadingHTTPServer:
        hub = self

        class Handler(_Handler):
            server_kind = kind
            fake = hub

        srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        srv.daemon_threads = True
        return srv

    # ---- hooks used by the handler ---------------------------------------------------------

    def _log(self, req: Request) -> None:
        with self._lock:
            self.requests.append(req)

    def _take_cut(self, filename: str) -> int | None:
        with self._lock:
            entry = self.cut.get(filename)
            if entry and entry[1] != 0:
                entry[1] -= 1
                return entry[0]
        return None

    def _take_corrupt(self, filename: str) -> bool:
        with self._lock:
            left = self.corrupt.get(filename, 0)
            if left == 0:
                return False
            if left > 0:
                self.corrupt[filename] = left - 1
            return True


_RANGE_RE = re.compile(r"^bytes=(\d+)-(\d*)$")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_kind = "hub"
    fake: FakeHub

    def log_message(self, format: str, *args: object) -> None:  # keep test output clean
        pass

    def send_response(self, code: int, message: str | None = None) -> None:
        if getattr(self, "_logged", None) is not None:
            self._logged.status = code
        super().send_response(code, message)

    # ---- plumbing --------------------------------------------------------------------------

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        hdrs = {"Content-Length": str(len(body))}
        hdrs.update(headers or {})
        for k, v in hdrs.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _error(self, status: int, code: str | None, message: str, extra: dict[str, str] | None = None) -> None:
        headers = {"Content-Type": "application/json", "X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        headers.update(extra or {})
        self._send(status, json.dumps({"error": message}).encode(), headers)

    def _token(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        return auth[7:] if auth.lower().startswith("bearer ") else None

    def do_HEAD(self) -> None:
        self._dispatch()

    def do_GET(self) -> None:
        self._dispatch()

    def _dispatch(self) -> None:
        self._logged = Request(
            self.server_kind, self.command, self.path, {k.lower(): v for k, v in self.headers.items()}
        )
        self.fake._log(self._logged)
        split = urlsplit(self.path)
        path = unquote(split.path)
        if self.server_kind == "cdn":
            return self._cdn(path, parse_qs(split.query))
        if path.startswith("/api/models/"):
            return self._model_info(path[len("/api/models/") :], parse_qs(split.query))
        if "/resolve/" in path:
            return self._resolve(path)
        self._error(404, None, "Not Found")

    # ---- API -------------------------------------------------------------------------------

    def _repo(self, repo_id: str) -> Repo | None:
        repo = self.fake.repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", "Repository not found")
        return repo

    def _model_info(self, rest: str, query: dict[str, list[str]]) -> None:
        if "/revision/" in rest:
            repo_id, rev = rest.split("/revision/", 1)
        else:
            repo_id, rev = rest, "main"
        repo = self._repo(repo_id)
        if repo is None:
            return
        commit = repo.resolve(rev)
        if commit is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        blobs = query.get("blobs", ["false"])[0].lower() in ("1", "true")
        siblings = []
        for name in sorted(commit.files):
            data = commit.files[name]
            entry: dict[str, object] = {"rfilename": name}
            if blobs:
                if self.fake.is_lfs(name):
                    pointer = lfs_pointer(data)
                    entry.update(
                        size=len(data),
                        blobId=git_blob_id(pointer),
                        lfs={"size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "pointerSize": len(pointer)},
                    )
                else:
                    entry.update(size=len(data), blobId=git_blob_id(data))
            siblings.append(entry)
        body = {
            "_id": hashlib.md5(repo.repo_id.encode()).hexdigest()[:24],
            "id": repo.repo_id,
            "modelId": repo.repo_id,
            "sha": commit.sha,
            "private": False,
            "gated": "manual" if repo.gated else False,
            "disabled": False,
            "tags": [],
            "siblings": siblings,
        }
        self._send(200, json.dumps(body).encode(), {"Content-Type": "application/json"})

    # ---- files -----------------------------------------------------------------------------

    def _resolve(self, path: str) -> None:
        repo_id, rest = path.lstrip("/").split("/resolve/", 1)
        rev, _, filename = rest.partition("/")
        repo = self._repo(repo_id)
        if repo is None:
            return
        if repo.gated:
            token = self._token()
            if token is None:
                return self._error(
                    401, "GatedRepo",
                    f"Access to model {repo_id} is restricted. You must have access to it and be authenticated to access it. Please log in.",
                )
            if token not in repo.granted_tokens:
                return self._error(
                    403, "GatedRepo",
                    f"Access to model {repo_id} is restricted and you are not in the authorized list. "
                    f"Visit {self.fake.url}/{repo_id} to ask for access.",
                )
        commit = repo.resolve(rev)
        if commit is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        if filename not in commit.files:
            return self._error(404, "EntryNotFound", f"{filename} does not exist", {"X-Repo-Commit": commit.sha})
        data = commit.files[filename]
        if self.fake.is_lfs(filename):
            sha = hashlib.sha256(data).hexdigest()
            location = f"{self.fake.cdn_url}/lfs/{sha}?file={filename}"
            return self._send(
                302, b"",
                {
                    "Location": location,
                    "X-Repo-Commit": commit.sha,
                    "X-Linked-Etag": f'"{sha}"',
                    "X-Linked-Size": str(len(data)),
                    "ETag": f'"{git_blob_id(lfs_pointer(data))}"',
                },
            )
        self._serve_bytes(filename, data, {"X-Repo-Commit": commit.sha, "ETag": f'"{git_blob_id(data)}"'})

    def _cdn(self, path: str, query: dict[str, list[str]]) -> None:
        sha = path.rsplit("/", 1)[-1]
        entry = self.fake._blobs.get(sha)
        if entry is None:
            return self._error(404, None, "NoSuchKey")
        filename, data = entry
        self._serve_bytes(filename, data, {"ETag": f'"{sha}"'})

    def _serve_bytes(self, filename: str, data: bytes, headers: dict[str, str]) -> None:
        total = len(data)
        start, end = 0, total - 1
        status = 200
        headers = {**headers, "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
        rng = None if self.fake.ignore_range else self.headers.get("Range")
        if rng:
            m = _RANGE_RE.match(rng.strip())
            if m is None:
                return self._error(416, None, "bad range", {"Content-Range": f"bytes */{total}"})
            start = int(m.group(1))
            end = min(int(m.group(2)), total - 1) if m.group(2) else total - 1
            if start >= total or start > end:
                return self._error(416, None, "range not satisfiable", {"Content-Range": f"bytes */{total}"})
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{total}"
        body = data[start : end + 1]
        if self.command == "GET" and self.fake._take_corrupt(filename) and body:
            body = bytes(b ^ 0xFF for b in body[:16]) + body[16:]
        cut = self.fake._take_cut(filename) if self.command == "GET" else None
        if cut is None:
            return self._send(status, body, headers)
        # Send the headers of the full answer, part of the body, then drop the connection.
        self.send_response(status)
        for k, v in {"Content-Length": str(len(body)), **headers}.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body[:cut])
        self.wfile.flush()
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
