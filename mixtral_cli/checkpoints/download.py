"""Download Mixtral checkpoints from the Hugging Face Hub (the `mixtral download` verb).

Everything goes through ``huggingface_hub``'s public API; this module adds only what that API lacks:

* the revision (branch, tag or sha) is resolved once to a commit (``HfApi.resolve_revision``, which
  also records ``refs/<revision>`` in the cache) and every file is fetched from that commit, so a
  branch moving mid-download cannot mix commits;
* the file list with sizes and LFS sha256 comes from ``HfApi.model_info(files_metadata=True)``; only
  the safetensors checkpoint is fetched (never the ``consolidated.*.pt`` pickles);
* ``hf_hub_download(dry_run=True)`` says which files are already in place; the bytes of the others
  are compared with the free space of the target before anything is fetched;
* each file is fetched by ``hf_hub_download`` into the Hugging Face cache (``HF_HUB_CACHE`` /
  ``HF_HOME``) or into ``local_dir``, atomically (a temporary file renamed into place). A connection
  cut mid-file is resumed by the client with an HTTP Range request. An interrupted download keeps
  every completed file; the file in flight starts over on the next run (at most one shard, ~5 GB for
  Mixtral-8x7B). That is the client's doing and its public API offers no way around it: since
  huggingface_hub 1.18 each transfer writes to a temporary ``<etag>.<random>.incomplete`` file that
  the client deletes on any exception (Ctrl-C included) and that no later call reads; a killed
  process leaves it behind as an orphan (``hf cache prune`` removes those from the cache). Resuming
  would mean writing the client's cache layout ourselves, which this module does not do. The disk
  check and the progress therefore count the in-flight file whole;
* the client checks sizes only: every fetched LFS file is checked here against the sha256 the Hub
  publishes (regular files against their git blob id). A mismatch deletes the file and fetches it
  again once with ``force_download=True``, then fails;
* every failure is one line (``UserError``, or ``DownloadError`` for a runtime failure).

Progress is reported through the small :class:`ProgressSink` protocol (fed by a ``tqdm_class``
stand-in); rendering lives in the UI.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ..errors import UserError
from ..sizes import format_bytes
from .hub import (
    DEFAULT_REPO,
    SHA1_RE,
    cached_snapshot,
    complete_dir,
    hub_cache_dir,
    hub_endpoint,
    is_offline,
    matches_wanted,
    repo_folder,
)

_CHUNK_HASH = 8 * 1024 * 1024


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
    (``file_begin`` comes again for the same file when it is fetched again after a failed checksum);
    ``note`` at any time; ``end`` once, also on failure.
    """

    def begin(self, files: Sequence[tuple[str, int]], total_bytes: int) -> None:
        """``files``: (name, size) to fetch; ``total_bytes``: their sizes summed."""

    def file_begin(self, name: str, size: int) -> None:
        """A file starts (again, after a checksum mismatch: its count restarts at 0)."""

    def advance(self, name: str, nbytes: int) -> None:
        """``nbytes`` more bytes of ``name`` arrived (negative when a resume had to start over)."""

    def file_end(self, name: str) -> None:
        """``name`` is complete and verified."""

    def note(self, text: str) -> None:
        """A one-line remark (re-fetching after a checksum mismatch, ...)."""

    def end(self) -> None:
        """The download finished or failed."""


class NullProgress:
    """A ``ProgressSink`` that shows nothing."""

    def begin(self, files: Sequence[tuple[str, int]], total_bytes: int) -> None:
        pass

    def file_begin(self, name: str, size: int) -> None:
        pass

    def advance(self, name: str, nbytes: int) -> None:
        pass

    def file_end(self, name: str) -> None:
        pass

    def note(self, text: str) -> None:
        pass

    def end(self) -> None:
        pass


def _bar_class(sink: ProgressSink, name: str) -> type:
    """A ``tqdm_class`` for ``hf_hub_download``: the client's byte counts go to ``sink``."""

    class Bar:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            pass

        def __enter__(self) -> Bar:
            return self

        def __exit__(self, *exc: Any) -> None:
            return None

        def update(self, n: float | None = 1) -> None:
            if n:
                sink.advance(name, int(n))

        def close(self) -> None:
            pass

    return Bar


# --------------------------------------------------------------------------------------------------
# Error mapping


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


def _network_error(exc: BaseException) -> BaseException | None:
    """The network failure behind ``exc`` (itself or a cause), if there is one."""
    import httpx2

    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, (httpx2.TransportError, ConnectionError, TimeoutError)):
            return e
        e = e.__cause__ or e.__context__
    return None


def _licence_hint(repo_id: str, endpoint: str) -> str:
    return (
        f"open {endpoint}/{repo_id} while logged in, accept the licence, then pass a read token with "
        "--token or the HF_TOKEN environment variable"
    )


_RESUME = "run the same command again; completed files are kept"


def _map_error(exc: BaseException, repo_id: str, revision: str | None, endpoint: str, what: str) -> UserError | None:
    """Turn a huggingface_hub / network / file-system exception into a one-line error.

    ``None`` for anything else (a bug): the caller lets it propagate with its traceback.
    """
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(exc, UserError):
        return exc
    status = getattr(getattr(exc, "response", None), "status_code", None)
    known: list[tuple[type, type[UserError], str, str]] = [  # the first match wins (gated is a not-found)
        (GatedRepoError, UserError, f"{repo_id} is a gated model: your account has not been granted access to it",
         _licence_hint(repo_id, endpoint)),
        (RevisionNotFoundError, UserError, f"revision {revision!r} does not exist in {repo_id}",
         "pass a branch, tag or commit sha of that repo with --revision"),
        (RepositoryNotFoundError, UserError,
         f"model repo {repo_id} not found on {endpoint} (or it is private and no valid token was sent)",
         "check the repo id; for a private or gated repo pass --token or set HF_TOKEN"),
        (RemoteEntryNotFoundError, DownloadError, f"{what} is missing from {repo_id} at revision {revision}",
         "the repo changed during the download; run the command again"),
        (OfflineModeIsEnabled, UserError, f"cannot download {repo_id}: offline mode is on (HF_HUB_OFFLINE)",
         "unset HF_HUB_OFFLINE to download, or download it on a connected machine"),
    ]
    for kind, error, message, hint in known:
        if isinstance(exc, kind):
            return error(message, hint=hint)
    if isinstance(exc, HfHubHTTPError) and status in (401, 403):
        return UserError(f"access to {repo_id} was refused (HTTP {status})", hint=_licence_hint(repo_id, endpoint))
    if isinstance(exc, HfHubHTTPError):
        return DownloadError(
            f"the Hub answered HTTP {status} while downloading {what} from {repo_id}", hint=f"try again later; {_RESUME}"
        )
    net = _network_error(exc)
    if net is not None:
        detail = str(net).splitlines()[0] if str(net) else type(net).__name__
        return DownloadError(
            f"network error while downloading {what} from {endpoint}: {detail}",
            hint=f"check the connection and {_RESUME}",
        )
    if isinstance(exc, OSError) and exc.errno is not None:
        place = f" {exc.filename}" if exc.filename else ""
        return DownloadError(f"cannot write {what}:{place} {exc.strerror or exc}",
                             hint=f"fix the disk problem and {_RESUME}")
    if isinstance(exc, OSError):  # the client's own checks on the transfer (sizes, ETags)
        return DownloadError(f"the transfer of {what} failed: {str(exc).splitlines()[0]}", hint=_RESUME)
    return None


# --------------------------------------------------------------------------------------------------
# Remote file list and verification


@dataclass(frozen=True)
class RemoteFile:
    name: str
    size: int
    sha256: str | None  # LFS files
    blob_id: str | None  # git blob id (sha1) of regular files


def _remote_files(info: Any) -> list[RemoteFile]:
    files = []
    for s in info.siblings or []:
        lfs = s.lfs
        size = lfs.size if lfs else s.size
        files.append(RemoteFile(s.rfilename, int(size or 0), lfs.sha256 if lfs else None, s.blob_id))
    return files


def _digest(path: Path, h: Any) -> str:
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK_HASH):
            h.update(chunk)
    return h.hexdigest()


def _verify(path: Path, f: RemoteFile) -> str | None:
    """``None`` if ``path`` holds the content the Hub advertises for ``f``, else what differs."""
    size = path.stat().st_size
    if size != f.size:
        return f"size {size} instead of {f.size}"
    if f.sha256:
        got = _digest(path, hashlib.sha256())
        if got != f.sha256.lower():
            return f"sha256 {got[:12]}... instead of {f.sha256[:12]}..."
    elif f.blob_id and SHA1_RE.match(f.blob_id):
        h = hashlib.sha1()
        h.update(b"blob %d\0" % size)
        got = _digest(path, h)
        if got != f.blob_id:
            return f"git blob id {got[:12]}... instead of {f.blob_id[:12]}..."
    return None


def _discard(path: Path) -> None:
    """Delete a fetched file: in the cache the blob behind the snapshot link, and the link."""
    blob = path.resolve()
    blob.unlink(missing_ok=True)
    if path.is_symlink():
        path.unlink()


def _check_disk(target: Path, needed: int) -> None:
    probe = target
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if needed > free:
        raise UserError(
            f"not enough disk space in {probe}: the download needs {format_bytes(needed)} more, "
            f"only {format_bytes(free)} free",
            hint="free some space, or download elsewhere with --local-dir or HF_HUB_CACHE",
        )


# --------------------------------------------------------------------------------------------------
# The verb


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
        found = cached_snapshot(repo_id, revision, cache_dir) if local is None else complete_dir(local)
        if found is None:
            where = str(local) if local is not None else f"the Hugging Face cache ({cache_dir})"
            raise UserError(
                f"{repo_id} is not in {where} and HF_HUB_OFFLINE is set",
                hint="unset HF_HUB_OFFLINE to download it",
            )
        return found

    from huggingface_hub import HfApi, hf_hub_download

    tok = _token(token) or False
    api = HfApi(endpoint=endpoint, token=tok)
    current = "the file list"

    def fetch(name: str, **kw: Any) -> Any:
        where = {"local_dir": local} if local is not None else {"cache_dir": cache_dir}
        return hf_hub_download(repo_id, name, revision=commit, endpoint=endpoint, token=tok, **where, **kw)

    try:
        commit = revision
        if local is None:  # pins the revision and records refs/<revision> in the cache
            commit = api.resolve_revision(repo_id, revision=revision, cache_dir=cache_dir, token=tok).resolved
        info = api.model_info(repo_id, revision=commit, files_metadata=True)
        commit = info.sha
        if not commit:
            raise DownloadError(f"the Hub did not report a commit for {repo_id} at {revision or 'main'}")
        # Small files first: with the index in place, a half-downloaded snapshot is never mistaken for
        # a complete one (see ``hub.complete_dir``).
        remote = sorted(
            (f for f in _remote_files(info) if matches_wanted(f.name)),
            key=lambda f: (f.name.endswith(".safetensors"), f.name),
        )
        if not any(f.name.endswith(".safetensors") for f in remote):
            raise UserError(
                f"{repo_id} has no safetensors weights at revision {revision or 'main'}",
                hint="mixtral needs a repo in the Hugging Face safetensors layout (model-*.safetensors)",
            )
        todo = []
        for f in remote:
            current = f.name
            if fetch(f.name, dry_run=True).will_download:
                todo.append(f)
        _check_disk(local if local is not None else cache_dir, sum(f.size for f in todo))

        sink.begin([(f.name, f.size) for f in todo], sum(f.size for f in todo))
        try:
            for f in remote:
                current = f.name
                if f not in todo:
                    fetch(f.name)  # in place already (or a blob to link): no transfer
                    continue
                for attempt in (1, 2):
                    sink.file_begin(f.name, f.size)
                    path = Path(fetch(f.name, tqdm_class=_bar_class(sink, f.name), force_download=attempt > 1))
                    problem = _verify(path, f)
                    if problem is None:
                        break
                    _discard(path)
                    if attempt == 2:
                        raise DownloadError(
                            f"{f.name} from {repo_id} is corrupted after two attempts: {problem}",
                            hint="something between you and the Hub alters the data (proxy, disk); "
                                 "try again later or from another network",
                        )
                    sink.note(f"{f.name}: checksum mismatch ({problem}); fetching it again")
                sink.file_end(f.name)
        finally:
            sink.end()
    except Exception as exc:
        mapped = _map_error(exc, repo_id, revision, endpoint, current)
        if mapped is None or mapped is exc:
            raise
        raise mapped from exc
    return local if local is not None else repo_folder(repo_id, cache_dir) / "snapshots" / commit
