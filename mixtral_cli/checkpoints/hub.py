"""Find Mixtral checkpoints: the Hugging Face cache, repo ids and local directories.

``resolve_model`` maps a model spec (a directory or a repo id) to a local directory without touching
the network unless asked to download (``mixtral_cli.download`` does that). The cache is the one
``huggingface_hub`` reads and writes (``HF_HUB_CACHE`` / ``HF_HOME``): ``refs/<revision>`` names a
commit, ``snapshots/<commit>/`` holds the files of that commit.

Environment, read at call time: ``HF_ENDPOINT``, ``HF_TOKEN``, ``HF_HUB_OFFLINE``, ``HF_HUB_CACHE``,
``HF_HOME``, ``MIXTRAL_MODEL``.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
from pathlib import Path

from ..errors import UserError

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
SHA1_RE = re.compile(r"^[0-9a-f]{40}$")  # a git object id: a commit, or a regular file's blob id
_REPO_ID_RE = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


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


def repo_folder(repo_id: str, cache_dir: Path | None = None) -> Path:
    """The cache folder of a model repo: ``<cache>/models--org--name``."""
    return (cache_dir or hub_cache_dir()) / ("models--" + repo_id.replace("/", "--"))


def matches_wanted(name: str) -> bool:
    """Whether a repo file belongs to the checkpoint ``download`` fetches (top level only)."""
    if "/" in name or any(fnmatch.fnmatch(name, pat) for pat in EXCLUDED_PATTERNS):
        return False
    return any(fnmatch.fnmatch(name, pat) for pat in WANTED_PATTERNS)


# --------------------------------------------------------------------------------------------------
# Lookup


def complete_dir(path: Path) -> Path | None:
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


def cached_snapshot(repo_id: str, revision: str | None, cache_dir: Path | None = None) -> Path | None:
    """The complete cached snapshot of ``repo_id`` at ``revision`` (default: main, else newest)."""
    storage = repo_folder(repo_id, cache_dir)
    snapshots = storage / "snapshots"
    if not snapshots.is_dir():
        return None
    rev = revision or "main"
    commit = rev if SHA1_RE.match(rev) else None
    ref = storage / "refs" / rev
    if commit is None and ref.is_file():
        commit = ref.read_text().strip()
    if commit is not None:
        return complete_dir(snapshots / commit) if (snapshots / commit).is_dir() else None
    if revision is not None:
        return None
    candidates = sorted(
        (p for p in snapshots.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime, reverse=True
    )
    for snap in candidates:
        if complete_dir(snap) is not None:
            return snap
    return None


def _looks_like_path(spec: str) -> bool:
    return (
        spec.startswith((".", "/", "~"))
        or spec.count("/") > 1
        or os.sep in spec and os.sep != "/"
        or not _REPO_ID_RE.match(spec)
    )


class ModelNotDownloaded(UserError):
    """A Hub repo id with no complete snapshot in the cache; `repo_id` says which (the command line
    downloads it when the user passed --yes)."""

    def __init__(self, repo_id: str, message: str, hint: str) -> None:
        super().__init__(message, hint=hint)
        self.repo_id = repo_id


def resolve_model(spec: str | None, *, offer_yes: bool = True) -> Path:
    """Map a model spec to a local directory.

    ``spec`` is a directory, or a Hub repo id looked up in the HF cache. ``None`` means
    ``$MIXTRAL_MODEL``, else ``DEFAULT_REPO``. A repo id that is not cached raises
    ``ModelNotDownloaded``; ``offer_yes``: its hint mentions ``--yes`` (for commands that accept it).
    """
    spec = spec or os.environ.get("MIXTRAL_MODEL") or DEFAULT_REPO
    path = Path(spec).expanduser()
    if path.is_dir():
        return path.resolve()
    if path.exists():
        raise UserError(f"model path {spec} is a file, not a directory", hint="pass the checkpoint's directory")
    if _looks_like_path(spec):
        raise UserError(f"model directory {spec} does not exist", hint="pass an existing directory or a Hub repo id")

    found = cached_snapshot(spec, None)
    if found is not None:
        return found
    partly = repo_folder(spec).joinpath("snapshots").is_dir()
    state = "only partly downloaded" if partly else "not downloaded"
    hint = f"run: mixtral download {spec}" + ("  (or pass --yes)" if offer_yes else "")
    raise ModelNotDownloaded(spec, f"model {spec} is {state}", hint=hint)
