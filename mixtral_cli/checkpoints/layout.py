"""The Mixtral checkpoint layout: tensor names and shapes in the Hub layout, and the bytes each stored
weight takes (dense, or in a quantized format's parts). Every byte count of the project (the memory
planner, the CPU weight arena, the expert store and its slots, the quantizer's shards) is built on
these."""

from __future__ import annotations

import math

from ..errors import UserError
from ..kernels.formats import QuantizedTensor, QuantSpec, aligned, spec_for_bits
from .config import ModelArgs

INDEX_NAME = "model.safetensors.index.json"
EMBEDDING = "model.embed_tokens.weight"
EXPERT_PROJS = ("w1", "w2", "w3")


def layer_prefix(layer: int) -> str:
    return f"model.layers.{layer}"


def expert_prefix(layer: int, expert: int, proj: str) -> str:
    return f"{layer_prefix(layer)}.block_sparse_moe.experts.{expert}.{proj}"


def expert_shape(args: ModelArgs, proj: str) -> tuple[int, int]:
    """[out_features, in_features] of one expert projection."""
    D, I = args.hidden_size, args.intermediate_size
    return (D, I) if proj == "w2" else (I, D)


def shared_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Every non-expert tensor of the Hub checkpoint and its shape."""
    D, V, Hd = args.hidden_size, args.vocab_size, args.head_dim
    q, kv = args.num_attention_heads * Hd, args.num_key_value_heads * Hd
    shapes: dict[str, tuple[int, ...]] = {EMBEDDING: (V, D), "model.norm.weight": (D,)}
    if not args.tie_word_embeddings:
        shapes["lm_head.weight"] = (V, D)
    for L in range(args.num_hidden_layers):
        p = layer_prefix(L)
        shapes |= {
            f"{p}.input_layernorm.weight": (D,),
            f"{p}.post_attention_layernorm.weight": (D,),
            f"{p}.self_attn.q_proj.weight": (q, D),
            f"{p}.self_attn.k_proj.weight": (kv, D),
            f"{p}.self_attn.v_proj.weight": (kv, D),
            f"{p}.self_attn.o_proj.weight": (D, q),
            f"{p}.block_sparse_moe.gate.weight": (args.num_local_experts, D),
        }
    return shapes


def weight_part_bytes(shape: tuple[int, int], spec: QuantSpec | None, dense_bytes: int) -> list[int]:
    """Bytes of each stored tensor of one [out, in] weight: dense at `dense_bytes` per element, or the
    parts of its quantized format."""
    return [math.prod(shape) * dense_bytes] if spec is None else QuantizedTensor.part_bytes(spec, shape)


def expert_part_bytes(args: ModelArgs, spec: QuantSpec | None, dense_bytes: int = 2) -> list[int]:
    """Bytes of every stored tensor of one expert (w1, w2, w3 and their quantization parts)."""
    return [n for proj in EXPERT_PROJS for n in weight_part_bytes(expert_shape(args, proj), spec, dense_bytes)]


def expert_bytes(args: ModelArgs, spec: QuantSpec | None, dense_bytes: int = 2) -> int:
    """Bytes of one expert (w1, w3: I x D; w2: D x I) in the stored format, scales included."""
    return sum(expert_part_bytes(args, spec, dense_bytes))


def packed_expert_bytes(args: ModelArgs, spec: QuantSpec | None, dense_bytes: int = 2) -> int:
    """Bytes of one expert packed into one buffer, every tensor at a multiple of `ALIGN`: what one
    host-store entry, one device slot and one expert in the CPU arena hold."""
    return sum(aligned(n) for n in expert_part_bytes(args, spec, dense_bytes))


def bits_flag(bits: int | None, group_size: int | None = None, *, dense: bool = True) -> QuantSpec | None:
    """The format `--bits` (and `--group-size`) name, parsed once for every command: None when not
    given or 16 (bfloat16, where `dense` allows it), else the spec; one line naming the flags when bad."""
    if bits is None or (dense and bits == 16):
        return None
    given = f"--bits {bits}" + (f" --group-size {group_size}" if group_size is not None else "")
    choices = "4, 8 or 16" if dense else "4 or 8"
    try:
        return spec_for_bits(bits, group_size)
    except ValueError as e:
        problem = f"must be {choices}" if bits not in (4, 8) else str(e)
        raise UserError(f"{given}: {problem}", hint="use --bits 4 (nf4, group 64) or --bits 8 (int8, group 128)") from None


def fits_group_size(spec: QuantSpec, args: ModelArgs) -> bool:
    """Whether the format's group size divides the input width of every expert projection."""
    try:
        for proj in EXPERT_PROJS:
            spec.check_shape(expert_shape(args, proj))
    except ValueError:
        return False
    return True
