"""The logits file of `perplexity --save-logits`: a model's next-token distributions over a text, kept
so that `--kl-base FILE` can compare another model with it without holding both at once.

Layout (little-endian; docs/format.md has the same table):

=========================  ==========================================================================
field                      meaning
=========================  ==========================================================================
magic ``MXLOGITS``         8 bytes
``version``                uint32, 1
``vocab``                  uint32, the vocabulary size
``ctx``                    uint32, the window length (`--ctx`) the positions were scored with
``n_tokens``               uint64, the text's token ids, BOS included
``n_rows``                 uint64, the scored positions: every position of a window but its last
tokens                     ``n_tokens`` x int32
rows                       ``n_rows`` records, in text order: ``lo``, ``hi`` (float32, the smallest
                           and largest log-probability of the position) and ``vocab`` x int16 codes
=========================  ==========================================================================

A code ``c`` stands for the log-probability ``lo + (c + 32768) * (hi - lo) / 65535``: 16 bits per
entry as llama.cpp's ``--kl-divergence-base`` file, 64 KB a position at a vocabulary of 32000. The
steps are ~(hi - lo) / 65535, about 5e-4 nats; the reader renormalises each row, so the divergence
of a model from its own file is second order in that step (~1e-8 nats).

The writer writes beside the target and renames into place after an fsync: an interrupted run
leaves no file that looks complete.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from types import TracebackType

import torch

from ..errors import UserError

MAGIC = b"MXLOGITS"
VERSION = 1
_HEADER = struct.Struct("<8sIIIQQ")
_ROW_HEAD = struct.Struct("<ff")
LEVELS = 65535


def encode_rows(logprobs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[rows, V] float32 log-probabilities -> ([rows, 2] float32 lo/hi, [rows, V] int16 codes)."""
    lo = logprobs.amin(dim=-1, keepdim=True)
    hi = logprobs.amax(dim=-1, keepdim=True)
    step = ((hi - lo) / LEVELS).clamp_min(torch.finfo(torch.float32).tiny)
    codes = torch.round((logprobs - lo) / step).clamp_(0, LEVELS).to(torch.int32) - 32768
    return torch.cat([lo, hi], dim=-1), codes.to(torch.int16)


def decode_rows(bounds: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """The inverse of `encode_rows`, renormalised: [rows, V] float64 log-probabilities (float32 rounding
    of values near log(1/V) would be larger than the divergences measured with them)."""
    lo, hi = bounds[:, :1].double(), bounds[:, 1:].double()
    logp = lo + (codes.to(torch.float64) + 32768) * ((hi - lo) / LEVELS)
    return logp - torch.logsumexp(logp, dim=-1, keepdim=True)


class LogitsWriter:
    """`with LogitsWriter(path, vocab, ctx, ids, rows) as w: w.add(logprobs)`; the file appears at
    `path` only when every one of `rows` positions was added and the block ends without an error."""

    def __init__(self, path: Path, vocab: int, ctx: int, ids: list[int], rows: int) -> None:
        self.path, self.vocab, self.rows = Path(path), vocab, rows
        self.tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        try:
            self.fh = self.tmp.open("wb")
        except OSError as e:
            raise UserError(f"cannot write the logits file {self.path} ({e.strerror or e})") from None
        self.fh.write(_HEADER.pack(MAGIC, VERSION, vocab, ctx, len(ids), rows))
        self.fh.write(torch.tensor(ids, dtype=torch.int32).numpy().tobytes())
        self.written = 0

    def add(self, logprobs: torch.Tensor) -> None:
        bounds, codes = encode_rows(logprobs.float().cpu())
        for b, c in zip(bounds, codes, strict=True):
            self.fh.write(_ROW_HEAD.pack(float(b[0]), float(b[1])))
            self.fh.write(c.numpy().tobytes())
        self.written += logprobs.shape[0]

    def __enter__(self) -> LogitsWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            if exc_type is None and self.written != self.rows:
                raise RuntimeError(f"internal error: {self.written} of {self.rows} rows written")
            self.fh.flush()
            os.fsync(self.fh.fileno())
        finally:
            self.fh.close()
            if exc_type is None and self.written == self.rows:
                os.replace(self.tmp, self.path)
            else:
                self.tmp.unlink(missing_ok=True)


class LogitsReader:
    """A logits file, its header checked against its size; `read(n)` gives the next n positions."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            self.fh = self.path.open("rb")
            head = self.fh.read(_HEADER.size)
        except OSError as e:
            raise UserError(f"cannot read the logits file {self.path} ({e.strerror or e})") from None
        if len(head) < _HEADER.size or head[:8] != MAGIC:
            raise UserError(f"{self.path} is not a logits file", hint="write one with `mixtral perplexity --save-logits`")
        _, version, self.vocab, self.ctx, n_tokens, self.rows = _HEADER.unpack(head)
        if version != VERSION:
            raise UserError(f"{self.path}: logits file version {version} is not supported (this build reads {VERSION})")
        self.row_bytes = _ROW_HEAD.size + 2 * self.vocab
        size = _HEADER.size + 4 * n_tokens + self.rows * self.row_bytes
        if self.path.stat().st_size != size:
            raise UserError(f"{self.path} is truncated or damaged: {self.path.stat().st_size} bytes, the header says {size}")
        self.ids = torch.frombuffer(bytearray(self.fh.read(4 * n_tokens)), dtype=torch.int32).tolist()

    def check(self, vocab: int, ctx: int, ids: list[int]) -> None:
        """Refuse a file written for another vocabulary, window length or text (one line each)."""
        if self.vocab != vocab:
            raise UserError(f"{self.path} holds logits over {self.vocab} tokens; the model's vocabulary has {vocab}",
                            hint="the base must use the same tokenizer")
        if self.ids != ids:
            raise UserError(f"{self.path} was written for other text or another tokenizer "
                            f"({len(self.ids)} tokens there, {len(ids)} here)", hint="score the same file with the same tokenizer")
        if self.ctx != ctx:
            raise UserError(f"{self.path} was written with --ctx {self.ctx}, not {ctx}", hint=f"pass --ctx {self.ctx}")

    def read(self, n: int) -> torch.Tensor:
        """The next `n` positions' log-probabilities, [n, V] float64."""
        raw = self.fh.read(n * self.row_bytes)
        if len(raw) != n * self.row_bytes:
            raise UserError(f"{self.path} ends early")
        rows = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(n, self.row_bytes)
        bounds = rows[:, :_ROW_HEAD.size].contiguous().view(torch.float32)
        codes = rows[:, _ROW_HEAD.size:].contiguous().view(torch.int16)
        return decode_rows(bounds, codes)

    def close(self) -> None:
        self.fh.close()
