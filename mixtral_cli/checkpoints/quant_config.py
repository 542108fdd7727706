"""config.json's "quantization" object (docs/format.md), read and written, and the formats the
quantize flags name: the one description of which group of linear weights is stored in which format."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import UserError
from ..kernels.formats import FORMAT_VERSION, QuantSpec, spec_for_bits
from .config import ModelArgs
from .layout import GROUP_MODULES, Quantization, bits_flag, fitted_default, group_size_problem


def _group_spec(entry: Any, group: str, path: Path) -> QuantSpec | None:
    """One group's entry: {"bits": 16} (dense), or {"format", "bits", "group_size"} of a known format."""
    try:
        bits = int(entry["bits"])
        if bits == 16:
            return None
        spec = QuantSpec(name=str(entry["format"]), bits=bits, group_size=int(entry["group_size"]))
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{path}: malformed {group!r} entry in 'quantization' ({e})") from e
    try:
        known = spec_for_bits(spec.bits, spec.group_size)
    except ValueError as e:
        raise UserError(f"{path}: unsupported quantization of the {group} ({e})") from None
    if known.name != spec.name:
        raise UserError(f"{path}: unsupported quantization format {spec.name!r} with {spec.bits} bits",
                        hint=f"{spec.bits}-bit weights use format {known.name!r}")
    modules = entry.get("modules")
    if modules is not None and (not isinstance(modules, list) or sorted(modules) != sorted(GROUP_MODULES[group])):
        raise UserError(f"{path}: quantized modules {modules} do not match the {group} group",
                        hint=f"the {group} group is {list(GROUP_MODULES[group])}")
    return spec


def parse_quantization(cfg: dict[str, Any], path: Path, args: ModelArgs) -> Quantization:
    """The `"quantization"` object of config.json, validated (docs/format.md); `Quantization()` when absent.

    Version 2 names each group (`experts`, `attention`, `output`) with its bits; version 1 (experts
    only) has `format`, `bits`, `group_size` at the top. Any other version or group is refused.
    """
    q = cfg.get("quantization")
    if q is None:
        return Quantization()
    try:
        version = int(q["format_version"])
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{path}: malformed 'quantization' entry ({e})") from e
    if version == 1:
        quant = Quantization(experts=_group_spec(q, "experts", path))
    elif version == FORMAT_VERSION:
        groups = q.get("groups")
        if not isinstance(groups, dict):
            raise UserError(f"{path}: malformed 'quantization' entry (no 'groups' object)")
        unknown = sorted(set(groups) - set(GROUP_MODULES))
        if unknown:
            raise UserError(f"{path}: unknown quantization group {unknown[0]!r} (known: {', '.join(GROUP_MODULES)})",
                            hint="this checkpoint was written by a newer mixtral-cli: upgrade, or quantize again")
        quant = Quantization(**{g: _group_spec(groups.get(g, {"bits": 16}), g, path) for g in GROUP_MODULES})
    else:
        raise UserError(
            f"{path}: quantized format version {version} is not supported (this build reads versions 1 and {FORMAT_VERSION})",
            hint="re-run `mixtral quantize` on the original checkpoint with this version",
        )
    for group in GROUP_MODULES:
        spec = quant.spec(group)
        problem = spec and group_size_problem(spec, args, group)
        if problem:
            raise UserError(f"{path}: quantization {problem}")
    return quant


# `--attn-bits` and `--output-bits` when not given, for either `--bits`: int8 for both, chosen from the
# KL table on a trained model (docs/benchmarks.md 6.2). At 4-bit experts, nf4 attention multiplied the
# KL divergence 4.7x (0.0015 -> 0.0069 nats) and its 99th percentile 4x to read 9% fewer bytes per
# 8x7B token; an nf4 output layer multiplied it 3.3x for 1%; a bf16 output layer measured the same
# as int8 at twice the bytes.
DEFAULT_GROUP_BITS = {"attention": 8, "output": 8}


def quantization_flags(bits: int, attn_bits: int | None, output_bits: int | None,
                       group_size: int | None) -> Quantization:
    """The formats `--bits`, `--attn-bits`, `--output-bits` and `--group-size` (the experts') name."""
    experts = bits_flag(bits, group_size, dense=False)
    attention = bits_flag(DEFAULT_GROUP_BITS["attention"] if attn_bits is None else attn_bits, flag="--attn-bits")
    output = bits_flag(DEFAULT_GROUP_BITS["output"] if output_bits is None else output_bits, flag="--output-bits")
    return Quantization(experts=experts, attention=attention, output=output)


def fit_default_groups(quant: Quantization, args: ModelArgs, explicit: set[str]) -> Quantization:
    """Each group whose group size nobody chose (all but `explicit`) with a default that fits `args`."""
    return Quantization(**{g: spec if spec is None or g in explicit else fitted_default(spec, args, g)
                           for g in GROUP_MODULES for spec in [quant.spec(g)]})


def quantization_config(quant: Quantization) -> dict[str, Any]:
    """config.json's "quantization" object for `quant` (format version 2, docs/format.md)."""
    groups = {}
    for group, modules in GROUP_MODULES.items():
        spec = quant.spec(group)
        entry = {"bits": 16} if spec is None else {"format": spec.name, "bits": spec.bits, "group_size": spec.group_size}
        groups[group] = entry | {"modules": list(modules)}
    return {"format_version": FORMAT_VERSION, "groups": groups}
