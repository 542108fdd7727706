"""Read Mixtral checkpoints (Hub layout or our quantized layout) lazily from safetensors.

Only safetensors are ever opened: pickle formats (`.bin`, `.pt`) can execute code and are refused.
Every tensor the model needs is checked for presence, shape and dtype from the file headers before
any weight is read, so a bad checkpoint fails fast with one line naming the file.
"""

from __future__ import annotations

import ctypes
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open

from ..errors import UserError
from ..kernels.formats import QuantizedTensor
from .config import load_config
from .layout import INDEX_NAME, stored_tensors, weight_shape
from .quant_config import parse_quantization
from .source import CheckpointSource, Weight

if TYPE_CHECKING:
    from ..system.host_memory import HostArena

_FLOAT_DTYPES = {torch.float32, torch.bfloat16, torch.float16}
# safetensors header dtype names (read here, written by quantize.py)
SAFETENSORS_DTYPES = {
    "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "U8": torch.uint8, "I8": torch.int8,
    "I16": torch.int16, "I32": torch.int32, "I64": torch.int64, "F64": torch.float64, "BOOL": torch.bool,
}


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int  # of its bytes in the file
    nbytes: int


class Checkpoint(CheckpointSource):
    """A checkpoint directory: config, tensor directory across shards, lazy reads."""

    memory_mapped = True

    def __init__(self, model_dir: Path) -> None:
        self.dir = Path(model_dir)
        if not self.dir.is_dir():
            raise UserError(f"model directory {self.dir} does not exist")
        self.args, self.config = load_config(self.dir)
        self.quant = parse_quantization(self.config, self.dir / "config.json", self.args)
        self.files = self._shard_files()
        self.tensors = self._read_headers()
        self._handles: dict[Path, Any] = {}
        self.validate()

    # -- discovery ---------------------------------------------------------------------------
    def _shard_files(self) -> list[Path]:
        index = self.dir / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise UserError(f"{index} is not a valid safetensors index ({e})") from e
            files = sorted({self.dir / f for f in weight_map.values()})
            for f in files:
                if not f.is_file():
                    raise UserError(f"shard {f.name} listed in {INDEX_NAME} is missing from {self.dir}",
                                    hint="re-run `mixtral download` to fetch it")
            return files
        files = sorted(self.dir.glob("*.safetensors"))
        if not files:
            pickles = [p.name for p in self.dir.iterdir() if p.suffix in (".bin", ".pt", ".pth")]
            hint = "only safetensors checkpoints are loaded (pickle files can run code)" if pickles else None
            raise UserError(f"no .safetensors weights in {self.dir}", hint=hint)
        return files

    def _read_headers(self) -> dict[str, TensorInfo]:
        tensors: dict[str, TensorInfo] = {}
        for f in self.files:
            try:
                with safe_open(f, framework="pt") as sf:
                    names = list(sf.keys())
                spans = _data_spans(f)
                for name in names:
                    meta = spans[name]
                    begin, end = meta["data_offsets"]
                    tensors[name] = TensorInfo(f, tuple(meta["shape"]), _dtype(meta["dtype"], f), begin, end - begin)
            except (SafetensorError, OSError, KeyError, TypeError, ValueError) as e:
                raise UserError(f"{f.name} is not a readable safetensors file ({e})",
                                hint="the file is truncated or corrupt: download or quantize it again") from e
        return tensors

    # -- validation ----------------------------------------------------------------------------
    def expected(self) -> dict[str, tuple[tuple[int, ...], torch.dtype | None]]:
        """Every tensor the model needs: shape and exact dtype (None: any float dtype)."""
        return stored_tensors(self.args, self.quant)

    def validate(self) -> None:
        for name, (shape, dtype) in self.expected().items():
            info = self.tensors.get(name)
            if info is None:
                raise UserError(f"tensor {name} is missing from the checkpoint in {self.dir}",
                                hint="the checkpoint is incomplete or not a Mixtral checkpoint")
            if info.shape != shape:
                raise UserError(f"{info.file.name}: tensor {name} has shape {list(info.shape)}, expected {list(shape)}",
                                hint="config.json does not match the weights")
            ok = info.dtype in _FLOAT_DTYPES if dtype is None else info.dtype == dtype
            if not ok:
                raise UserError(f"{info.file.name}: tensor {name} has dtype {info.dtype}, expected {dtype or 'a float type'}")

    # -- reads -----------------------------------------------------------------------------------
    def tensor(self, name: str, into: HostArena | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor as stored (a view of the memory-mapped file), or with ``into`` read from the file into
        the arena in ``dtype`` (default: as stored) without mapping the file."""
        info = self.tensors[name]
        if into is not None:
            return self._read_into(name, info, into, dtype or info.dtype)
        handle = self._handles.get(info.file)
        if handle is None:
            handle = self._handles[info.file] = safe_open(info.file, framework="pt")
        try:
            return handle.get_tensor(name)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise UserError(f"{info.file.name}: cannot read {name} ({e})", hint="the file is corrupt") from e

    def _read_into(self, name: str, info: TensorInfo, arena: HostArena, dtype: torch.dtype) -> torch.Tensor:
        out = arena.alloc(info.shape, dtype)
        raw = out if dtype == info.dtype else torch.empty(info.shape, dtype=info.dtype)
        if info.nbytes != raw.numel() * raw.element_size():
            raise UserError(f"{info.file.name}: tensor {name} has {info.nbytes} bytes for shape {list(info.shape)}",
                            hint="the file is corrupt")
        view = memoryview((ctypes.c_char * info.nbytes).from_address(raw.data_ptr())).cast("B")
        with open(info.file, "rb") as f:
            f.seek(info.offset)
            got = f.readinto(view) if info.nbytes else 0
        if got != info.nbytes:
            raise UserError(f"{info.file.name}: cannot read {name} (the file ends early)", hint="the file is truncated")
        if raw is not out:
            out.copy_(raw)
        return out

    def weight(self, prefix: str, into: HostArena | None = None, dtype: torch.dtype | None = None) -> Weight:
        """One linear weight as stored: a dense [out, in] tensor or a QuantizedTensor; ``into`` and
        ``dtype`` as for ``tensor`` (``dtype`` applies to a dense weight only)."""
        spec = self.quant.spec_for(prefix)
        if spec is None:
            return self.tensor(f"{prefix}.weight", into, dtype)
        shape = weight_shape(self.args, prefix)
        parts = QuantizedTensor.expected_parts(spec, shape)
        sd = {f"{prefix}.{p}": self.tensor(f"{prefix}.{p}", into) for p in parts}
        return QuantizedTensor.from_state_dict(spec, shape, sd, prefix)

    def close(self) -> None:
        self._handles.clear()


def _data_spans(f: Path) -> dict[str, dict[str, Any]]:
    """The header of a safetensors file (8-byte little-endian length, then JSON), with every tensor's
    ``data_offsets`` made absolute."""
    with open(f, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(n))
    header.pop("__metadata__", None)
    for meta in header.values():
        meta["data_offsets"] = [8 + n + o for o in meta["data_offsets"]]
    return header


def _dtype(name: str, f: Path) -> torch.dtype:
    dtype = SAFETENSORS_DTYPES.get(name)
    if dtype is None:
        raise UserError(f"{f.name}: unsupported tensor dtype {name}")
    return dtype
