"""Routing traces (`run`, `chat`, `bench --trace FILE`): which experts each layer picked for every
token the model computed, prefill and decode, in the order the engine ran them.

A trace is UTF-8 JSON lines (docs/format.md, "Routing traces", has the same description):

- line 1, the header: ``{"format": "mixtral-routing-trace", "version": 1, "model": NAME,
  "num_layers": L, "num_experts": E, "top_k": A}``;
- one line per forward pass, as it completes: ``{"phase": "prefill"|"decode", "pos": P,
  "tokens": [T ids], "experts": [T][L][A]}``: the pass's tokens at positions P..P+T, and for each
  token and layer the expert ids its router picked, highest weight first;
- the end record, written when recording stops: ``{"end": {"passes": N, "tokens": M}}``.

A pass is one call of the model: a prefill chunk or one decode step. Each line is written and flushed
when its pass has completed, so a killed run leaves whole lines and no end record: `read_trace`
refuses such a file as truncated instead of taking it for a whole run. A pass interrupted before it
completed (Ctrl-C in chat) is not written: its tokens did not reach the KV cache either.

Plain Python, no torch: `mixtral experts` reads traces without loading it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import UserError

if TYPE_CHECKING:
    from ..checkpoints.config import ModelArgs
    from .model import Mixtral

FORMAT = "mixtral-routing-trace"
VERSION = 1
PHASES = ("prefill", "decode")
WRITE_HINT = "write one with `mixtral run --trace FILE` (or chat, bench)"


class TraceError(UserError):
    """A file that cannot be read as a whole routing trace."""


@dataclass(frozen=True)
class TraceHeader:
    model: str
    num_layers: int
    num_experts: int
    top_k: int

    @classmethod
    def for_model(cls, name: str, args: ModelArgs) -> TraceHeader:
        return cls(name, args.num_hidden_layers, args.num_local_experts, args.num_experts_per_tok)

    def as_dict(self) -> dict:
        return {"format": FORMAT, "version": VERSION} | asdict(self)


@dataclass(frozen=True)
class Pass:
    """One forward pass: `tokens` at positions pos..pos+T and their experts [T][L][A], routing order."""

    phase: str
    pos: int
    tokens: list[int]
    experts: list[list[list[int]]]


@dataclass(frozen=True)
class Trace:
    path: Path
    header: TraceHeader
    passes: list[Pass]

    @property
    def tokens(self) -> int:
        return sum(len(p.tokens) for p in self.passes)


# -- writing --------------------------------------------------------------------------------------
def check_target(path: Path) -> None:
    """Refuse, before a model loads, a trace path that cannot be a file: a directory, or one in a
    directory that does not exist."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"--trace {path} is a directory", hint="name a file to write")
    if not path.parent.is_dir():
        raise UserError(f"--trace {path}: the directory {path.parent} does not exist")


class TraceWriter:
    """Records a run's routing into a trace file. The model's MoE blocks call `record` for each layer
    of a pass; `generate.Session` calls `commit` once the pass has completed; `close` ends the file."""

    def __init__(self, path: Path, header: TraceHeader) -> None:
        self.path, self.header = Path(path), header
        try:
            self.fh = self.path.open("w", encoding="utf-8")
        except OSError as e:
            raise UserError(f"cannot write the trace {self.path} ({e.strerror or e})") from None
        self._write(header.as_dict())
        self.pending: list[list[list[int]]] = []  # [layer][T][A] of the pass in progress
        self.passes = self.tokens = 0

    def _write(self, obj: dict) -> None:
        self.fh.write(json.dumps(obj, separators=(",", ":")) + "\n")
        self.fh.flush()

    def record(self, layer: int, ids: list[list[int]]) -> None:
        """Layer `layer`'s picks for the pass's T tokens, [T][A]. Layer 0 starts a new pass, dropping
        what an interrupted one left."""
        if layer == 0:
            self.pending = []
        if layer != len(self.pending):
            raise RuntimeError(f"internal error: routing of layer {layer} recorded after {len(self.pending)} layers")
        self.pending.append(ids)

    def commit(self, phase: str, pos: int, tokens: Sequence[int]) -> None:
        """Write the pass just completed: `tokens` at positions pos.., computed as `phase`."""
        if len(self.pending) != self.header.num_layers or any(len(ids) != len(tokens) for ids in self.pending):
            raise RuntimeError(f"internal error: a pass of {len(tokens)} tokens recorded as "
                               f"{[len(ids) for ids in self.pending]} rows over the layers")
        experts = [list(per_layer) for per_layer in zip(*self.pending, strict=True)]  # [T][L][A]
        self._write({"phase": phase, "pos": pos, "tokens": list(tokens), "experts": experts})
        self.pending = []
        self.passes += 1
        self.tokens += len(tokens)

    def close(self) -> None:
        if self.fh.closed:
            return
        self._write({"end": {"passes": self.passes, "tokens": self.tokens}})
        self.fh.close()


@contextmanager
def recording(model: Mixtral, path: Path | None, name: str) -> Iterator[None]:
    """Record the routing of every pass `model` completes inside the block into `path` (None: nothing)."""
    if path is None:
        yield
        return
    writer = TraceWriter(path, TraceHeader.for_model(name, model.args))
    model.trace = writer
    try:
        yield
    finally:
        model.trace = None
        writer.close()


# -- reading --------------------------------------------------------------------------------------
def _int(obj: dict, key: str, low: int) -> int:
    value = obj.get(key)
    if type(value) is not int or value < low:
        raise ValueError(f"'{key}' must be an integer >= {low}, got {value!r}")
    return value


def _header(obj: object) -> TraceHeader:
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise ValueError("no routing-trace header")
    if obj.get("version") != VERSION:
        raise TraceError(f"routing trace version {obj.get('version')!r} is not supported (this build reads {VERSION})")
    model = obj.get("model")
    if not isinstance(model, str):
        raise ValueError(f"'model' must be a string, got {model!r}")
    E, A = _int(obj, "num_experts", 1), _int(obj, "top_k", 1)
    if A > E:
        raise ValueError(f"top_k {A} exceeds num_experts {E}")
    return TraceHeader(model, _int(obj, "num_layers", 1), E, A)


def _pass(obj: dict, h: TraceHeader) -> Pass:
    phase, tokens, experts = obj.get("phase"), obj.get("tokens"), obj.get("experts")
    if phase not in PHASES:
        raise ValueError(f"'phase' must be one of {', '.join(PHASES)}, got {phase!r}")
    pos = _int(obj, "pos", 0)
    if not isinstance(tokens, list) or not tokens or any(type(t) is not int for t in tokens):
        raise ValueError("'tokens' must be a non-empty list of token ids")
    if phase == "decode" and len(tokens) != 1:
        raise ValueError(f"a decode pass computes one token, this one {len(tokens)}")
    if not isinstance(experts, list) or len(experts) != len(tokens):
        raise ValueError(f"'experts' must hold one entry per token ({len(tokens)})")
    for per_token in experts:
        if not isinstance(per_token, list) or len(per_token) != h.num_layers:
            raise ValueError(f"each token needs the experts of all {h.num_layers} layers")
        for ids in per_token:
            if (not isinstance(ids, list) or len(ids) != h.top_k or len(set(ids)) != h.top_k
                    or any(type(e) is not int or not 0 <= e < h.num_experts for e in ids)):
                raise ValueError(f"each layer's entry must be {h.top_k} distinct expert ids below {h.num_experts}, "
                                 f"got {ids!r}")
    return Pass(phase, pos, tokens, experts)


def read_trace(path: Path) -> Trace:
    """The whole trace at `path`, every line checked; a `TraceError` (one line) names what is wrong."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise TraceError(f"cannot read the trace {path} ({e.strerror or e})") from None
    lines = raw.split(b"\n")
    complete = raw.endswith(b"\n")
    if complete:
        lines.pop()  # the empty piece after the last newline
    try:
        header = _header(json.loads(lines[0]))
    except (ValueError, UnicodeDecodeError, IndexError):
        raise TraceError(f"{path} is not a routing trace", hint=WRITE_HINT) from None
    passes: list[Pass] = []
    end: dict | None = None
    for number, line in enumerate(lines[1:], start=2):
        where = f"{path} line {number}"
        if end is not None:
            raise TraceError(f"{where}: text after the end record", hint="the file is damaged")
        last = number == len(lines)
        try:
            obj = json.loads(line)
            if not isinstance(obj, dict):
                raise ValueError("not a JSON object")
            if "end" in obj:
                end = obj["end"] if isinstance(obj["end"], dict) else {}
                continue
            passes.append(_pass(obj, header))
        except (ValueError, UnicodeDecodeError) as e:
            if last and not complete:
                break  # a line cut short by a killed run: reported as truncated below
            raise TraceError(f"{where} is damaged ({e})") from None
    if end is None:
        raise TraceError(f"{path} is truncated: {len(passes)} whole passes and no end record",
                         hint="the run writing it was killed; record it again")
    tokens = sum(len(p.tokens) for p in passes)
    if end.get("passes") != len(passes) or end.get("tokens") != tokens:
        raise TraceError(f"{path} is damaged: its end record counts {end.get('passes')!r} passes and "
                         f"{end.get('tokens')!r} tokens, the file holds {len(passes)} and {tokens}")
    return Trace(path, header, passes)
