"""What the verbs do once their options are parsed: glue between engine, generation and ui."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..checkpoints.config import ModelArgs, args_from_config, load_config
from ..checkpoints.layout import Quantization
from ..engine.generate import Completion, Session
from ..engine.loader import Engine
from ..errors import UserError
from ..kernels.formats import QuantSpec
from ..settings import GenerationConfig
from ..sizes import format_bytes, format_count
from ..system.host_memory import HOST_HEADROOM, mem_available, peak_rss_bytes
from . import ui


def prompt_ids(engine: Engine, prompt: str, *, raw: bool, system: str | None) -> list[int]:
    """`--raw`: [BOS] + encode(prompt); otherwise the Instruct chat template for one user turn."""
    tok = engine.tokenizer
    if raw:
        return tok.encode(prompt, bos=True)
    return tok.encode_chat([{"role": "user", "content": prompt}], system=system)


def peak_memory_bytes(device: torch.device) -> int:
    """Peak GPU memory allocated on CUDA; on CPU the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return peak_rss_bytes()


def run_once(engine: Engine, prompt: str, gen: GenerationConfig, *, raw: bool, system: str | None,
             json_out: bool) -> None:
    ids = prompt_ids(engine, prompt, raw=raw, system=system)
    completion = Completion(Session(engine.model), engine.tokenizer, ids, gen, continuation=raw)
    engine.experts.reset_stats()
    stats = engine.experts.stats
    if not json_out:
        shown: list[str] = []
        try:
            shown.extend(ui.stream(completion))
        finally:  # Ctrl-C included: leave the terminal on a fresh line
            ui.end_stream("".join(shown))
        if gen.grammar is not None and completion.finish_reason == "length":
            ui.notice(f"warning: the output was cut after {completion.stats.completion_tokens} tokens, before it "
                      f"matched {gen.grammar.source} (raise -n/--max-tokens)")
        if ui.err.is_terminal:  # the same dim line as after a chat reply
            s, uses = completion.stats, stats.hits + stats.misses
            ui.stats_line(s.prefill_tokens_per_s, s.decode_tokens_per_s, s.completion_tokens,
                          stats.hits / uses if uses else None)
        return
    text = "".join(completion)
    s = completion.stats
    cache = stats.as_dict()
    ui.print_json({
        "text": text,
        "prompt_token_ids": ids,
        "token_ids": completion.token_ids,
        "finish_reason": completion.finish_reason,
        "prompt_tokens": s.prompt_tokens,
        "completion_tokens": s.completion_tokens,
        "prefill_tokens_per_s": s.prefill_tokens_per_s,
        "decode_tokens_per_s": s.decode_tokens_per_s,
        "expert_cache": {k: cache[k] for k in ("slots_per_layer", "hits", "misses", "prefetch_hits", "bytes_to_device",
                                                     "cpu_experts")},
        "peak_device_memory_bytes": peak_memory_bytes(engine.device),
    })


def _info_config(model: str | None) -> tuple[ModelArgs, dict, Path | None]:
    """A config from a config.json path, a model directory, or a cached repo id."""
    if model and Path(model).is_file():
        path = Path(model)
        try:
            cfg = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read {path} as JSON ({e})") from None
        return args_from_config(cfg, path), cfg, None
    from ..checkpoints.hub import resolve_model

    directory = resolve_model(model, offer_yes=False)
    args, raw = load_config(directory)
    return args, raw, directory


def _planned(stored: Quantization, args: ModelArgs, flags: dict[str, tuple[int | None, str]]) -> Quantization:
    """The formats to plan for: each group's flag (its format's default group size, which must fit
    the model), else the checkpoint's."""
    from ..checkpoints.layout import bits_flag, group_size_problem

    specs = {}
    for group, (bits, flag) in flags.items():
        spec = stored.spec(group)
        if bits is not None and (spec is None or spec.bits != bits):
            spec = bits_flag(bits, flag=flag)
            problem = spec and group_size_problem(spec, args, group)
            if problem:
                raise UserError(f"{flag} {bits}: the default {problem}")
        specs[group] = spec
    return Quantization(**specs)


def _group_row(spec: QuantSpec | None, nbytes: int) -> str:
    fmt = f"{spec.name} ({spec.bits}-bit, group {spec.group_size})" if spec else "bfloat16"
    return f"{fmt}, {format_bytes(nbytes)}"


def show_info(model: str | None, *, bits: int | None, attn_bits: int | None = None, output_bits: int | None = None,
              gpu_mem: int | None, ctx: int, json_out: bool, trace: Path | None = None,
              slots: list[int] | None = None, pools: list[int] | None = None) -> None:
    """`trace`: also replay that routing trace through the expert-cache policies (`--slots K`: pools of
    layers x K; `--pool N`: pools of N slots; neither: K from top-k to all experts and the budget's pool)."""
    from ..checkpoints.layout import fits_group_size
    from ..checkpoints.quant_config import parse_quantization
    from ..engine.loader import gpu_budget
    from ..engine.plan import (
        all_experts_bytes,
        attention_bytes,
        embeddings_bytes,
        model_bytes,
        plan_memory,
        require_fit,
        shared_bytes,
    )
    from ..kernels.formats import spec_for_bits

    args, raw, directory = _info_config(model)
    routing = None
    if trace is not None:  # read and checked before anything is printed
        from .trace_report import check_sizes, read_for_model

        check_sizes(args, slots or [], pools or [])
        routing = read_for_model(trace, args)
    stored = parse_quantization(raw, (directory or Path(".")) / "config.json", args)
    quant = _planned(stored, args, {"experts": (bits, "--bits"), "attention": (attn_bits, "--attn-bits"),
                                    "output": (output_bits, "--output-bits")})
    spec = quant.experts
    if ctx < 1:
        raise UserError(f"--ctx must be positive, got {ctx}")
    dense, experts = shared_bytes(args, quant), all_experts_bytes(args, spec)
    if gpu_mem is not None:
        budget = gpu_mem
    elif torch.cuda.is_available():
        budget = gpu_budget(None, torch.device("cuda"))
    else:
        budget = 24 * 2**30
        ui.notice("no CUDA GPU here: the plan is for a 24 GiB GPU (pass --gpu-mem for another size)")
    plan = plan_memory(args, quant, ctx, budget)
    if gpu_mem is not None:
        require_fit(plan, args.num_experts_per_tok, ctx, spec)
    L = args.num_hidden_layers
    groups = {  # what each group costs on the GPU (resident, or the expert slots) and in host RAM
        "experts": {"format": spec.name if spec else "bfloat16", "bits": spec.bits if spec else 16,
                    "bytes": experts, "gpu_bytes": plan.experts_on_device * plan.expert_bytes,
                    "host_bytes": plan.host_pinned},
        "attention": {"format": quant.attention.name if quant.attention else "bfloat16",
                      "bits": quant.attention.bits if quant.attention else 16,
                      "bytes": L * attention_bytes(args, quant.attention), "gpu_bytes": plan.attention, "host_bytes": 0},
        "output": {"format": quant.output.name if quant.output else "bfloat16",
                   "bits": quant.output.bits if quant.output else 16,
                   "bytes": embeddings_bytes(args, quant), "gpu_bytes": plan.embeddings, "host_bytes": 0},
    }
    result = {
        "params_total": args.params_total,
        "params_active": args.params_active,
        "params_experts": args.params_experts,
        "expert_format": groups["experts"]["format"],
        "bits": groups["experts"]["bits"],
        "attn_bits": groups["attention"]["bits"],
        "output_bits": groups["output"]["bits"],
        "groups": groups,
        "bytes_weights": {"total": dense + experts, "experts": experts, "other": dense},
        "bytes_weights_by_format": {"bfloat16": model_bytes(args, Quantization())} | {
            s.name: model_bytes(args, Quantization(experts=s)) for s in map(spec_for_bits, (8, 4)) if fits_group_size(s, args)},
        "plan": plan.as_dict() | {"ctx": ctx},
        "host_ram": {"pinned": plan.host_pinned, "headroom": HOST_HEADROOM if plan.host_pinned else 0,
                     "available": mem_available()},
    }
    if directory is not None and not stored.dense:
        result["checkpoint_bytes"] = sum(f.stat().st_size for f in directory.glob("*.safetensors"))
    if routing is not None:
        from .trace_report import cache_simulation

        result["cache_simulation"] = cache_simulation(routing, args, plan, slots or [], pools or [])
    if json_out:
        ui.print_json(result)
        return
    rows = [
        ("parameters", f"{format_count(args.params_total)} total, {format_count(args.params_active)} active per token"),
        ("layers", f"{args.num_hidden_layers} x {args.num_local_experts} experts, top-{args.num_experts_per_tok}"),
        ("expert format", _group_row(spec, experts)),
        ("attention format", _group_row(quant.attention, groups["attention"]["bytes"])),
        ("output format", _group_row(quant.output, groups["output"]["bytes"])
         + " (with the embedding table and final norm)"),
        ("weights", f"{format_bytes(dense + experts)} ({format_bytes(experts)} experts, {format_bytes(dense)} other)"),
        ("one expert", format_bytes(plan.expert_bytes)),
    ]
    if "checkpoint_bytes" in result:
        rows.append(("checkpoint on disk", format_bytes(result["checkpoint_bytes"])))
    ui.key_value_table("model", rows)
    p = plan
    ui.key_value_table(f"GPU plan for {format_bytes(budget)}, {ctx}-token context", [
        ("resident", f"{format_bytes(p.resident)} (embeddings and output {format_bytes(p.embeddings)}, attention {format_bytes(p.attention)}, "
                     f"KV cache {format_bytes(p.kv_cache)}, workspace {format_bytes(p.workspace)}, "
                     f"CUDA context {format_bytes(p.cuda_context)}, slack {format_bytes(p.allocator_slack)})"),
        ("expert slots", f"{p.slots_per_layer} per layer ({p.experts_on_device} of {p.experts_total} experts on the GPU)"
                         if p.fits else f"do not fit: the minimum budget is {format_bytes(p.minimum_budget)}"),
    ] + ([
        ("offloaded", "yes: the rest stay in CPU RAM" if p.offloaded else "no: every expert fits"),
        ("total", format_bytes(p.total)),
    ] if p.fits else []) + [("host RAM", _host_ram_line(result["host_ram"], result["bits"]))])
    if routing is not None:
        from .trace_report import simulation_tables

        simulation_tables(result["cache_simulation"], L)


def _host_ram_line(host: dict, bits: int) -> str:
    """What the plan needs of host RAM, against what this machine has free now."""
    if not host["pinned"]:
        return "nothing pinned: every expert lives on the GPU"
    need = host["pinned"] + host["headroom"]
    line = (f"{format_bytes(host['pinned'])} pinned for the expert store, plus {format_bytes(host['headroom'])} "
            f"left to the system: {format_bytes(need)}")
    if host["available"] is None:
        return line
    verdict = "fits" if need <= host["available"] else (
        "does NOT fit: loading would be refused (" + ("try --bits 4, or " if bits > 4 else "") + "a machine with more RAM)")
    return f"{line}; {format_bytes(host['available'])} available here, {verdict}"
