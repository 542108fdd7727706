"""Download and model resolution against a local Hub look-alike, with the real huggingface_hub client."""

from __future__ import annotations

import collections
import hashlib
import json
import os
import signal
import socket
from pathlib import Path

import huggingface_hub
import pytest
from hub_server import FakeHub
from huggingface_hub import constants as hf_constants

from mixtral_cli.checkpoints import download as dl
from mixtral_cli.checkpoints import hub
from mixtral_cli.errors import UserError

REPO = "acme/tiny-mixtral"
SHARDS = [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
SHARD_SIZE = 48_000


def make_files(seed: int = 0) -> dict[str, bytes]:
    rnd = __import__("random").Random(seed)
    files = {name: rnd.randbytes(SHARD_SIZE) for name in SHARDS}
    weight_map = {f"model.layers.{i}.w": SHARDS[i % 3] for i in range(6)}
    files["model.safetensors.index.json"] = json.dumps(
        {"metadata": {"total_size": 3 * SHARD_SIZE}, "weight_map": weight_map}
    ).encode()
    files["config.json"] = json.dumps({"model_type": "mixtral", "seed": seed}).encode()
    files["generation_config.json"] = b'{"bos_token_id": 1, "eos_token_id": 2}'
    files["tokenizer.model"] = rnd.randbytes(5_000)
    files["consolidated.00.pt"] = rnd.randbytes(30_000)
    files["pytorch_model.bin"] = rnd.randbytes(1_000)
    files["README.md"] = b"# tiny\n"
    return files


WANTED = sorted(
    SHARDS + ["model.safetensors.index.json", "config.json", "generation_config.json", "tokenizer.model"]
)


class Recorder:
    """A ProgressSink that records what it is told."""

    def __init__(self, interrupt: tuple[str, int] | None = None, *, kill: bool = False) -> None:
        self.events: list[tuple] = []
        self.bytes: collections.Counter[str] = collections.Counter()
        self.interrupt = interrupt  # (file, bytes): stop there with Ctrl-C, or with SIGKILL when ``kill``
        self.kill = kill

    def begin(self, files, total_bytes):
        self.events.append(("begin", [n for n, _ in files], total_bytes))

    def file_begin(self, name, size):
        self.events.append(("file_begin", name, size))

    def advance(self, name, nbytes):
        self.bytes[name] += nbytes
        if self.interrupt and name == self.interrupt[0] and self.bytes[name] >= self.interrupt[1]:
            if self.kill:
                os.kill(os.getpid(), signal.SIGKILL)
            raise KeyboardInterrupt

    def file_end(self, name):
        self.events.append(("file_end", name))

    def note(self, text):
        self.events.append(("note", text))

    def end(self):
        self.events.append(("end",))

    def of(self, kind):
        return [e for e in self.events if e[0] == kind]


@pytest.fixture(autouse=True)
def hf_env(tmp_path, monkeypatch):
    """A private HF home/cache per test, no token, online, small download chunks."""
    home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(home / "hub"))
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "MIXTRAL_MODEL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(hf_constants, "HF_HOME", str(home))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(hf_constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(hf_constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    # Real shards are written in 10 MB chunks; scale the chunk down with the files.
    monkeypatch.setattr(hf_constants, "DOWNLOAD_CHUNK_SIZE", 4096)
    return home / "hub"


@pytest.fixture
def fake_hub(monkeypatch):
    with FakeHub() as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        yield server


def snapshot_dir(cache: Path, sha: str) -> Path:
    return cache / ("models--" + REPO.replace("/", "--")) / "snapshots" / sha


def assert_files(directory: Path, files: dict[str, bytes]) -> None:
    assert sorted(p.name for p in directory.iterdir() if not p.name.startswith(".")) == WANTED
    for name in WANTED:
        assert (directory / name).read_bytes() == files[name], name


def fetched_names(server: FakeHub) -> set[str]:
    names = set()
    for name in make_files():
        if server.requests_for(name):
            names.add(name)
    return names


# ---- full download ----------------------------------------------------------------------------


def test_full_download_into_cache(fake_hub, hf_env):
    files = make_files()
    sha = fake_hub.add_repo(REPO, files)
    rec = Recorder()

    path = dl.download(REPO, progress=rec)

    assert path == snapshot_dir(hf_env, sha)
    assert_files(path, files)
    # HF cache layout: blobs named by sha256 (LFS) / git blob id, snapshot entries are links to them.
    shard = path / SHARDS[0]
    assert shard.is_symlink()
    assert shard.resolve().name == hashlib.sha256(files[SHARDS[0]]).hexdigest()
    assert (path.parent.parent / "refs" / "main").read_text() == sha
    # never asked for the pickles, the .bin or anything else outside the checkpoint
    assert fetched_names(fake_hub) == set(WANTED)
    assert not fake_hub.requests_for("consolidated.00.pt")
    assert not fake_hub.requests_for("pytorch_model.bin")
    # one progress session covering every wanted file
    (begin,) = rec.of("begin")
    assert sorted(begin[1]) == WANTED
    assert begin[2] == sum(len(files[n]) for n in WANTED)
    assert sorted(e[1] for e in rec.of("file_end")) == WANTED
    assert sum(rec.bytes.values()) == begin[2]
    assert rec.events[-1] == ("end",)
    # no partial files left behind
    assert not list(hf_env.rglob("*.incomplete"))


def test_second_download_fetches_nothing(fake_hub, hf_env):
    files = make_files()
    fake_hub.add_repo(REPO, files)
    first = dl.download(REPO)
    n = len(fake_hub.requests)
    rec = Recorder()
    assert dl.download(REPO, progress=rec) == first
    new = fake_hub.requests[n:]
    # the revision and the file list: no file is asked for, not even with HEAD
    assert new and all(r.path.startswith(f"/api/models/{REPO}") for r in new), [r.path for r in new]
    assert rec.of("begin")[0][1] == []


def test_cache_is_the_one_huggingface_hub_reads_and_writes(fake_hub, hf_env):
    files = make_files()
    sha = fake_hub.add_repo(REPO, files)
    # a file fetched by huggingface_hub itself (HEAD + 302 to the CDN) is reused, not fetched again
    own = huggingface_hub.hf_hub_download(REPO, SHARDS[1], cache_dir=hf_env, endpoint=fake_hub.url)
    assert Path(own).read_bytes() == files[SHARDS[1]]
    n_before = len(fake_hub.requests_for(SHARDS[1], "GET"))

    path = dl.download(REPO)

    assert len(fake_hub.requests_for(SHARDS[1], "GET")) == n_before
    assert_files(path, files)
    # and huggingface_hub finds our files offline
    cached = huggingface_hub.try_to_load_from_cache(REPO, "config.json", cache_dir=hf_env)
    assert cached == str(path / "config.json")
    assert Path(huggingface_hub.snapshot_download(REPO, cache_dir=hf_env, local_files_only=True)) == path
    assert sha in str(path)


def test_local_dir(fake_hub, hf_env, tmp_path):
    files = make_files()
    fake_hub.add_repo(REPO, files)
    out = tmp_path / "weights"

    assert dl.download(REPO, local_dir=out) == out.resolve()

    assert_files(out, files)
    assert not any(p.is_symlink() for p in out.iterdir())
    assert not (hf_env / "models--acme--tiny-mixtral").exists()
    n = len(fake_hub.requests)
    dl.download(REPO, local_dir=out)
    assert all("/api/models/" in r.path for r in fake_hub.requests[n:])
    # huggingface_hub's own local-dir metadata is written, so it does not fetch them again either
    huggingface_hub.hf_hub_download(REPO, SHARDS[0], local_dir=out, endpoint=fake_hub.url)
    assert not [r for r in fake_hub.requests[n:] if r.method == "GET" and r.server == "cdn"]


# ---- revisions -------------------------------------------------------------------------------


def test_branch_is_pinned_to_its_commit(fake_hub, hf_env):
    main_files = make_files(0)
    dev_files = make_files(1)
    main_sha = fake_hub.add_repo(REPO, main_files)
    dev_sha = fake_hub.add_commit(REPO, dev_files, ref="dev")
    assert main_sha != dev_sha

    path = dl.download(REPO, revision="dev")

    assert path == snapshot_dir(hf_env, dev_sha)
    assert_files(path, dev_files)
    assert (path.parent.parent / "refs" / "dev").read_text() == dev_sha
    file_requests = [r for r in fake_hub.requests if r.server == "hub" and "/resolve/" in r.path]
    assert file_requests and all(f"/resolve/{dev_sha}/" in r.path for r in file_requests)
    # a commit sha works as a revision too, and writes no ref
    assert dl.download(REPO, revision=main_sha) == snapshot_dir(hf_env, main_sha)
    assert not (path.parent.parent / "refs" / main_sha).exists()


def test_missing_revision(fake_hub):
    fake_hub.add_repo(REPO, make_files())
    with pytest.raises(UserError) as err:
        dl.download(REPO, revision="v9")
    assert "revision 'v9' does not exist" in err.value.message
    assert "--revision" in err.value.hint
    assert err.value.exit_code == 2


def test_missing_repo(fake_hub):
    with pytest.raises(UserError) as err:
        dl.download("acme/nope")
    assert "acme/nope" in err.value.message and "not found" in err.value.message
    assert "HF_TOKEN" in err.value.hint


def test_repo_without_safetensors(fake_hub):
    fake_hub.add_repo(REPO, {"config.json": b"{}", "consolidated.00.pt": b"x" * 100})
    with pytest.raises(UserError, match="no safetensors"):
        dl.download(REPO)
    assert not fake_hub.requests_for("consolidated.00.pt")


# ---- gated repos -----------------------------------------------------------------------------


@pytest.mark.parametrize("token", [None, "hf_not_granted"])
def test_gated_repo_explains_licence_and_token(fake_hub, hf_env, token):
    fake_hub.add_repo(REPO, make_files(), gated=True, granted_tokens=("hf_granted",))
    with pytest.raises(UserError) as err:
        dl.download(REPO, token=token)
    assert "gated" in err.value.message
    hint = err.value.hint
    assert "accept the licence" in hint and f"{fake_hub.url}/{REPO}" in hint
    assert "--token" in hint and "HF_TOKEN" in hint
    assert err.value.exit_code == 2
    assert "\n" not in str(err.value)
    refused = [r.status for r in fake_hub.requests if "/resolve/" in r.path]
    assert refused == [401 if token is None else 403]  # refused at the first file, nothing after it


def test_gated_repo_with_granted_token(fake_hub, hf_env, monkeypatch):
    files = make_files()
    fake_hub.add_repo(REPO, files, gated=True, granted_tokens=("hf_granted",))
    assert_files(dl.download(REPO, token="hf_granted"), files)
    # the token is not sent to the CDN the Hub redirects to
    cdn = [r for r in fake_hub.requests if r.server == "cdn"]
    assert cdn and not any("authorization" in r.headers for r in cdn)
    hub_file_requests = [r for r in fake_hub.requests if "/resolve/" in r.path]
    assert all(r.headers.get("authorization") == "Bearer hf_granted" for r in hub_file_requests)


def test_token_from_environment(fake_hub, hf_env, monkeypatch):
    files = make_files()
    fake_hub.add_repo(REPO, files, gated=True, granted_tokens=("hf_env_token",))
    monkeypatch.setenv("HF_TOKEN", "hf_env_token")
    assert_files(dl.download(REPO), files)


# ---- interruption and resume -------------------------------------------------------------------


def destination(layout: str, cache: Path, tmp_path: Path, sha: str) -> tuple[dict, Path]:
    """``download``'s keyword arguments for ``layout`` and the directory the files land in."""
    if layout == "local-dir":
        return {"local_dir": tmp_path / "weights"}, tmp_path / "weights"
    return {}, snapshot_dir(cache, sha)


def partial_files(root: Path) -> list[Path]:
    """The client's temporary files: in the cache's blobs, or under ``<local_dir>/.cache/huggingface``."""
    return [p for p in root.rglob("*") if ".incomplete" in p.name]


def in_killed_process(run) -> None:
    """Run ``run()`` in a child process that must die of SIGKILL (no ``finally`` runs there)."""
    pid = os.fork()
    if pid == 0:
        try:
            run()
        finally:
            os._exit(1)  # reached only when the kill did not happen
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status


@pytest.mark.parametrize("layout", ["cache", "local-dir"])
def test_interrupted_download_keeps_completed_files(fake_hub, hf_env, tmp_path, layout):
    """Ctrl-C mid-file keeps the completed files; the client deletes its partial file on the way out,
    so the file in flight is fetched whole on the next run (huggingface_hub resumes within a run only)."""
    files = make_files()
    sha = fake_hub.add_repo(REPO, files)
    where, directory = destination(layout, hf_env, tmp_path, sha)
    target = SHARDS[1]

    with pytest.raises(KeyboardInterrupt):
        dl.download(REPO, progress=Recorder(interrupt=(target, 20_000)), **where)

    done = [n for n in WANTED if (directory / n).exists()]
    assert SHARDS[0] in done and target not in done and SHARDS[2] not in done
    assert hub.complete_dir(directory) is None  # never taken for a complete checkpoint
    assert not partial_files(tmp_path)
    gets_before = {n: len(fake_hub.requests_for(n, "GET")) for n in WANTED}

    rec = Recorder()
    path = dl.download(REPO, progress=rec, **where)

    assert path == directory
    assert_files(path, files)
    fetched_again = {n for n in WANTED if len(fake_hub.requests_for(n, "GET")) > gets_before[n]}
    assert fetched_again == {target, SHARDS[2]}
    assert all(r.range is None for r in fake_hub.requests_for(target, "GET")[gets_before[target]:])
    assert rec.of("begin")[0][1:] == ([target, SHARDS[2]], 2 * SHARD_SIZE)
    assert rec.bytes == {target: SHARD_SIZE, SHARDS[2]: SHARD_SIZE}


@pytest.mark.skipif(not hasattr(os, "fork"), reason="kills a download process mid-file")
@pytest.mark.parametrize("layout", ["cache", "local-dir"])
def test_killed_download_fetches_the_file_in_flight_whole(fake_hub, hf_env, tmp_path, layout):
    """A killed process leaves the client's partial file behind. It is never taken for the file, and no
    later run reads it (huggingface_hub >= 1.18 names each transfer's file anew): the next run fetches
    the file whole, and the disk check and the progress count it whole. Should a client resume from it
    again, this fails: then the docs and the progress (the client's ``initial`` bytes) need updating."""
    files = make_files()
    sha = fake_hub.add_repo(REPO, files)
    where, directory = destination(layout, hf_env, tmp_path, sha)
    target = SHARDS[1]

    in_killed_process(lambda: dl.download(REPO, progress=Recorder(interrupt=(target, 20_000), kill=True), **where))

    (orphan,) = partial_files(tmp_path)
    assert 0 < orphan.stat().st_size < SHARD_SIZE
    assert not (directory / target).exists() and hub.complete_dir(directory) is None
    gets_before = len(fake_hub.requests_for(target, "GET"))

    rec = Recorder()
    assert_files(dl.download(REPO, progress=rec, **where), files)

    (get,) = [r for r in fake_hub.requests_for(target, "GET")[gets_before:] if r.server == "cdn"]
    assert get.range is None and get.status == 200
    assert rec.of("begin")[0][1:] == ([target, SHARDS[2]], 2 * SHARD_SIZE)
    assert rec.bytes == {target: SHARD_SIZE, SHARDS[2]: SHARD_SIZE}


def test_connection_cut_mid_file_is_resumed(fake_hub, hf_env):
    files = make_files()
    fake_hub.add_repo(REPO, files)
    fake_hub.cut_after(SHARDS[2], 12_288)
    rec = Recorder()

    path = dl.download(REPO, progress=rec)

    assert (path / SHARDS[2]).read_bytes() == files[SHARDS[2]]
    gets = [r for r in fake_hub.requests_for(SHARDS[2], "GET") if r.server == "cdn"]
    assert len(gets) == 2 and gets[0].range is None
    # the second request asks for the rest only, from where the cut stopped
    start = int(gets[1].range.removeprefix("bytes=").removesuffix("-"))
    assert 0 < start <= 12_288 and gets[1].status == 206
    assert rec.bytes[SHARDS[2]] == SHARD_SIZE


def test_resume_when_the_server_ignores_range(fake_hub, hf_env):
    files = make_files()
    fake_hub.add_repo(REPO, files)
    fake_hub.cut_after(SHARDS[0], 12_288)
    fake_hub.ignore_range = True
    rec = Recorder()

    path = dl.download(REPO, progress=rec)

    assert (path / SHARDS[0]).read_bytes() == files[SHARDS[0]]
    last = [r for r in fake_hub.requests_for(SHARDS[0], "GET") if r.server == "cdn"][-1]
    assert last.range and last.status == 200  # asked to resume, got the whole file, started over
    assert rec.bytes[SHARDS[0]] == SHARD_SIZE  # the bytes counted before the restart were taken back


def test_network_failure_is_one_line_runtime_error(fake_hub, monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    with pytest.raises(dl.DownloadError) as err:
        dl.download(REPO)
    assert err.value.exit_code == 1
    assert "network error" in err.value.message and "\n" not in str(err.value)
    assert "completed files are kept" in err.value.hint


# ---- integrity ---------------------------------------------------------------------------------


def test_corrupted_transfer_is_fetched_again_once(fake_hub, hf_env):
    files = make_files()
    fake_hub.add_repo(REPO, files)
    fake_hub.corrupt_file(SHARDS[0], times=1)
    rec = Recorder()

    path = dl.download(REPO, progress=rec)

    assert (path / SHARDS[0]).read_bytes() == files[SHARDS[0]]
    cdn_gets = [r for r in fake_hub.requests_for(SHARDS[0], "GET") if r.server == "cdn"]
    assert len(cdn_gets) == 2 and cdn_gets[1].range is None
    notes = [e[1] for e in rec.of("note")]
    assert len(notes) == 1 and SHARDS[0] in notes[0] and "mismatch" in notes[0]
    assert [e for e in rec.of("file_begin") if e[1] == SHARDS[0]] == [
        ("file_begin", SHARDS[0], SHARD_SIZE),
        ("file_begin", SHARDS[0], SHARD_SIZE),
    ]
    assert rec.bytes[SHARDS[0]] == 2 * SHARD_SIZE


def test_corrupted_transfer_into_local_dir_is_fetched_again(fake_hub, hf_env, tmp_path):
    files = make_files()
    fake_hub.add_repo(REPO, files)
    fake_hub.corrupt_file(SHARDS[1], times=1)
    out = tmp_path / "weights"

    assert_files(dl.download(REPO, local_dir=out), files)
    assert len([r for r in fake_hub.requests_for(SHARDS[1], "GET") if r.server == "cdn"]) == 2


def test_persistently_corrupted_transfer_fails_clearly(fake_hub, hf_env):
    files = make_files()
    sha = fake_hub.add_repo(REPO, files)
    fake_hub.corrupt_file(SHARDS[0], times=-1)

    with pytest.raises(dl.DownloadError) as err:
        dl.download(REPO)

    assert SHARDS[0] in err.value.message and "corrupted" in err.value.message
    assert "sha256" in err.value.message
    assert len([r for r in fake_hub.requests_for(SHARDS[0], "GET") if r.server == "cdn"]) == 2
    assert not (snapshot_dir(hf_env, sha) / SHARDS[0]).exists()
    assert not list(hf_env.rglob("*.incomplete"))


def test_corrupted_regular_file_is_detected(fake_hub, hf_env):
    files = make_files()
    fake_hub.add_repo(REPO, files)
    fake_hub.corrupt_file("config.json", times=-1)
    with pytest.raises(dl.DownloadError, match="config.json"):
        dl.download(REPO)


# ---- disk space --------------------------------------------------------------------------------


def test_insufficient_disk_is_refused_before_downloading(fake_hub, hf_env, monkeypatch):
    files = make_files()
    fake_hub.add_repo(REPO, files)
    usage = collections.namedtuple("usage", "total used free")
    seen = []

    def tiny_disk(path):
        seen.append(Path(path))
        return usage(10**6, 10**6 - 1000, 1000)

    monkeypatch.setattr(dl.shutil, "disk_usage", tiny_disk)
    with pytest.raises(UserError) as err:
        dl.download(REPO)

    # 3 shards of 48,000 + tokenizer 5,000 + index 388 + config 36 + generation config 38 = 149,462 bytes
    assert sum(len(files[n]) for n in WANTED) == 149_462
    assert "not enough disk space" in err.value.message
    assert "needs 145.96 KiB more, only 1000 B free" in err.value.message
    assert seen and hf_env.is_relative_to(seen[0])  # the cache, or its nearest existing parent
    # asked for sizes only (HEAD), never for a file's content
    assert not [r for r in fake_hub.requests if r.method == "GET" and ("/resolve/" in r.path or r.server == "cdn")]


def test_disk_check_counts_only_what_is_left(fake_hub, hf_env, monkeypatch):
    files = make_files()
    fake_hub.add_repo(REPO, files)
    dl.download(REPO)  # everything is there now
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(dl.shutil, "disk_usage", lambda p: usage(1, 1, 0))
    dl.download(REPO)  # nothing left to fetch: no refusal


# ---- offline -----------------------------------------------------------------------------------


def test_offline_uses_only_the_cache(fake_hub, hf_env, monkeypatch):
    files = make_files()
    fake_hub.add_repo(REPO, files)
    path = dl.download(REPO)
    n = len(fake_hub.requests)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    assert dl.download(REPO) == path
    assert hub.resolve_model(REPO) == path
    assert len(fake_hub.requests) == n

    with pytest.raises(UserError) as err:
        dl.download("acme/other")
    assert "HF_HUB_OFFLINE" in err.value.message
    assert len(fake_hub.requests) == n


# ---- resolve_model ---------------------------------------------------------------------------


def test_resolve_local_directory(tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    assert hub.resolve_model(str(d)) == d.resolve()
    with pytest.raises(UserError, match="does not exist"):
        hub.resolve_model(str(tmp_path / "missing"))
    (tmp_path / "f").write_text("x")
    with pytest.raises(UserError, match="not a directory"):
        hub.resolve_model(str(tmp_path / "f"))


def test_resolve_cached_repo_id(fake_hub, hf_env, monkeypatch):
    files = make_files()
    fake_hub.add_repo(REPO, files)
    path = dl.download(REPO)
    n = len(fake_hub.requests)
    assert hub.resolve_model(REPO) == path
    monkeypatch.setenv("MIXTRAL_MODEL", REPO)
    assert hub.resolve_model(None) == path
    assert len(fake_hub.requests) == n  # no network


def test_resolve_missing_repo_id(fake_hub, hf_env):
    with pytest.raises(UserError) as err:
        hub.resolve_model("acme/not-here")
    assert err.value.message == "model acme/not-here is not downloaded"
    assert "mixtral download acme/not-here" in err.value.hint
    assert not fake_hub.requests


def test_resolve_default_is_the_instruct_model(hf_env):
    with pytest.raises(UserError) as err:
        hub.resolve_model(None)
    assert hub.DEFAULT_REPO in err.value.message
    assert f"mixtral download {hub.DEFAULT_REPO}" in err.value.hint


def test_resolve_partly_downloaded_repo(fake_hub, hf_env):
    files = make_files()
    sha = fake_hub.add_repo(REPO, files)
    with pytest.raises(KeyboardInterrupt):
        dl.download(REPO, progress=Recorder(interrupt=(SHARDS[2], 1)))
    assert snapshot_dir(hf_env, sha).is_dir()
    with pytest.raises(UserError, match="only partly downloaded"):
        hub.resolve_model(REPO)


def test_resolve_names_the_missing_repo_for_the_cli_to_download(fake_hub, hf_env):
    files = make_files()
    sha = fake_hub.add_repo(REPO, files)
    with pytest.raises(hub.ModelNotDownloaded, match="not downloaded") as e:
        hub.resolve_model(REPO)
    assert e.value.repo_id == REPO and "--yes" in e.value.hint
    path = dl.download(e.value.repo_id)
    assert path == snapshot_dir(hf_env, sha) and hub.resolve_model(REPO) == path
    assert_files(path, files)


def test_wanted_patterns():
    assert hub.matches_wanted("model-00001-of-00019.safetensors")
    for name in ("model.safetensors.index.json", "config.json", "generation_config.json", "tokenizer.model"):
        assert hub.matches_wanted(name)
    for name in ("consolidated.00.pt", "pytorch_model-00001-of-00019.bin", "README.md", "original/x.safetensors",
                 "consolidated.safetensors", "consolidated-00001-of-00002.safetensors", "tokenizer.json",
                 ".gitattributes"):
        assert not hub.matches_wanted(name), name


def test_download_progress_renderer():
    from rich.console import Console

    from mixtral_cli.cli.ui import DownloadProgress

    console = Console(file=open(os.devnull, "w"), force_terminal=True, width=100)
    with DownloadProgress(console) as p:
        p.begin([("a", 10), ("b", 5)], 15)
        p.file_begin("a", 10)
        p.advance("a", 7)
        p.advance("a", -4)  # a resume the server refused: counted again from the start
        p.advance("a", 7)
        p.file_end("a")
        p.file_begin("b", 5)
        p.advance("b", 2)
        p.note("b: checksum mismatch; fetching it again")
        p.file_begin("b", 5)
        p.advance("b", 5)
        p.file_end("b")
        p.end()
        total = p._progress.tasks[0]
        assert total.completed == 15 and total.total == 15
