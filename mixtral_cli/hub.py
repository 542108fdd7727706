"""Download Mixtral checkpoints from the Hugging Face Hub and find them again.

``download`` fetches the safetensors checkpoint of a repo (never the ``consolidated.*.pt`` pickles):

* the revision (branch, tag or sha) is resolved once with ``model_info(files_metadata=True)`` and
  every file is then fetched from that commit, so a branch moving mid-download cannot mix commits;
* the bytes still to fetch are compared with the free space of the target before anything starts;
* each file is written to ``<name>.incomplete`` next to its final place and moved there only once
  complete and verified; an interrupted download resumes from that file with an HTTP Range request;
* every LFS file is checked against the sha256 the Hub publishes (regular files against their git
  blob id); a mismatch deletes the file and fetches it again once, then fails;
* files land in the Hugging Face cache (``HF_HUB_CACHE`` / ``HF_HOME``) in the layout
  ``huggingface_hub`` uses (``blobs/``, ``snapshots/<sha>/``, ``refs/``), or in ``local_dir``.

Progress is reported through the small :class:`ProgressSink` protocol; rendering lives in the UI.

``resolve_model`` maps a model spec (a directory or a repo id) to a local directory without
touching the network unless asked to download.

Environment, read at call time: ``HF_ENDPOINT``, ``HF_TOKEN``, ``HF_HUB_OFFLINE``, ``HF_HUB_CACHE``,
``HF_HOME``, ``MIXTRAL_MODEL``.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import inspect
import json
import os
import re
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from .errors import UserError

DEFAULT_REPO = "mistralai/Mixtral-8x7B-Instruct-v0.1"

# Only the safetensors checkpoint and what is needed to run it. The repo also holds the same weights
# as ``consolidated.*.pt`` pickles: those are never fetched (and no ``.pt``/``.bin`` at all).
WANTED_PATTERNS: tuple[str, ...] = (
    "*.safetensors",
    "model.safetensors.index.json",
    "config.json",
    "generation_config.json",
    "tokenizer.model",
)
# ``consolidated*`` also covers the ``consolidated-*.safetensors`` copies newer mistralai repos ship.
EXCLUDED_PATTERNS: tuple[str, ...] = ("*.pt", "*.pth", "*.bin", "consolidated*")

INDEX_FILE = "model.safetensors.index.json"
_CHUNK_HASH = 8 * 1024 * 1024
_SHA1_RE = re.compile(r"^[0-9a-f]{40}$")
_REPO_ID_RE = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


class DownloadError(UserError):
    """A download failed for a reason outside the user's input (network, corrupted transfer).

    Printed as one line like any ``UserError``, but it is a runtime failure: exit code 1.
    """

    exit_code = 1


# --------------------------------------------------------------------------------------------------
# Progress protocol


class ProgressSink(Protocol):
    """What ``download`` reports. Every method is called from the downloading thread.

    Order: ``begin`` once; then per file ``file_begin``, any number of ``advance``, ``file_end``
    (``file_begin`` may come again for the same file if it is fetched again after a failed
    checksum; ``offset`` then restarts at 0); ``note`` at any time; ``end`` once, also on failure.
    """

    def begin(self, files: Sequence[tuple[str, int]], total_bytes: int, done_bytes: int) -> None:
        """``files``: (name, size) still to fetch; ``total_bytes``: their sizes summed;
        ``done_bytes``: bytes of them already on disk from an earlier, interrupted run."""

    def file_begin(self, name: str, size: int, offset: int) -> None:
        """A file starts (or resumes at ``offset`` bytes)."""

    def advance(self, name: str, nbytes: int) -> None:
        """``nbytes`` more bytes of ``name`` were written."""

    def file_end(self, name: str) -> None:
        """``name`` is complete and verified."""

    def note(self, text: str) -> None:
        """A one-line remark (re-fetching after a checksum mismatch, verifying, ...)."""

    def end(self) -> None:
        """The download finished or failed."""


class NullProgress:
    """A ``ProgressSink`` that shows nothing."""

    def begin(self, files: Sequence[tuple[str, int]], total_bytes: int, done_bytes: int) -> None:
        pass

    def file_begin(self, name: str, size: int, offset: int) -> None:
        pass

    def advance(self, name: str, nbytes: int) -> None:
        pass

    def file_end(self, name: str) -> None:
        pass

    def note(self, text: str) -> None:
        pass

    def end(self) -> None:
        pass


# --------------------------------------------------------------------------------------------------
# Environment (read at call time, not at import time)


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def is_offline() -> bool:
    if _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE"):
        return True
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def hub_endpoint() -> str:
    env = os.environ.get("HF_ENDPOINT")
    if env:
        return env.rstrip("/")
    from huggingface_hub import constants

    return constants.ENDPOINT.rstrip("/")


def hub_cache_dir() -> Path:
    env = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if env:
        return Path(os.path.expandvars(env)).expanduser()
    home = os.environ.get("HF_HOME")
    if home:
        return Path(os.path.expandvars(home)).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE).expanduser()


def _token(explicit: str | None) -> str | None:
    if explicit:
        return explicit
    env = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    if env:
        return env.strip()
    try:
        from huggingface_hub import get_token

        return get_token()
    except Exception:
        return None


def repo_folder(repo_id: str, cache_dir: Path | None = None) -> Path:
    """The cache folder of a model repo: ``<cache>/models--org--name``."""
    return (cache_dir or hub_cache_dir()) / ("models--" + repo_id.replace("/", "--"))


def matches_wanted(name: str) -> bool:
    """Whether a repo file belongs to the checkpoint ``download`` fetches (top level only)."""
    if "/" in name or any(fnmatch.fnmatch(name, pat) for pat in EXCLUDED_PATTERNS):
        return False
    return any(fnmatch.fnmatch(name, pat) for pat in WANTED_PATTERNS)


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


# --------------------------------------------------------------------------------------------------
# Error mapping


def _network_error_types() -> tuple[type[BaseException], ...]:
    types: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for mod, names in (
        ("httpx2", ("TransportError", "TimeoutException", "NetworkError", "RemoteProtocolError")),
        ("httpx", ("TransportError", "TimeoutException", "NetworkError", "RemoteProtocolError")),
        ("requests", ("ConnectionError", "Timeout")),
        ("requests.exceptions", ("ChunkedEncodingError",)),
    ):
        try:
            module = __import__(mod, fromlist=["_"])
        except ImportError:
            continue
        for n in names:
            t = getattr(module, n, None)
            if isinstance(t, type) and issubclass(t, BaseException):
                types.append(t)
    return tuple(types)


def _licence_hint(repo_id: str, endpoint: str) -> str:
    return (
        f"open {endpoint}/{repo_id} while logged in, accept the licence, then pass a read token with "
        "--token or the HF_TOKEN environment variable"
    )


def _map_error(
    exc: BaseException, repo_id: str, revision: str | None, endpoint: str, what: str
) -> UserError | None:
    """Turn a huggingface_hub / network / file-system exception into a one-line error.

    ``None`` for anything else (a bug): the caller lets it propagate with its traceback.
    """
    from huggingface_hub.utils import (
        GatedRepoError,
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        from huggingface_hub.errors import RemoteEntryNotFoundError as _EntryNotFound
    except ImportError:  # older huggingface_hub
        from huggingface_hub.utils import EntryNotFoundError as _EntryNotFound

    if isinstance(exc, UserError):
        return exc
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(exc, GatedRepoError):
        return UserError(
            f"{repo_id} is a gated model: your account has not been granted access to it",
            hint=_licence_hint(repo_id, endpoint),
        )
    if isinstance(exc, RevisionNotFoundError):
        return UserError(
            f"revision {revision!r} does not exist in {repo_id}",
            hint="pass a branch, tag or commit sha of that repo with --revision",
        )
    if isinstance(exc, RepositoryNotFoundError):
        return UserError(
            f"model repo {repo_id} not found on {endpoint} (or it is private and no valid token was sent)",
            hint="check the repo id; for a private or gated repo pass --token or set HF_TOKEN",
        )
    if isinstance(exc, _EntryNotFound):
        return DownloadError(
            f"{what} is missing from {repo_id} at revision {revision}",
            hint="the repo changed during the download; run the command again",
        )
    if isinstance(exc, OfflineModeIsEnabled):
        return UserError(
            f"cannot download {repo_id}: offline mode is on (HF_HUB_OFFLINE)",
            hint="unset HF_HUB_OFFLINE to download, or download it on a connected machine",
        )
    if isinstance(exc, HfHubHTTPError) and status in (401, 403):
        return UserError(
            f"access to {repo_id} was refused (HTTP {status})",
            hint=_licence_hint(repo_id, endpoint),
        )
    if isinstance(exc, HfHubHTTPError):
        return DownloadError(
            f"the Hub answered HTTP {status} while downloading {what} from {repo_id}",
            hint="try again later; the download resumes where it stopped",
        )
    if isinstance(exc, _network_error_types()):
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return DownloadError(
            f"network error while downloading {what} from {endpoint}: {detail}",
            hint="check the connection and run the same command again; the download resumes where it stopped",
        )
    if isinstance(exc, OSError) and exc.errno is not None:
        place = f" {exc.filename}" if exc.filename else ""
        return DownloadError(
            f"cannot write {what}:{place} {exc.strerror or exc}",
            hint="fix the disk problem and run the same command again; the download resumes where it stopped",
        )
    return None


# --------------------------------------------------------------------------------------------------
# Remote file list


@dataclass(frozen=True)
class RemoteFile:
    name: str
    size: int
    sha256: str | None  # LFS files
    blob_id: str | None  # git blob id (sha1) of regular files

    @property
    def etag(self) -> str:
        """Name of the blob in the HF cache (the same one huggingface_hub uses)."""
        return self.sha256 or self.blob_id or ""


def _siblings(info: Any) -> list[RemoteFile]:
    files = []
    for s in info.siblings or []:
        lfs = getattr(s, "lfs", None)
        sha256 = None
        size = getattr(s, "size", None)
        if lfs:
            sha256 = lfs.get("sha256") if isinstance(lfs, dict) else getattr(lfs, "sha256", None)
            lfs_size = lfs.get("size") if isinstance(lfs, dict) else getattr(lfs, "size", None)
            size = lfs_size if lfs_size is not None else size
        files.append(RemoteFile(s.rfilename, int(size or 0), sha256, getattr(s, "blob_id", None)))
    return files


# --------------------------------------------------------------------------------------------------
# Placement of files: HF cache layout or a plain directory


class _Target:
    """Where each file goes, where its partial download lives, and how it is recorded."""

    def __init__(self, repo_id: str, commit: str, revision: str, local_dir: Path | None, cache_dir: Path):
        self.repo_id, self.commit, self.revision = repo_id, commit, revision
        self.local_dir = local_dir
        self.cache_dir = cache_dir
        self.storage = repo_folder(repo_id, cache_dir)

    @property
    def root(self) -> Path:
        """The directory holding the files, returned to the caller."""
        return self.local_dir if self.local_dir is not None else self.storage / "snapshots" / self.commit

    @property
    def space_dir(self) -> Path:
        return self.local_dir if self.local_dir is not None else self.storage

    def final(self, f: RemoteFile) -> Path:
        return self.root.joinpath(*f.name.split("/"))

    def blob(self, f: RemoteFile) -> Path:
        return self.storage / "blobs" / f.etag

    def _meta(self, f: RemoteFile) -> Path:
        assert self.local_dir is not None
        return self.local_dir / ".cache" / "huggingface" / "download" / (f.name + ".metadata")

    def incomplete(self, f: RemoteFile) -> Path:
        if self.local_dir is None:
            return self.storage / "blobs" / (f.etag + ".incomplete")
        return self.local_dir / ".cache" / "huggingface" / "download" / f"{f.name}.{f.etag}.incomplete"

    def lock(self, f: RemoteFile) -> Path:
        if self.local_dir is None:
            return self.cache_dir / ".locks" / self.storage.name / f"{f.etag}.lock"
        return self.local_dir / ".cache" / "huggingface" / "download" / f"{f.name}.lock"

    def present(self, f: RemoteFile) -> bool:
        """Whether ``f`` is already in place (no transfer needed)."""
        if self.local_dir is None:
            # Blob names are content hashes, so an existing blob is the right content.
            return self.final(f).exists() or self.blob(f).exists()
        path = self.final(f)
        if not path.is_file() or path.stat().st_size != f.size:
            return False
        meta = self._meta(f)
        if meta.is_file():
            lines = meta.read_text().splitlines()
            if len(lines) >= 2 and lines[1].strip() == f.etag:
                return True
        return _verify(path, f) is None  # placed by hand or by an older run: check the content

    def place(self, f: RemoteFile, data: Path) -> None:
        """Move the verified ``data`` file into place."""
        if self.local_dir is not None:
            dest = self.final(f)
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(data, dest)
            self._record_local(f)
            return
        blob = self.blob(f)
        os.replace(data, blob)
        self.link(f)

    def link(self, f: RemoteFile) -> None:
        """Cache mode: make ``snapshots/<sha>/<name>`` point at the blob (and the ref at the commit)."""
        if self.local_dir is not None:
            if not self._meta(f).is_file():
                self._record_local(f)
            return
        pointer = self.final(f)
        if pointer.exists():
            return
        pointer.parent.mkdir(parents=True, exist_ok=True)
        blob = self.blob(f)
        try:
            os.symlink(os.path.relpath(blob, pointer.parent), pointer)
        except FileExistsError:
            pass
        except OSError:  # no symlinks on this filesystem: keep a copy, as huggingface_hub does
            shutil.copyfile(blob, pointer)

    def _record_local(self, f: RemoteFile) -> None:
        meta = self._meta(f)
        meta.parent.mkdir(parents=True, exist_ok=True)
        meta.write_text(f"{self.commit}\n{f.etag}\n{time.time()}\n")

    def write_ref(self) -> None:
        if self.local_dir is not None or self.revision == self.commit:
            return
        ref = self.storage / "refs" / self.revision
        ref.parent.mkdir(parents=True, exist_ok=True)
        if not ref.is_file() or ref.read_text() != self.commit:
            ref.write_text(self.commit)


# --------------------------------------------------------------------------------------------------
# Hashing


def _git_blob_sha1(path: Path) -> str:
    h = hashlib.sha1()
    h.update(b"blob %d\0" % path.stat().st_size)
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK_HASH):
            h.update(chunk)
    return h.hexdigest()


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK_HASH):
            h.update(chunk)
    return h.hexdigest()


def _verify(path: Path, f: RemoteFile, sha256: str | None = None) -> str | None:
    """``None`` if ``path`` holds the content the Hub advertises for ``f``, else a description."""
    size = path.stat().st_size
    if size != f.size:
        return f"size {size} instead of {f.size}"
    if f.sha256:
        got = sha256 or _sha256_file(path)
        if got != f.sha256.lower():
            return f"sha256 {got[:12]}... instead of {f.sha256[:12]}..."
    elif f.blob_id and _SHA1_RE.match(f.blob_id):
        got = _git_blob_sha1(path)
        if got != f.blob_id:
            return f"git blob id {got[:12]}... instead of {f.blob_id[:12]}..."
    return None


class _Writer:
    """File object handed to ``http_get``: counts bytes for progress and hashes as it writes."""

    def __init__(self, fh: BinaryIO, name: str, offset: int, sink: ProgressSink, hasher: Any):
        self._fh, self._name, self._sink = fh, name, sink
        self._hasher = hasher
        self.written = offset

    def write(self, data: bytes) -> int:
        n = self._fh.write(data)
        if self._hasher is not None:
            self._hasher.update(data)
        self.written += len(data)
        self._sink.advance(self._name, len(data))
        return n

    def tell(self) -> int:
        return self._fh.tell()

    def seek(self, *args: Any) -> int:
        # The client rewinds when a server ignores a Range request; the running hash is then void.
        self._hasher = None
        pos = self._fh.seek(*args)
        self._sink.advance(self._name, pos - self.written)
        self.written = pos
        return pos

    def truncate(self, *args: Any) -> int:
        self._hasher = None
        return self._fh.truncate(*args)

    def flush(self) -> None:
        self._fh.flush()

    def hexdigest(self) -> str | None:
        return self._hasher.hexdigest() if self._hasher is not None else None


class _QuietBar:
    """Stands in for the client's own tqdm bar: progress goes through the ProgressSink instead."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __enter__(self) -> _QuietBar:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _http_get_kwargs() -> dict[str, Any]:
    from huggingface_hub.file_download import http_get

    params = inspect.signature(http_get).parameters
    kwargs: dict[str, Any] = {}
    if "tqdm_class" in params:
        kwargs["tqdm_class"] = _QuietBar
    if "displayed_filename" in params:
        kwargs["displayed_filename"] = None
    return kwargs


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        from huggingface_hub.utils import WeakFileLock
    except ImportError:  # pragma: no cover - very old huggingface_hub
        yield
        return
    with WeakFileLock(path):
        yield


# --------------------------------------------------------------------------------------------------
# Transfer of one file


def _fetch(
    f: RemoteFile,
    target: _Target,
    *,
    endpoint: str,
    headers: dict[str, str],
    sink: ProgressSink,
    repo_id: str,
) -> None:
    """Fetch ``f`` into place, resuming a partial file, verifying it, re-fetching once on mismatch."""
    from huggingface_hub import hf_hub_url
    from huggingface_hub.file_download import http_get

    url = hf_hub_url(repo_id, f.name, revision=target.commit, endpoint=endpoint)
    partial = target.incomplete(f)
    partial.parent.mkdir(parents=True, exist_ok=True)
    extra = _http_get_kwargs()

    for attempt in (1, 2):
        offset = partial.stat().st_size if partial.exists() else 0
        if offset > f.size:  # not a prefix of this file: start again
            partial.unlink()
            offset = 0
        hasher = None
        if f.sha256:
            hasher = hashlib.sha256()
            if offset:
                with partial.open("rb") as fh:  # hash the part already on disk
                    while chunk := fh.read(_CHUNK_HASH):
                        hasher.update(chunk)
        sink.file_begin(f.name, f.size, offset)
        with partial.open("ab") as fh:
            writer = _Writer(fh, f.name, offset, sink, hasher)
            if offset < f.size or f.size == 0:
                try:
                    http_get(
                        url,
                        writer,  # type: ignore[arg-type]
                        resume_size=offset,
                        headers=dict(headers),
                        expected_size=f.size,
                        **extra,
                    )
                except OSError as exc:
                    # The client's size check: keep the partial file, a later run resumes it.
                    if "Consistency check failed" in str(exc):
                        raise DownloadError(
                            f"the transfer of {f.name} ended early ({writer.written} of {f.size} bytes)",
                            hint="run the same command again; the download resumes where it stopped",
                        ) from exc
                    raise
            digest = writer.hexdigest()
        problem = _verify(partial, f, digest)
        if problem is None:
            target.place(f, partial)
            sink.file_end(f.name)
            return
        partial.unlink(missing_ok=True)
        if attempt == 1:
            sink.note(f"{f.name}: checksum mismatch ({problem}); fetching it again")
            continue
        raise DownloadError(
            f"{f.name} from {repo_id} is corrupted after two attempts: {problem}",
            hint="something between you and the Hub alters the data (proxy, disk); try again later or from another network",
        )


# --------------------------------------------------------------------------------------------------
# Public API


def download(
    repo_id: str = DEFAULT_REPO,
    *,
    revision: str | None = None,
    local_dir: Path | None = None,
    token: str | None = None,
    progress: ProgressSink | None = None,
    endpoint: str | None = None,
) -> Path:
    """Download the safetensors checkpoint of ``repo_id`` and return the directory holding it.

    The directory is ``<HF cache>/models--org--name/snapshots/<commit sha>`` or ``local_dir``.
    Raises ``UserError`` (gated/missing repo or revision, not enough disk, offline and not cached)
    or ``DownloadError`` (network failure, corrupted transfer).
    """
    sink: ProgressSink = progress or NullProgress()
    endpoint = (endpoint or hub_endpoint()).rstrip("/")
    cache_dir = hub_cache_dir()
    local = Path(local_dir).expanduser().resolve() if local_dir is not None else None

    if is_offline():
        found = _cached_snapshot(repo_id, revision, cache_dir) if local is None else _complete_dir(local)
        if found is None:
            where = str(local) if local is not None else f"the Hugging Face cache ({cache_dir})"
            raise UserError(
                f"{repo_id} is not in {where} and HF_HUB_OFFLINE is set",
                hint="unset HF_HUB_OFFLINE to download it",
            )
        return found

    tok = _token(token)
    from huggingface_hub import HfApi
    from huggingface_hub.utils import build_hf_headers

    api = HfApi(endpoint=endpoint, token=tok if tok else False)
    try:
        info = api.model_info(repo_id, revision=revision, files_metadata=True)
    except Exception as exc:
        mapped = _map_error(exc, repo_id, revision, endpoint, "the file list")
        if mapped is None:
            raise
        raise mapped from exc

    commit = info.sha
    if not commit:
        raise DownloadError(f"the Hub did not report a commit for {repo_id} at {revision or 'main'}")
    # Small files first: with the index in place, a half-downloaded snapshot is never mistaken for a
    # complete one (see ``_complete_dir``).
    remote = sorted(
        (f for f in _siblings(info) if matches_wanted(f.name)),
        key=lambda f: (f.name.endswith(".safetensors"), f.name),
    )
    if not any(f.name.endswith(".safetensors") for f in remote):
        raise UserError(
            f"{repo_id} has no safetensors weights at revision {revision or 'main'}",
            hint="mixtral needs a repo in the Hugging Face safetensors layout (model-*.safetensors)",
        )

    target = _Target(repo_id, commit, revision or "main", local, cache_dir)
    todo = [f for f in remote if not target.present(f)]
    partial_bytes = {
        f.name: min(target.incomplete(f).stat().st_size, f.size) if target.incomplete(f).exists() else 0
        for f in todo
    }
    total = sum(f.size for f in todo)
    done = sum(partial_bytes.values())
    needed = total - done
    if needed > 0:
        probe = target.space_dir
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        free = shutil.disk_usage(probe).free
        if needed > free:
            raise UserError(
                f"not enough disk space in {probe}: the download needs {_fmt_bytes(needed)} more, "
                f"only {_fmt_bytes(free)} free",
                hint="free some space, or download elsewhere with --local-dir or HF_HUB_CACHE",
            )

    headers = build_hf_headers(token=tok if tok else False)
    sink.begin([(f.name, f.size) for f in todo], total, done)
    try:
        target.write_ref()
        for f in remote:
            if f in todo:
                continue
            target.link(f)
        for f in todo:
            with _file_lock(target.lock(f)):
                if target.present(f):  # another process finished it meanwhile
                    target.link(f)
                    sink.file_begin(f.name, f.size, f.size)
                    sink.file_end(f.name)
                    continue
                try:
                    _fetch(f, target, endpoint=endpoint, headers=headers, sink=sink, repo_id=repo_id)
                except UserError:
                    raise
                except Exception as exc:
                    mapped = _map_error(exc, repo_id, commit, endpoint, f.name)
                    if mapped is None:
                        raise
                    raise mapped from exc
    finally:
        sink.end()
    return target.root


def _complete_dir(path: Path) -> Path | None:
    """``path`` if it holds a loadable Hub-layout (or quantized) checkpoint, else ``None``."""
    if not (path / "config.json").is_file():
        return None
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text()).get("weight_map", {})
        except (OSError, ValueError):
            return None
        if all((path / shard).exists() for shard in set(weight_map.values())):
            return path
        return None
    return path if any(path.glob("*.safetensors")) else None


def _cached_snapshot(repo_id: str, revision: str | None, cache_dir: Path | None = None) -> Path | None:
    """The complete cached snapshot of ``repo_id`` at ``revision`` (default: main, else newest)."""
    storage = repo_folder(repo_id, cache_dir)
    snapshots = storage / "snapshots"
    if not snapshots.is_dir():
        return None
    rev = revision or "main"
    commit = rev if _SHA1_RE.match(rev) else None
    ref = storage / "refs" / rev
    if commit is None and ref.is_file():
        commit = ref.read_text().strip()
    if commit is not None:
        return _complete_dir(snapshots / commit) if (snapshots / commit).is_dir() else None
    if revision is not None:
        return None
    candidates = sorted(
        (p for p in snapshots.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime, reverse=True
    )
    for snap in candidates:
        if _complete_dir(snap) is not None:
            return snap
    return None


def _looks_like_path(spec: str) -> bool:
    return (
        spec.startswith((".", "/", "~"))
        or spec.count("/") > 1
        or os.sep in spec and os.sep != "/"
        or not _REPO_ID_RE.match(spec)
    )


def resolve_model(
    spec: str | None,
    *,
    download_missing: bool = False,
    progress: ProgressSink | None = None,
    token: str | None = None,
) -> Path:
    """Map a model spec to a local directory.

    ``spec`` is a directory, or a Hub repo id looked up in the HF cache. ``None`` means
    ``$MIXTRAL_MODEL``, else ``DEFAULT_REPO``. A repo id that is not cached raises ``UserError``
    unless ``download_missing`` is true, in which case it is downloaded first.
    """
    spec = spec or os.environ.get("MIXTRAL_MODEL") or DEFAULT_REPO
    path = Path(spec).expanduser()
    if path.is_dir():
        return path.resolve()
    if path.exists():
        raise UserError(f"model path {spec} is a file, not a directory", hint="pass the checkpoint's directory")
    if _looks_like_path(spec):
        raise UserError(f"model directory {spec} does not exist", hint="pass an existing directory or a Hub repo id")

    found = _cached_snapshot(spec, None)
    if found is not None:
        return found
    if download_missing:
        return download(spec, token=token, progress=progress)
    partly = repo_folder(spec).joinpath("snapshots").is_dir()
    state = "only partly downloaded" if partly else "not downloaded"
    raise UserError(f"model {spec} is {state}", hint=f"run: mixtral download {spec}  (or pass --yes)")
