"""All terminal output: one console per stream, named styles, progress, streaming, the error line.

Generated text goes to stdout untouched (no colour or control codes when stdout is not a terminal);
everything meant for people (progress, stats, errors, the project's log records) goes to stderr so
pipes carry only the text.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.theme import Theme

from ..sizes import format_bytes, format_gb

if TYPE_CHECKING:
    from ..bench.result import BenchResult
    from ..engine.evaluate import DivergenceResult

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


def print_plain(text: str) -> None:
    """One line on stdout exactly as given (no rich processing): a path, a URL, the version, help."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def print_json(obj: Any) -> None:
    """Exactly one JSON object on stdout (no rich processing)."""
    print_plain(json.dumps(obj, ensure_ascii=False))


class _LogLines(logging.Handler):
    """The project's log records as one line each on stderr: `warning: ...` in the notice style,
    errors as the error line, lower levels dim."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
            if record.levelno >= logging.ERROR:
                error_line(message)
            elif record.levelno >= logging.WARNING:
                notice(f"warning: {message}")
            else:
                err.print(f"[stats]{_escape(f'{record.levelname.lower()}: {message}')}[/]")
        except Exception:  # noqa: BLE001 - logging's own rule: a broken handler must not raise
            self.handleError(record)


def setup_logging(debug: bool = False) -> None:
    """Send the records of the ``mixtral_cli`` loggers (``logging.getLogger(__name__)`` in the kernels
    and elsewhere) to stderr as one line each: warnings and worse, every level with ``debug``. The CLI
    calls it once per run; a second call replaces the first one's handler."""
    log = logging.getLogger("mixtral_cli")
    for handler in [h for h in log.handlers if isinstance(h, _LogLines)]:
        log.removeHandler(handler)
    log.addHandler(_LogLines())
    log.setLevel(logging.DEBUG if debug else logging.WARNING)


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


class _LiveProgress:
    """A rich progress display on stderr (shown only at a terminal); a context manager."""

    def __init__(self, console: Console | None, *columns: Any) -> None:
        self.console = console or err
        self._progress = Progress(*columns, console=self.console, transient=False,
                                  disable=not self.console.is_terminal)

    def __enter__(self) -> Any:
        self._progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._progress.stop()


class DownloadProgress(_LiveProgress):
    """Renders `download.download` progress on stderr: one bar per file in flight plus the total, with
    throughput and ETA. Implements `download.ProgressSink`; use as a context manager around the call.
    """

    def __init__(self, console: Console | None = None) -> None:
        from rich.progress import DownloadColumn, TimeRemainingColumn, TransferSpeedColumn

        super().__init__(console, TextColumn("[progress.description]{task.description}"), BarColumn(),
                         DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
        self._total: Any = None
        self._files: dict[str, Any] = {}
        self._count = 0
        self._done = 0

    def begin(self, files: Any, total_bytes: int) -> None:
        self._count = len(files)
        if not self._count:
            self.console.print("[stats]all files already downloaded[/]")
            return
        self._total = self._progress.add_task(f"total (0/{self._count} files)", total=total_bytes)

    def file_begin(self, name: str, size: int) -> None:
        task = self._files.get(name)
        if task is None:
            self._files[name] = self._progress.add_task(_escape(name), total=size)
        else:  # fetched again: roll the total back by what this file had counted
            before = self._progress.tasks[[t.id for t in self._progress.tasks].index(task)].completed
            if self._total is not None:
                self._progress.update(self._total, advance=-before)
            self._progress.update(task, completed=0)

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


class QuantizeProgress(_LiveProgress):
    """Renders `quantize.quantize_checkpoint` progress on stderr: one bar over the source bytes with
    tensors done, tensors/s, MB/s and ETA. Implements `quantize.QuantizeProgressSink`; use as a context
    manager around the call. Shows nothing when stderr is not a terminal.
    """

    def __init__(self, console: Console | None = None, description: str = "quantizing") -> None:
        from rich.progress import ProgressColumn, TimeRemainingColumn
        from rich.text import Text

        class _Rates(ProgressColumn):
            def render(self, task: Any) -> Text:
                elapsed = task.elapsed or 0.0
                if elapsed <= 0:
                    return Text("", style="progress.data.speed")
                tps = task.fields.get("tensors", 0) / elapsed
                mbps = task.completed / elapsed / 1e6
                return Text(f"{tps:.1f} tensors/s {mbps:.1f} MB/s", style="progress.data.speed")

        super().__init__(console, TextColumn("[progress.description]{task.description}"), BarColumn(),
                         TextColumn("{task.fields[tensors]}/{task.fields[ntensors]} tensors"), _Rates(),
                         TimeRemainingColumn(), TimeElapsedColumn())
        self._description = description
        self._task: Any = None
        self._tensors = 0

    def begin(self, tensors: int, total_bytes: int) -> None:
        self._task = self._progress.add_task(self._description, total=total_bytes, tensors=0, ntensors=tensors)

    def advance(self, name: str, nbytes: int) -> None:
        self._tensors += 1
        if self._task is not None:
            self._progress.update(self._task, advance=nbytes, tensors=self._tensors)

    def end(self) -> None:
        self._progress.refresh()


# -- chat screen ---------------------------------------------------------------------------------
def divergence_report(r: DivergenceResult) -> None:
    """`perplexity --kl-base`: the model against its base, as one table."""
    key_value_table(f"against the base, {r.tokens_scored} positions in {r.windows} windows", [
        ("KL divergence", f"{r.kl_divergence:.6f} ± {r.kl_divergence_uncertainty:.6f} nats "
                          f"(median {r.kl_divergence_median:.6f}, 99th percentile {r.kl_divergence_p99:.6f})"),
        ("top-1 agreement", f"{100 * r.top1_agreement:.2f}%"),
        ("perplexity", f"{r.perplexity:.4f} (base {r.base_perplexity:.4f})"),
        ("ppl ratio", f"{r.ppl_ratio:.5f} ± {r.ppl_ratio_uncertainty:.5f}"),
    ])


def chat_info(message: str) -> None:
    """A dim line for people during a chat (confirmations, hints): stderr, so pipes carry only replies."""
    err.print(f"[stats]{_escape(message)}[/]")


def chat_table(title: str, rows: Iterable[tuple[str, str]]) -> None:
    """A two-column table on stderr (/help, /stats, /set)."""
    table = Table(title=title, show_header=False, title_justify="left", box=None, pad_edge=False)
    table.add_column(style="key", no_wrap=True)
    table.add_column()
    for k, v in rows:
        table.add_row(_escape(k), _escape(v))
    err.print(table)


# -- bench -------------------------------------------------------------------------------------
def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _rate(x: float | None, unit: str = "") -> str:
    return "-" if x is None else f"{x:,.1f}{unit}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.0%}"


def _gb(x: float | None) -> str:
    return "-" if x is None else format_gb(x, digits=2)


def bench_report(r: BenchResult) -> None:
    """The `mixtral bench` result as tables on stdout (the same numbers as `--json`)."""
    cache, bw, bound, base = r.expert_cache, r.bandwidth, r.bound, r.baseline
    title = (f"{r.model} · {r.expert_format} experts · {r.device} {r.dtype} · {_plural(r.threads, 'thread')} · "
             f"{r.slots_per_layer} expert slots/layer{'' if r.prefetch else ' · no prefetch'}")
    table = Table(title=title, title_justify="left")
    table.add_column("metric", style="key", no_wrap=True)
    table.add_column("mixtral", justify="right")
    if base:
        table.add_column(f"transformers {base.info.version} ({base.info.dtype})", justify="right")
        table.add_column("ratio", justify="right")
    rows = [
        (f"prefill ({r.prompt_tokens} tokens)", _rate(r.prefill_tokens_per_s, " tok/s"),
         base and _rate(base.prefill_tokens_per_s, " tok/s"), base and f"{base.prefill_ratio:.2f}x"),
        ("time to first token", f"{r.time_to_first_token_s * 1e3:,.0f} ms",
         base and f"{base.time_to_first_token_s * 1e3:,.0f} ms", None),
        (f"decode ({r.gen_tokens} tokens)", _rate(r.decode_tokens_per_s, " tok/s"),
         base and _rate(base.decode_tokens_per_s, " tok/s"), base and f"{base.decode_ratio:.2f}x"),
    ]
    for name, ours, theirs, ratio in rows:
        table.add_row(name, ours, *((theirs or "", ratio or "") if base else ()))
    out.print(table)
    hybrid = bound.hybrid
    rows2 = [
        ("decode bound", f"{_rate(bound.decode_tokens_per_s, ' tok/s')} (achieved {bound.achieved_fraction:.0%}): "
                         f"{format_bytes(bound.weight_bytes_per_token)} read per token"
                         + (f" + {bound.misses_per_token:.2f} expert copies of {format_bytes(bound.expert_bytes)}"
                            if bound.misses_per_token else "")),
        *([("hybrid bound", f"copying every miss {_rate(hybrid.copy_only_tokens_per_s, ' tok/s')}, "
                            f"misses split with the CPU {_rate(hybrid.hybrid_tokens_per_s, ' tok/s')} "
                            f"(one expert: copy {hybrid.copy_expert_s * 1e3:.1f} ms, CPU "
                            f"{hybrid.cpu_expert_s * 1e3:.1f} ms; {hybrid.cpu_experts} computed "
                            f"on the CPU, --cpu-experts {hybrid.mode})")]
          if hybrid else []),
        ("memory read bandwidth", f"{_gb(bw.memory_read_bytes_per_s)}/s"),
        ("expert copy bandwidth", f"{_gb(bw.host_to_device_bytes_per_s)}/s ({bw.host_to_device_method})"),
        ("expert cache (decode)", f"hit rate {_pct(cache.hit_rate)}, {cache.misses} misses, "
                                  f"prefetch accuracy {_pct(cache.prefetch_accuracy)}, "
                                  f"{format_bytes(cache.bytes_to_device)} copied, {cache.stall_s * 1e3:.0f} ms stalled"),
        ("peak RAM (RSS)", format_bytes(r.peak_rss_bytes)),
        ("peak GPU memory", "-" if r.peak_gpu_bytes is None else format_bytes(r.peak_gpu_bytes)),
        ("load", f"{r.load_s:.1f} s"),
    ]
    if base:
        probes = ", ".join(f"{k} {v:.1f} tok/s" for k, v in base.info.probe_decode_tokens_per_s.items())
        rows2.append(("baseline", f"{base.info.weights}; dtype probe: {probes}"))
    key_value_table("", rows2)
    if r.note:
        notice(r.note)
    if r.sweep:
        sweep = Table(title="decode speed per expert slots per layer", title_justify="left")
        for col in ("slots", "tok/s", "bound tok/s", "hit rate", "misses/token", "prefetch accuracy", "copied"):
            sweep.add_column(col, justify="right")
        for row in r.sweep:
            sweep.add_row(str(row.slots_per_layer), _rate(row.decode_tokens_per_s),
                          _rate(row.bound_tokens_per_s), _pct(row.hit_rate), f"{row.misses_per_token:.2f}",
                          _pct(row.prefetch_accuracy), format_bytes(row.bytes_to_device))
        out.print(sweep)
        files = [r.sweep_csv] + ([r.sweep_png] if r.sweep_png else [])
        err.print(f"[stats]wrote {', '.join(files)}[/]")


def bench_progress(message: str) -> None:
    """A progress line of `mixtral bench` on stderr (terminals only: pipes and logs stay clean)."""
    if err.is_terminal:
        err.print(f"[stats]{_escape(message)}…[/]")


# -- serve -------------------------------------------------------------------------------------
def serve_banner(url: str, model: str, ctx: int, max_queue: int, keyed: bool) -> None:
    """`mixtral serve` is up: the base URL alone on stdout (for scripts), what is served on stderr."""
    print_plain(url)
    key = "API key required" if keyed else "no API key"
    err.print(f"[stats]serving {_escape(model)} ({ctx}-token context) on OpenAI's API at {url} · "
              f"up to {max_queue} requests wait while one generates · {key} · Ctrl-C stops[/]")


def server_log(message: str) -> None:
    """One time-stamped line of the server's log on stderr (a request, a warning, stopping)."""
    from time import strftime

    err.print(f"[stats]{strftime('%H:%M:%S')}[/] {_escape(message)}", overflow="ignore", crop=False)
