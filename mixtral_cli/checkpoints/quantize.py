"""Write a quantized copy of a Hub-layout Mixtral checkpoint (the `mixtral quantize` verb).

One job over ~450 lines: plan, write, validate and place one checkpoint atomically; the planning of
shards, the streaming writer and the temporary-directory protocol are steps of one procedure whose
failure handling spans all of them, so they stay together.

Three groups of linear weights may be quantized, each to its own bits (`layout.Quantization`, named by the flags and recorded in config.json by `quant_config`): the
expert projections (``--bits``), the attention projections (``--attn-bits``) and the output layer
(``--output-bits``; with tied embeddings a quantized copy is stored beside the shared table, which the
embedding lookup keeps reading exactly). The router gate, the norms and the embedding table are
copied byte for byte. The layout written here is documented in ``docs/format.md``.

Memory: the work is streamed one source tensor at a time. Every tensor is read from the
memory-mapped source shard and the shard handle is dropped right after, so the pages of the
source stay mapped only while their tensor is being converted; the output shards are written
with their header first and then tensor by tensor (the whole layout is planned from the source
headers before anything is computed). Peak memory is about one source tensor plus its quantized
parts, independent of the number and size of the shards.

Atomicity: everything is written into a hidden temporary directory beside the output
(``.<name>.tmp-<pid>-<random>``), ``config.json`` last, every file fsync'd, and the directory is
renamed into place only when the written checkpoint has been re-opened and validated. Any
failure (including Ctrl-C) removes the temporary directory; an existing output is replaced only
with ``force`` (old moved aside, new renamed in, old deleted).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import torch

from ..errors import UserError
from ..kernels.formats import ALIGN, QuantizedTensor, QuantSpec, tensor_bytes
from ..kernels.formats import quantize as quantize_tensor
from .layout import (
    EMBEDDING,
    GROUP_MODULES,
    INDEX_NAME,
    OUTPUT,
    Quantization,
    group_size_problem,
    linear_shapes,
)
from .quant_config import fit_default_groups, quantization_config, quantization_flags
from .reader import SAFETENSORS_DTYPES, Checkpoint
from .tokenizer import Tokenizer

# Output shards are cut at about this size (a shard never splits the parts of one weight).
DEFAULT_SHARD_BYTES = 5 * 10**9
COPIED_FILES = ("tokenizer.model", "generation_config.json")  # tokenizer.model is required

_ST_DTYPES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}


class QuantizeProgressSink(Protocol):
    """What ``quantize_checkpoint`` reports: ``begin`` once, ``advance`` per source tensor, ``end`` once
    (also on failure)."""

    def begin(self, tensors: int, total_bytes: int) -> None:
        """``tensors`` source tensors holding ``total_bytes`` bytes are about to be converted."""

    def advance(self, name: str, nbytes: int) -> None:
        """Source tensor ``name`` (``nbytes`` bytes) is converted and written."""

    def end(self) -> None:
        """Done (or failed)."""


class NullQuantizeProgress:
    def begin(self, tensors: int, total_bytes: int) -> None:
        pass

    def advance(self, name: str, nbytes: int) -> None:
        pass

    def end(self) -> None:
        pass


# ---------------------------------------------------------------------------------------------
# Planning


@dataclass(frozen=True)
class OutTensor:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return tensor_bytes(self.shape, self.dtype)


@dataclass(frozen=True)
class Conversion:
    """One quantized weight written from a source tensor: its prefix, format and [out, in] shape."""

    prefix: str
    spec: QuantSpec
    shape: tuple[int, int]


@dataclass
class Unit:
    """One source tensor and the output tensors it becomes: itself when `copied`, and the parts of
    each of its `conversions` (one, or two for a tied embedding whose output layer is quantized)."""

    source: str
    source_bytes: int
    outputs: list[OutTensor]
    copied: bool = True
    conversions: list[Conversion] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.outputs)


@dataclass
class Shard:
    units: list[Unit] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(u.nbytes for u in self.units)


def _natural_key(name: str) -> list[Any]:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def plan_units(ckpt: Checkpoint, quant: Quantization) -> list[Unit]:
    """Every tensor of the output, grouped by source tensor, in source shard order."""
    quantized = {f"{prefix}.weight": Conversion(prefix, spec, shape)
                 for prefix, shape in linear_shapes(ckpt.args).items()
                 if (spec := quant.spec_for(prefix)) is not None}
    if ckpt.args.tie_word_embeddings and f"{OUTPUT}.weight" in quantized:  # the output reads the embedding
        quantized[EMBEDDING] = quantized.pop(f"{OUTPUT}.weight")
    file_rank = {f: i for i, f in enumerate(ckpt.files)}
    names = sorted(ckpt.expected(), key=lambda n: (file_rank[ckpt.tensors[n].file], _natural_key(n)))
    units = []
    for name in names:
        info = ckpt.tensors[name]
        src = OutTensor(name, info.shape, info.dtype)
        conv = quantized.get(name)
        copied = conv is None or name == EMBEDDING  # the embedding table itself is never quantized
        outs = [src] if copied else []
        if conv is not None:
            outs += [OutTensor(f"{conv.prefix}.{p}", tuple(shape), dt)
                     for p, (shape, dt) in QuantizedTensor.expected_parts(conv.spec, conv.shape).items()]
        units.append(Unit(name, src.nbytes, outs, copied, [conv] if conv else []))
    return units


def plan_shards(units: list[Unit], shard_bytes: int) -> list[Shard]:
    """Greedy: a new shard starts when the next unit would push the current one past ``shard_bytes``."""
    shards = [Shard()]
    for u in units:
        if shards[-1].units and shards[-1].nbytes + u.nbytes > shard_bytes:
            shards.append(Shard())
        shards[-1].units.append(u)
    return shards


def shard_name(i: int, n: int) -> str:
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


# ---------------------------------------------------------------------------------------------
# Paths


def default_output_dir(src: Path, bits: int, cwd: Path | None = None) -> Path:
    """``<src>-q4`` beside the source; for a Hub cache snapshot (``.../models--org--name/snapshots/<sha>``),
    ``./<name>-q4`` in the current directory (never inside the cache)."""
    src = Path(src)
    suffix = f"-q{bits}"
    if src.parent.name == "snapshots" and src.parent.parent.name.startswith("models--"):
        repo_name = src.parent.parent.name.split("--")[-1]
        return (cwd or Path.cwd()) / f"{repo_name}{suffix}"
    return src.with_name(src.name + suffix)


def _is_within(a: Path, b: Path) -> bool:
    try:
        a.relative_to(b)
        return True
    except ValueError:
        return False


def _replaceable(path: Path) -> bool:
    """Whether ``--force`` may delete ``path``: an empty directory or a quantized checkpoint."""
    if not path.is_dir() or path.is_symlink():
        return False
    if not any(path.iterdir()):
        return True
    try:
        return "quantization" in json.loads((path / "config.json").read_text())
    except (OSError, ValueError, TypeError):
        return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_temps(out: Path) -> None:
    """Temporary directories left by a killed run (its process is gone)."""
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.(?:tmp|old)-(\d+)-[0-9a-f]+$")
    if not out.parent.is_dir():
        return
    for p in out.parent.iterdir():
        m = pattern.match(p.name)
        if m and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
            shutil.rmtree(p, ignore_errors=True)


def temp_dir_for(out: Path) -> Path:
    return out.parent / f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"


# ---------------------------------------------------------------------------------------------
# Writing


def _raw(t: torch.Tensor):
    """The bytes of ``t`` as a buffer (no copy for contiguous tensors)."""
    return t.contiguous().reshape(-1).view(torch.uint8).numpy()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class _ShardWriter:
    """A safetensors file written header first, then tensor by tensor in the planned order."""

    def __init__(self, fh: BinaryIO, tensors: list[OutTensor], path: Path) -> None:
        self.fh, self.path = fh, path
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        off = 0
        for t in tensors:
            header[t.name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [off, off + t.nbytes]}
            off += t.nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        # Spaces pad the header (safetensors allows it) so that the data starts 64-byte aligned in
        # the memory-mapped file: SIMD kernels may read tensors in place.
        blob += b" " * (-(8 + len(blob)) % ALIGN)
        fh.write(struct.pack("<Q", len(blob)))
        fh.write(blob)
        self.expected_end = 8 + len(blob) + off
        self.pending: Iterator[OutTensor] = iter(tensors)

    def write(self, name: str, t: torch.Tensor) -> None:
        want = next(self.pending)
        if want.name != name or tuple(t.shape) != want.shape or t.dtype != want.dtype:
            raise RuntimeError(f"internal error: wrote {name} {tuple(t.shape)} {t.dtype}, planned "
                               f"{want.name} {want.shape} {want.dtype}")
        self.fh.write(_raw(t))

    def finish(self) -> None:
        self.fh.flush()
        if self.fh.tell() != self.expected_end:
            raise RuntimeError(f"internal error: {self.path.name} is {self.fh.tell()} bytes, expected {self.expected_end}")
        os.fsync(self.fh.fileno())


def _convert(ckpt: Checkpoint, unit: Unit) -> Iterator[tuple[str, torch.Tensor]]:
    t = ckpt.tensor(unit.source)
    if unit.copied:
        yield unit.source, t
    for conv in unit.conversions:
        yield from quantize_tensor(t, conv.spec).state_dict(conv.prefix).items()
    del t


def _write_files(ckpt: Checkpoint, tmp: Path, shards: list[Shard],
                 progress: QuantizeProgressSink) -> dict[str, str]:
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards):
        name = shard_name(i, len(shards))
        path = tmp / name
        with path.open("wb") as fh:
            writer = _ShardWriter(fh, [t for u in shard.units for t in u.outputs], path)
            for unit in shard.units:
                for out_name, tensor in _convert(ckpt, unit):
                    writer.write(out_name, tensor)
                    weight_map[out_name] = name
                ckpt.close()  # unmap the source pages of this tensor before the next one
                progress.advance(unit.source, unit.source_bytes)
            writer.finish()
    return weight_map


def _write_json(path: Path, obj: Any) -> None:
    with path.open("w") as fh:
        json.dump(obj, fh, indent=2, ensure_ascii=False)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())


def _copy(src: Path, dst: Path) -> None:
    shutil.copyfile(src, dst)
    with dst.open("rb+") as fh:
        os.fsync(fh.fileno())


def _place(tmp: Path, out: Path) -> None:
    """Rename the finished ``tmp`` to ``out``, replacing an existing ``out`` (moved aside first)."""
    if not out.exists():
        os.rename(tmp, out)
        _fsync_dir(out.parent)
        return
    old = out.parent / f".{out.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)
        raise
    _fsync_dir(out.parent)
    shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# The verb


def quantize_checkpoint(
    src: Path,
    out: Path | None,
    bits: int,
    group_size: int | None = None,
    force: bool = False,
    progress: QuantizeProgressSink | None = None,
    *,
    attn_bits: int | None = None,
    output_bits: int | None = None,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    cwd: Path | None = None,
) -> Path:
    """Quantize the Hub-layout checkpoint in ``src`` into ``out`` and return ``out``.

    ``out`` defaults to :func:`default_output_dir`. ``bits`` (the experts), ``attn_bits`` and
    ``output_bits``: 4 gives nf4, 8 int8, 16 (the two others only) keeps bfloat16; None takes
    ``DEFAULT_GROUP_BITS`` (int8). ``group_size`` (the experts') defaults to the format's block. Raises
    ``UserError`` for bad arguments, a quantized or broken source, or an existing output without ``force``.
    """
    progress = progress or NullQuantizeProgress()
    if shard_bytes <= 0:
        raise UserError(f"shard size must be positive, got {shard_bytes}")
    quant = quantization_flags(bits, attn_bits, output_bits, group_size)
    src = Path(src).resolve()
    ckpt = Checkpoint(src)
    if not ckpt.quant.dense:
        raise UserError(f"{src} is already quantized ({ckpt.quant.describe()})",
                        hint="quantize the original bf16 checkpoint instead")
    quant = fit_default_groups(quant, ckpt.args, {"experts"} if group_size is not None else set())
    for group in GROUP_MODULES:
        spec = quant.spec(group)
        problem = spec and group_size_problem(spec, ckpt.args, group)
        if problem:
            hint = ("pass a --group-size that divides both hidden_size and intermediate_size" if group == "experts"
                    else f"keep the {group} in bf16 (16 bits) or use the other format")
            raise UserError(problem, hint=hint)
    if not (src / "tokenizer.model").is_file():
        raise UserError(f"no tokenizer.model in {src}", hint="re-run `mixtral download` for this model")
    Tokenizer.from_file(src / "tokenizer.model")  # a damaged tokenizer is refused before anything is written

    out = Path(out).expanduser() if out is not None else default_output_dir(src, bits, cwd)
    out = out.absolute()
    if _is_within(out.resolve(), src) or _is_within(src, out.resolve()):
        raise UserError(f"the output {out} overlaps the source checkpoint {src}", hint="pass another --out")
    if out.exists() or out.is_symlink():
        if not force:
            raise UserError(f"{out} already exists", hint="pass --force to replace it, or choose another --out")
        if not _replaceable(out):
            raise UserError(f"refusing to replace {out}: it is not a quantized checkpoint or an empty directory",
                            hint="remove it yourself or choose another --out")

    units = plan_units(ckpt, quant)
    shards = plan_shards(units, shard_bytes)
    total_out = sum(u.nbytes for u in units)
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(out)
    free = shutil.disk_usage(out.parent).free
    if total_out > free:
        from ..sizes import format_bytes

        raise UserError(f"not enough disk space in {out.parent}: the output needs {format_bytes(total_out)}, "
                        f"{format_bytes(free)} free", hint="free some space or pass another --out")

    config = json.loads((src / "config.json").read_text())
    config["quantization"] = quantization_config(quant)
    tmp = temp_dir_for(out)
    tmp.mkdir()
    progress.begin(len(units), sum(u.source_bytes for u in units))
    try:
        weight_map = _write_files(ckpt, tmp, shards, progress)
        _write_json(tmp / INDEX_NAME, {"metadata": {"total_size": total_out}, "weight_map": weight_map})
        for name in COPIED_FILES:
            if (src / name).is_file():
                _copy(src / name, tmp / name)
        _write_json(tmp / "config.json", config)  # last: until now the directory is not a model
        _fsync_dir(tmp)
        check = Checkpoint(tmp)  # re-read every header: present, shapes, dtypes
        if check.quant != quant:
            raise RuntimeError(f"internal error: wrote {check.quant}, expected {quant}")
        check.close()
        _place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        ckpt.close()
        progress.end()
    return out


def quantize_cli(src: Path, bits: int, out: Path | None, group_size: int | None, force: bool,
                 shard_bytes: int | None, make_progress: Callable[[], Any], *,
                 attn_bits: int | None = None, output_bits: int | None = None) -> Path:
    """Run :func:`quantize_checkpoint` on the resolved model directory under a progress display."""
    with make_progress() as progress:
        return quantize_checkpoint(Path(src), out, bits, group_size, force, progress, attn_bits=attn_bits,
                                   output_bits=output_bits, shard_bytes=shard_bytes or DEFAULT_SHARD_BYTES)
