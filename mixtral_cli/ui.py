"""All terminal output: one console per stream, named styles, progress, streaming, the error line.

Generated text goes to stdout untouched (no colour or control codes when stdout is not a terminal);
everything meant for people (progress, stats, errors) goes to stderr so pipes carry only the text.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.theme import Theme

THEME = Theme({"error": "bold red", "hint": "dim", "stats": "dim", "key": "cyan", "notice": "yellow"})

out = Console(theme=THEME, highlight=False, soft_wrap=True)
err = Console(theme=THEME, stderr=True, highlight=False, soft_wrap=True)


def error_line(message: str, hint: str | None = None) -> None:
    """One line on stderr: `error: what is wrong (what to do)`."""
    text = f"[error]error:[/] {_escape(message)}"
    if hint:
        text += f" [hint]({_escape(hint)})[/]"
    err.print(text, overflow="ignore", crop=False)


def notice(message: str) -> None:
    err.print(f"[notice]{_escape(message)}[/]")


def _escape(s: str) -> str:
    return s.replace("[", r"\[")


def print_json(obj: Any) -> None:
    """Exactly one JSON object on stdout (no rich processing)."""
    sys.stdout.write(json.dumps(obj, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def stream(pieces: Iterable[str]) -> Iterator[str]:
    """Write text pieces to stdout as they arrive (plain writes: safe for pipes)."""
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
        yield piece


def end_stream(text: str) -> None:
    if not text.endswith("\n"):
        sys.stdout.write("\n")
    sys.stdout.flush()


@contextmanager
def load_progress(description: str = "loading model"):
    """A transient progress bar on stderr; yields `update(done, total)`."""
    progress = Progress(
        TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), console=err, transient=True, disable=not err.is_terminal,
    )
    with progress:
        task = progress.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        yield update


def stats_line(prefill_tps: float, decode_tps: float, tokens: int, hit_rate: float | None) -> None:
    parts = [f"prompt {prefill_tps:.1f} tok/s", f"gen {decode_tps:.1f} tok/s", f"{tokens} tokens"]
    if hit_rate is not None:
        parts.append(f"experts hit {hit_rate:.0%}")
    err.print(f"[stats]{' · '.join(parts)}[/]")


def key_value_table(title: str, rows: Iterable[tuple[str, str]]) -> None:
    table = Table(title=title, show_header=False, title_justify="left", box=None, pad_edge=False)
    table.add_column(style="key")
    table.add_column()
    for k, v in rows:
        table.add_row(k, v)
    out.print(table)


class DownloadProgress:
    """Renders `hub.download` progress on stderr: one bar per file in flight plus the total, with
    throughput and ETA. Implements `hub.ProgressSink`; use as a context manager around the call.
    """

    def __init__(self, console: Console | None = None) -> None:
        from rich.progress import DownloadColumn, TimeRemainingColumn, TransferSpeedColumn

        self.console = console or err
        self._progress = Progress(
            TextColumn("[progress.description]{task.description}"), BarColumn(), DownloadColumn(),
            TransferSpeedColumn(), TimeRemainingColumn(), console=self.console, transient=False,
            disable=not self.console.is_terminal,
        )
        self._total: Any = None
        self._files: dict[str, Any] = {}
        self._count = 0
        self._done = 0

    def __enter__(self) -> DownloadProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._progress.stop()

    def begin(self, files: Any, total_bytes: int, done_bytes: int) -> None:
        self._count = len(files)
        if not self._count:
            self.console.print("[stats]all files already downloaded[/]")
            return
        self._total = self._progress.add_task(
            f"total (0/{self._count} files)", total=total_bytes, completed=done_bytes
        )

    def file_begin(self, name: str, size: int, offset: int) -> None:
        task = self._files.get(name)
        if task is None:
            self._files[name] = self._progress.add_task(_escape(name), total=size, completed=offset)
        else:  # fetched again: roll the total back by what this file had counted
            before = self._progress.tasks[[t.id for t in self._progress.tasks].index(task)].completed
            if self._total is not None:
                self._progress.update(self._total, advance=offset - before)
            self._progress.update(task, completed=offset)

    def advance(self, name: str, nbytes: int) -> None:
        task = self._files.get(name)
        if task is not None:
            self._progress.update(task, advance=nbytes)
        if self._total is not None:
            self._progress.update(self._total, advance=nbytes)

    def file_end(self, name: str) -> None:
        task = self._files.pop(name, None)
        if task is not None:
            self._progress.remove_task(task)
        self._done += 1
        if self._total is not None:
            self._progress.update(self._total, description=f"total ({self._done}/{self._count} files)")

    def note(self, text: str) -> None:
        self._progress.console.print(f"[notice]{_escape(text)}[/]")

    def end(self) -> None:
        self._progress.refresh()
