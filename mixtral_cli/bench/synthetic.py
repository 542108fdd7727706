"""Synthetic models: preset shapes and reproducible random weights behind `CheckpointSource`.

`bench --preset` and the tests run on these. Random weights are generated directly in the target
format, one expert at a time, so the 8x7B preset at 4 bits never materialises the bf16 model. The
same name always gives the same tensor (each has its own generator, seeded from the name).
"""

from __future__ import annotations

import math
import zlib
from typing import TYPE_CHECKING

import torch

from ..checkpoints.config import ModelArgs
from ..checkpoints.layout import Quantization, linear_shapes, shared_shapes, weight_shape
from ..checkpoints.source import CheckpointSource, Weight
from ..errors import UserError
from ..kernels.formats import QuantizedTensor, QuantSpec, quantize

if TYPE_CHECKING:
    from ..system.host_memory import HostArena

_COMMON = {"num_local_experts": 8, "num_experts_per_tok": 2, "vocab_size": 32000, "rope_theta": 1e6,
           "rms_norm_eps": 1e-5, "sliding_window": None, "tie_word_embeddings": False}
PRESETS: dict[str, dict] = {
    # the tests' tiny model (tests/tiny.py writes it as a checkpoint)
    "tiny": _COMMON | {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 4,
                       "num_key_value_heads": 2, "max_position_embeddings": 1024},
    # Mixtral's proportions at ~1/4 width and 1/4 depth: 1.4 GB of bf16 expert weights
    "mini": _COMMON | {"hidden_size": 1024, "intermediate_size": 3584, "num_hidden_layers": 8,
                       "num_attention_heads": 16, "num_key_value_heads": 4, "max_position_embeddings": 32768},
    # mistralai/Mixtral-8x7B-v0.1 and -Instruct-v0.1 config.json
    "8x7b": _COMMON | {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                       "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 32768},
}


def preset_args(name: str, layers: int | None = None) -> ModelArgs:
    """The preset's shapes; `layers` keeps its matrices and takes only that many layers (a real-shape
    slice: `--preset 8x7b --layers 2` measures the CPU at Mixtral's own matrix sizes)."""
    if name not in PRESETS:
        raise UserError(f"unknown preset '{name}'", hint=f"use one of: {', '.join(PRESETS)}")
    cfg = PRESETS[name]
    if layers is not None:
        if not 1 <= layers <= cfg["num_hidden_layers"]:
            raise UserError(f"--layers must be between 1 and {cfg['num_hidden_layers']} for preset '{name}', got {layers}")
        cfg = cfg | {"num_hidden_layers": layers}
    return ModelArgs(**cfg)


def _generator(*key: object) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def _random_bytes(n: int, g: torch.Generator) -> torch.Tensor:
    """`n` uniformly random bytes (8 per generator draw)."""
    words = torch.empty(-(-n // 8), dtype=torch.int64).random_(generator=g)
    return words.view(torch.uint8)[:n]


def synthetic_quantized(spec: QuantSpec, shape: tuple[int, int], g: torch.Generator) -> QuantizedTensor:
    """Random codes and plausible scales in exactly the stored parts of `spec` (no float weight is
    made): the dequantized weight has a standard deviation of about 1/sqrt(in_features)."""
    target = 1.0 / math.sqrt(shape[1])
    parts: dict[str, torch.Tensor] = {}
    for name, (pshape, dtype) in QuantizedTensor.expected_parts(spec, shape).items():
        n = math.prod(pshape)
        if dtype == torch.uint8:  # nf4 codes, nf4 block-absmax code indices
            t = _random_bytes(n, g)
        elif dtype == torch.int8:  # int8 codes in [-127, 127]
            t = _random_bytes(n, g).view(torch.int8).clamp_(min=-127)
        elif spec.name == "nf4":  # absmax = dynamic_code[idx] * scales_absmax + offset, in [0.5, 1.5] x 2 target
            t = torch.full((n,), (1.0 if name == "scales_absmax" else 2.0) * target, dtype=dtype)
        else:  # int8 scales: uniform codes in [-127, 127] have std ~73.6
            t = torch.full((n,), target / 73.6, dtype=dtype)
        parts[name] = t.reshape(pshape)
    return QuantizedTensor(spec, shape, parts)


class SyntheticCheckpoint(CheckpointSource):
    """Random weights, generated on request and reproducible: the same name always gives the same
    tensor; each linear weight is generated directly in its group's format (`quant`)."""

    def __init__(self, args: ModelArgs, quant: Quantization, seed: int = 0) -> None:
        self.args, self.quant, self.seed = args, quant, seed
        self.shapes = shared_shapes(args) | {f"{p}.weight": shape for p, shape in linear_shapes(args).items()}

    def tensor(self, name: str, into: HostArena | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor in bf16 (any dense one, linear weights included); with ``into``, copied into the
        arena in ``dtype`` (as `Checkpoint.tensor`)."""
        shape = self.shapes[name]
        g = _generator(self.seed, name)
        if len(shape) == 1:  # norms
            t = (1.0 + 0.1 * torch.randn(shape, generator=g)).to(torch.bfloat16)
        else:
            std = 1.0 if name == "model.embed_tokens.weight" else 1.0 / math.sqrt(shape[1])
            t = (torch.randn(shape, generator=g) * std).to(torch.bfloat16)
        return t if into is None else into.copy(t, dtype)

    def weight(self, prefix: str, into: HostArena | None = None, dtype: torch.dtype | None = None) -> Weight:
        spec = self.quant.spec_for(prefix)
        if spec is None:
            return self.tensor(f"{prefix}.weight", into, dtype)
        w = synthetic_quantized(spec, weight_shape(self.args, prefix), _generator(self.seed, prefix))
        return w if into is None else into.copy_weight(w, dtype)


class QuantizingCheckpoint(CheckpointSource):
    """A dense checkpoint seen through `quant`: each quantized group's weights are quantized as read."""

    def __init__(self, ckpt: CheckpointSource, quant: Quantization) -> None:
        self.inner, self.args, self.quant = ckpt, ckpt.args, quant

    def tensor(self, name: str, into: HostArena | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.inner.tensor(name, into, dtype)

    def weight(self, prefix: str, into: HostArena | None = None, dtype: torch.dtype | None = None) -> Weight:
        spec = self.quant.spec_for(prefix)
        if spec is None:
            return self.inner.weight(prefix, into, dtype)
        w = quantize(self.inner.weight(prefix), spec)
        return w if into is None else into.copy_weight(w, dtype)
