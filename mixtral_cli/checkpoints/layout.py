"""The Mixtral checkpoint layout: tensor names and shapes in the Hub layout, which linear weights each
quantization group covers (`Quantization`), the tensors a checkpoint stores for them, and the bytes
each stored weight takes (dense, or in a quantized format's parts). Every byte count of the project
(the memory planner, the CPU weight arena, the expert store and its slots, the quantizer's shards) is
built on these."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from ..errors import UserError
from ..kernels.formats import QuantizedTensor, QuantSpec, aligned, spec_for_bits
from .config import ModelArgs

INDEX_NAME = "model.safetensors.index.json"
EMBEDDING = "model.embed_tokens.weight"
OUTPUT = "lm_head"
EXPERT_PROJS = ("w1", "w2", "w3")
ATTENTION_PROJS = ("q_proj", "k_proj", "v_proj", "o_proj")


def layer_prefix(layer: int) -> str:
    return f"model.layers.{layer}"


def expert_prefix(layer: int, expert: int, proj: str) -> str:
    return f"{layer_prefix(layer)}.block_sparse_moe.experts.{expert}.{proj}"


def attention_prefix(layer: int, proj: str) -> str:
    return f"{layer_prefix(layer)}.self_attn.{proj}"


def attention_shape(args: ModelArgs, proj: str) -> tuple[int, int]:
    """[out_features, in_features] of one attention projection."""
    D, Hd = args.hidden_size, args.head_dim
    q, kv = args.num_attention_heads * Hd, args.num_key_value_heads * Hd
    return {"q_proj": (q, D), "k_proj": (kv, D), "v_proj": (kv, D), "o_proj": (D, q)}[proj]


def expert_shape(args: ModelArgs, proj: str) -> tuple[int, int]:
    """[out_features, in_features] of one expert projection."""
    D, I = args.hidden_size, args.intermediate_size
    return (D, I) if proj == "w2" else (I, D)


def shared_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Every non-expert tensor of the Hub checkpoint and its shape."""
    D, V = args.hidden_size, args.vocab_size
    shapes: dict[str, tuple[int, ...]] = {EMBEDDING: (V, D), "model.norm.weight": (D,)}
    if not args.tie_word_embeddings:
        shapes[f"{OUTPUT}.weight"] = (V, D)
    for L in range(args.num_hidden_layers):
        p = layer_prefix(L)
        shapes |= {
            f"{p}.input_layernorm.weight": (D,),
            f"{p}.post_attention_layernorm.weight": (D,),
        }
        shapes |= {f"{attention_prefix(L, proj)}.weight": attention_shape(args, proj) for proj in ATTENTION_PROJS}
        shapes[f"{p}.block_sparse_moe.gate.weight"] = (args.num_local_experts, D)
    return shapes


# -- quantization groups ---------------------------------------------------------------------------
# The linear weights a checkpoint may store quantized, by group, as glob patterns over the weight
# prefixes (config.json's "modules"). The router (`gate`), the norms and the embedding table stay exact.
GROUP_MODULES: dict[str, tuple[str, ...]] = {
    "experts": tuple(f"model.layers.*.block_sparse_moe.experts.*.{p}" for p in EXPERT_PROJS),
    "attention": tuple(f"model.layers.*.self_attn.{p}" for p in ATTENTION_PROJS),
    "output": (OUTPUT,),
}
_GROUP_RES = {g: re.compile("|".join(re.escape(m).replace(r"\*", r"\d+") for m in mods))
              for g, mods in GROUP_MODULES.items()}


def group_of(prefix: str) -> str | None:
    """The quantization group of the linear weight `prefix` (its name without ".weight"), or None."""
    return next((g for g, rx in _GROUP_RES.items() if rx.fullmatch(prefix)), None)


@dataclass(frozen=True)
class Quantization:
    """The stored format of each group of linear weights; None: dense (bfloat16 in the Hub release).
    `Quantization()` is a plain Hub-layout checkpoint."""

    experts: QuantSpec | None = None
    attention: QuantSpec | None = None
    output: QuantSpec | None = None

    @property
    def dense(self) -> bool:
        return self.experts is None and self.attention is None and self.output is None

    def spec(self, group: str) -> QuantSpec | None:
        return getattr(self, group)

    def spec_for(self, prefix: str) -> QuantSpec | None:
        """The format of the linear weight `prefix`; None when it is stored dense."""
        group = group_of(prefix)
        return None if group is None else self.spec(group)

    def describe(self) -> str:
        """One line for people: "experts nf4/64, attention int8/128, output bf16"."""
        return ", ".join(f"{g} {'bf16' if s is None else f'{s.name}/{s.group_size}'}"
                         for g in GROUP_MODULES for s in [self.spec(g)])


def linear_shapes(args: ModelArgs) -> dict[str, tuple[int, int]]:
    """Every linear weight a quantization group covers, by prefix, with its [out, in] shape (the
    output layer included when tied: a quantized output is stored beside the embedding it shares)."""
    shapes: dict[str, tuple[int, int]] = {}
    for L in range(args.num_hidden_layers):
        shapes |= {attention_prefix(L, proj): attention_shape(args, proj) for proj in ATTENTION_PROJS}
        for e in range(args.num_local_experts):
            shapes |= {expert_prefix(L, e, proj): expert_shape(args, proj) for proj in EXPERT_PROJS}
    shapes[OUTPUT] = (args.vocab_size, args.hidden_size)
    return shapes


def weight_shape(args: ModelArgs, prefix: str) -> tuple[int, int]:
    """[out, in] of the linear weight `prefix` of a quantization group."""
    if prefix == OUTPUT:
        return (args.vocab_size, args.hidden_size)
    proj = prefix.rsplit(".", 1)[-1]
    return expert_shape(args, proj) if proj in EXPERT_PROJS else attention_shape(args, proj)


def stored_tensors(args: ModelArgs, quant: Quantization) -> dict[str, tuple[tuple[int, ...], object]]:
    """Every tensor a checkpoint in `quant` stores, with its shape and dtype (None: any float dtype):
    the Hub layout's tensors, each quantized linear weight replaced by its format's parts."""
    want: dict[str, tuple[tuple[int, ...], object]] = {name: (shape, None) for name, shape in shared_shapes(args).items()}
    for prefix, shape in linear_shapes(args).items():
        spec = quant.spec_for(prefix)
        if spec is None:
            if prefix != OUTPUT or not args.tie_word_embeddings:
                want[f"{prefix}.weight"] = (shape, None)
            continue
        want.pop(f"{prefix}.weight", None)
        for part, (pshape, pdtype) in QuantizedTensor.expected_parts(spec, shape).items():
            want[f"{prefix}.{part}"] = (tuple(pshape), pdtype)
    return want


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


def bits_flag(bits: int | None, group_size: int | None = None, *, dense: bool = True,
              flag: str = "--bits") -> QuantSpec | None:
    """The format `--bits` (and `--group-size`) name, parsed once for every command and for each group's
    flag (`flag`: `--attn-bits`, `--output-bits`): None when not given or 16 (bfloat16, where `dense`
    allows it), else the spec; one line naming the flags when bad."""
    if bits is None or (dense and bits == 16):
        return None
    given = f"{flag} {bits}" + (f" --group-size {group_size}" if group_size is not None else "")
    choices = "4, 8 or 16" if dense else "4 or 8"
    try:
        return spec_for_bits(bits, group_size)
    except ValueError as e:
        problem = f"must be {choices}" if bits not in (4, 8) else str(e)
        raise UserError(f"{given}: {problem}",
                        hint=f"use {flag} 4 (nf4, group 64) or {flag} 8 (int8, group 128)") from None


def group_shapes(args: ModelArgs, group: str) -> list[tuple[int, int]]:
    """The distinct [out, in] shapes of the linear weights in `group`."""
    if group == "experts":
        return [expert_shape(args, p) for p in EXPERT_PROJS]
    if group == "attention":
        return sorted({attention_shape(args, p) for p in ATTENTION_PROJS})
    return [(args.vocab_size, args.hidden_size)]


def group_size_problem(spec: QuantSpec, args: ModelArgs, group: str = "experts") -> str | None:
    """Why `spec`'s group size cannot store every weight of `group` (it must divide each input width),
    or None: the one check behind the quantizer, the reader and `info`."""
    for shape in group_shapes(args, group):
        try:
            spec.check_shape(shape)
        except ValueError:
            return f"group size {spec.group_size} does not divide {shape[1]}, the input width of the {group} weights"
    return None


def fits_group_size(spec: QuantSpec, args: ModelArgs, group: str = "experts") -> bool:
    return group_size_problem(spec, args, group) is None


def fitted_default(spec: QuantSpec, args: ModelArgs, group: str) -> QuantSpec:
    """`spec` with its format's default group size halved until it divides every input width of
    `group` (small models: a 64-wide layer takes int8 in groups of 64, not 128); `spec` itself when it
    fits or nothing smaller does. For group sizes nobody asked for: an explicit one is never changed."""
    size = spec.group_size
    while not fits_group_size(spec, args, group) and size > 2:
        size //= 2
        try:
            candidate = spec_for_bits(spec.bits, size)
        except ValueError:
            break
        if fits_group_size(candidate, args, group):
            return candidate
    return spec
