"""Output goes through the UI layer: the kernels log instead of printing, the CLI turns the project's log
records into one line each on stderr; and the small helpers several layers share have one definition."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mixtral_cli.cli import ui


@pytest.fixture
def project_log():
    """The `mixtral_cli` logger as `ui.setup_logging` leaves it, restored afterwards."""
    log = logging.getLogger("mixtral_cli")
    handlers, level = list(log.handlers), log.level
    yield log
    log.handlers[:] = handlers
    log.setLevel(level)


def test_log_records_are_one_line_each_on_stderr(project_log, capsys):
    ui.setup_logging()
    ui.setup_logging()  # a second call replaces the handler, so nothing is printed twice
    child = logging.getLogger("mixtral_cli.kernels.example")
    child.info("not shown without --debug")
    child.warning("slower path [%s]", "cpu")
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == "warning: slower path [cpu]\n"


def test_debug_shows_every_level(project_log, capsys):
    ui.setup_logging(debug=True)
    logging.getLogger("mixtral_cli.kernels.example").info("compiling")
    logging.getLogger("mixtral_cli.kernels.example").error("it broke")
    assert capsys.readouterr().err == "info: compiling\nerror: it broke\n"


def _native_without_compiler(tmp_path: Path, debug: bool) -> subprocess.CompletedProcess:
    """A fresh process whose C compiler fails: the native kernels' fallback, as the CLI shows it."""
    cc = tmp_path / "broken-cc"
    cc.write_text("#!/bin/sh\necho 'cc: fatal error: broken on purpose' >&2\nexit 1\n")
    cc.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "MIXTRAL_REQUIRE_NATIVE"}
    env |= {"CC": str(cc), "MIXTRAL_KERNEL_CACHE": str(tmp_path / "cache")}
    code = (f"from mixtral_cli.cli import ui; ui.setup_logging(debug={debug}); "
            "from mixtral_cli.kernels import native; assert not native.available()")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


def test_native_fallback_is_one_warning_line_not_a_print(tmp_path):
    proc = _native_without_compiler(tmp_path, debug=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    assert proc.stderr == (f"warning: native CPU kernels unavailable ({tmp_path / 'broken-cc'} failed: cc: fatal "
                           "error: broken on purpose); using slower torch paths\n")


def test_native_build_is_logged_at_info_level(tmp_path):
    proc = _native_without_compiler(tmp_path, debug=True)
    lines = proc.stderr.splitlines()
    assert len(lines) == 2 and lines[0].startswith("info: compiling the native CPU kernels with "), proc.stderr
    assert lines[1].startswith("warning: native CPU kernels unavailable")


def test_native_module_prints_nothing():
    from mixtral_cli.kernels import native

    source = Path(native.__file__).read_text()
    assert "print(" not in source and "sys.stderr" not in source


# -- one definition, called from every layer that needs it ----------------------------------------
def test_sync_and_peak_rss_have_one_home():
    from mixtral_cli.bench import measure
    from mixtral_cli.engine import generate
    from mixtral_cli.system import host_memory, timing

    assert generate.sync is timing.sync and measure.sync is timing.sync
    assert measure.peak_rss_bytes is host_memory.peak_rss_bytes


def test_peak_rss_is_bytes():
    from mixtral_cli.cli.actions import peak_memory_bytes
    from mixtral_cli.system.host_memory import peak_rss_bytes

    rss = peak_rss_bytes()
    assert 10 * 2**20 < rss < 2**40  # this process holds at least torch, in bytes rather than KiB
    assert peak_memory_bytes(torch.device("cpu")) >= rss


def test_best_time_warms_up_and_waits_for_the_device(monkeypatch):
    from mixtral_cli.system import timing

    calls, synced = [], []
    monkeypatch.setattr(timing, "sync", lambda device: synced.append(device))
    t = timing.best_time(lambda: calls.append(1), torch.device("cpu"), reps=4)
    assert len(calls) == 5 and len(synced) == 5  # one warm-up, four timed
    assert 0 <= t < 1
    synced.clear()
    timing.best_time(lambda: None)
    assert synced == []  # no device: nothing to wait for


def test_repo_id_and_sha_pattern_have_one_home():
    import inspect

    from mixtral_cli.checkpoints import download, hub
    from mixtral_cli.cli import app

    assert download.SHA1_RE is hub.SHA1_RE
    assert hub.SHA1_RE.match("a" * 40) and not hub.SHA1_RE.match("main")
    for fn in (app.download, download.download):  # the same object, not an equal copy of the literal
        assert inspect.signature(fn).parameters["repo_id"].default is hub.DEFAULT_REPO
    assert app.DEFAULT_MODEL_HELP.endswith(f"else {hub.DEFAULT_REPO}]")


def test_gigabytes_formatted_in_one_place():
    from mixtral_cli.sizes import format_gb

    assert format_gb(23.64e9) == "23.6 GB"
    assert format_gb(23.64e9, digits=2) == ui._gb(23.64e9) == "23.64 GB"
    assert ui._gb(None) == "-"


def test_plain_lines_are_written_as_given(capsys):
    ui.print_plain("/tmp/[bold]model[/]")
    ui.print_json({"a": "[b]"})
    assert capsys.readouterr().out == '/tmp/[bold]model[/]\n{"a": "[b]"}\n'
