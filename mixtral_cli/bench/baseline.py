"""`bench --baseline transformers`: transformers' MixtralForCausalLM on the same weights, timed the
same way (greedy, one forward call per token with its own KV cache, EOS ignored)."""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..checkpoints.config import ModelArgs
from ..checkpoints.layout import Quantization, expert_prefix, group_of
from ..checkpoints.source import CheckpointSource
from ..engine.plan import model_bytes, plan_host
from ..errors import UserError
from ..system.host_memory import mem_available
from .measure import WARMUP_TOKENS, RunTimes, sync


@dataclass
class BaselineInfo:
    """What ran as the baseline, where, and why in that dtype."""

    name: str
    version: str
    dtype: str
    device: str
    device_note: str | None  # why it ran on the CPU instead of our GPU, if it did
    experts_implementation: str | None
    weights: str
    probe_decode_tokens_per_s: dict[str, float]  # per dtype tried


def _hf_config(args: ModelArgs):
    from transformers import MixtralConfig

    return MixtralConfig(
        hidden_size=args.hidden_size, intermediate_size=args.intermediate_size,
        num_hidden_layers=args.num_hidden_layers, num_attention_heads=args.num_attention_heads,
        num_key_value_heads=args.num_key_value_heads, head_dim=args.head_dim,
        num_local_experts=args.num_local_experts, num_experts_per_tok=args.num_experts_per_tok,
        vocab_size=args.vocab_size, max_position_embeddings=args.max_position_embeddings,
        rope_theta=args.rope_theta, rms_norm_eps=args.rms_norm_eps, sliding_window=args.sliding_window,
        tie_word_embeddings=args.tie_word_embeddings, bos_token_id=args.bos_token_id,
        eos_token_id=args.eos_token_id,
    )


def _hf_tensor(ckpt: CheckpointSource, args: ModelArgs, name: str) -> torch.Tensor:
    """The tensor for one transformers parameter name, from Hub-named weights (both the per-expert
    layout of transformers 4 and the fused `gate_up_proj` / `down_proj` layout of transformers 5),
    dequantized to bf16 where the checkpoint stores it quantized."""
    hub = name.replace(".mlp.", ".block_sparse_moe.")
    if hub.endswith(".experts.gate_up_proj") or hub.endswith(".experts.down_proj"):
        layer = int(hub.split(".")[2])
        E = args.num_local_experts
        if hub.endswith("gate_up_proj"):
            return torch.stack([torch.cat([ckpt.dense_weight(expert_prefix(layer, e, "w1")),
                                           ckpt.dense_weight(expert_prefix(layer, e, "w3"))]) for e in range(E)])
        return torch.stack([ckpt.dense_weight(expert_prefix(layer, e, "w2")) for e in range(E)])
    prefix = hub.removesuffix(".weight")
    if group_of(prefix) is not None:
        return ckpt.dense_weight(prefix)
    return ckpt.tensor(hub)


def build_transformers(ckpt: CheckpointSource, args: ModelArgs, dtype: torch.dtype):
    """transformers' MixtralForCausalLM holding the same weights (dense; quantized experts dequantized)."""
    try:
        from transformers import MixtralForCausalLM
    except ImportError:
        raise UserError("--baseline transformers needs the transformers package",
                        hint="pip install transformers") from None
    config = _hf_config(args)
    with torch.device("meta"):
        model = MixtralForCausalLM(config)
    for name, p in list(model.named_parameters()):
        t = _hf_tensor(ckpt, args, name).to(dtype)
        if tuple(t.shape) != tuple(p.shape):
            raise RuntimeError(f"transformers parameter {name}: got {tuple(t.shape)}, expected {tuple(p.shape)}")
        module_name, _, attr = name.rpartition(".")
        model.get_submodule(module_name)._parameters[attr] = torch.nn.Parameter(t, requires_grad=False)
    if args.tie_word_embeddings:
        model.tie_weights()
    for mod_name, mod in list(model.named_modules()):  # rotary tables are buffers computed at init
        if hasattr(mod, "inv_freq"):
            parent_name, _, attr = mod_name.rpartition(".")
            setattr(model.get_submodule(parent_name), attr, type(mod)(config=config))
    left = [n for n, b in model.named_buffers() if b.is_meta]
    if left:
        raise RuntimeError(f"transformers buffers left unset: {left[:3]}")
    return model.to(dtype).eval()


@torch.inference_mode()
def measure_transformers(model, prompt: list[int], gen_tokens: int, warmup: int = WARMUP_TOKENS) -> RunTimes:
    """Greedy decoding with transformers' own KV cache, one forward call per token, EOS ignored, on
    the device the model is on."""
    dev = next(model.parameters()).device
    ids = torch.tensor([prompt], device=dev)
    sync(dev)
    t0 = time.perf_counter()
    try:
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    except TypeError:  # transformers < 4.50 spells it num_logits_to_keep
        out = model(input_ids=ids, use_cache=True, num_logits_to_keep=1)
    sync(dev)
    prefill_s = time.perf_counter() - t0
    token = int(torch.argmax(out.logits[0, -1]))
    ttft = time.perf_counter() - t0
    past = out.past_key_values

    def step(tok: int) -> int:
        nonlocal past
        o = model(input_ids=torch.tensor([[tok]], device=dev), past_key_values=past, use_cache=True)
        past = o.past_key_values
        return int(torch.argmax(o.logits[0, -1]))

    for _ in range(warmup):
        token = step(token)
    t0 = time.perf_counter()
    for _ in range(gen_tokens):
        token = step(token)
    return RunTimes(prefill_s, ttft, time.perf_counter() - t0, len(prompt), gen_tokens)


def baseline_device(device: torch.device, dense_bytes: int, free_bytes: int | None) -> tuple[torch.device, str | None]:
    """Where the transformers baseline runs: on our device when its dense weights (`dense_bytes`)
    fit in `free_bytes` of it with 10% to spare, else on the CPU, with the reason said plainly."""
    if device.type != "cuda":
        return device, None
    if free_bytes is not None and dense_bytes <= 0.9 * free_bytes:
        return device, None
    return torch.device("cpu"), (f"ran on the CPU, not on {device}: its dense weights ({dense_bytes / 1e9:.1f} GB) "
                                 f"do not fit the {(free_bytes or 0) / 1e9:.1f} GB free there; the ratios compare devices")


def pick_transformers(ckpt: CheckpointSource, args: ModelArgs, prompt: list[int], log: Callable[[str], None],
                      device: torch.device = torch.device("cpu")) -> tuple[object, BaselineInfo]:
    """transformers on our device if it fits there (else the CPU, said plainly), in its faster dtype
    there (bfloat16 or float32, timed briefly; on CUDA float32 only if it fits too)."""
    import transformers

    dense = model_bytes(args, Quantization())  # bfloat16
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
    where, note = baseline_device(device, dense, free)
    plan_host(args, Quantization(), "cpu", True, 2, False, mem_available()).require("the transformers baseline (built dense on the host)")
    probe_prompt, probe_gen = prompt[: min(len(prompt), 32)], 8
    log(f"transformers: building the model on {where}")
    model = build_transformers(ckpt, args, torch.bfloat16).to(where)
    dtypes = [torch.bfloat16]
    if where.type == "cpu" or 2 * dense <= 0.9 * (free or 0):
        dtypes.append(torch.float32)
    candidates = {}
    for dtype in dtypes:
        model = model.to(dtype)
        log(f"transformers: probing {dtype}")
        candidates[str(dtype).removeprefix("torch.")] = measure_transformers(model, probe_prompt, probe_gen, 2).decode_tokens_per_s
    best = max(candidates, key=candidates.get)
    model = model.to(getattr(torch, best))
    gc.collect()
    if where.type == "cuda":
        torch.cuda.empty_cache()
    weights = ("the same bfloat16 weights" if ckpt.quant.dense
               else f"the same weights dequantized to bfloat16 ({ckpt.quant.describe()})")
    impl = getattr(model.config, "_experts_implementation", None)
    return model, BaselineInfo("transformers", transformers.__version__, best, str(where), note, impl, weights,
                               candidates)
