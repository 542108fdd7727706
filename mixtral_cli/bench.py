"""`mixtral bench`: prefill/decode speed, memory, expert-cache behaviour and the bounds they imply.

Weights come from a checkpoint (`-m`) or from a synthetic preset (`--preset tiny|mini|8x7b`) whose
random weights are generated directly in the target format, one expert at a time, so the 8x7B
preset at 4 bits never materialises the bf16 model. Prompts are random token ids and decoding is
greedy with EOS ignored, so every run decodes exactly `--gen-tokens` tokens. No tokenizer is used.

Random routers route differently from trained ones: expert-cache hit rates measured on synthetic
presets say nothing about real text; only the speeds per hit rate carry over.
"""

from __future__ import annotations

import csv
import gc
import math
import os
import resource
import statistics
import sys
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from quant.formats import QuantizedTensor, QuantSpec, dequantize, quantize, spec_for_bits

from .checkpoint import EXPERT_PROJS, Checkpoint, expert_shape, shared_shapes
from .config import ModelArgs
from .cpu_experts import layer_miss_time
from .errors import UserError
from .experts import CacheStats, ExpertCache, ExpertStore, HostSlab
from .generate import Session
from .model import fused_attention_available
from .plan import expert_bytes, plan_memory
from .runtime import Engine, RuntimeOptions, apply_threads, build_engine

SYNTHETIC_NOTE = ("synthetic random weights: routing (and so expert-cache hit rates and prefetch accuracy) is not "
                  "representative of real text; the speeds measured at a given hit rate carry over")
WARMUP_TOKENS = 4

# -- presets -----------------------------------------------------------------------------------
_COMMON = {"num_local_experts": 8, "num_experts_per_tok": 2, "vocab_size": 32000, "rope_theta": 1e6,
           "rms_norm_eps": 1e-5, "sliding_window": None, "tie_word_embeddings": False}
PRESETS: dict[str, dict] = {
    # the shapes of tests/tiny.py
    "tiny": _COMMON | {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 4,
                       "num_key_value_heads": 2, "max_position_embeddings": 4096},
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


def spec_from_bits(bits: int | None) -> QuantSpec | None:
    if bits in (None, 16):
        return None
    if bits not in (4, 8):
        raise UserError(f"--bits must be 4, 8 or 16, got {bits}")
    return spec_for_bits(bits)


# -- synthetic weights -------------------------------------------------------------------------
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


class SyntheticCheckpoint:
    """Random weights behind Checkpoint's interface (`args`, `quant`, `tensor`, `expert_weight`),
    generated on request and reproducible: the same name always gives the same tensor."""

    def __init__(self, args: ModelArgs, quant: QuantSpec | None, seed: int = 0) -> None:
        self.args, self.quant, self.seed = args, quant, seed
        self.shapes = shared_shapes(args)

    def tensor(self, name: str) -> torch.Tensor:
        shape = self.shapes[name]
        g = _generator(self.seed, name)
        if len(shape) == 1:  # norms
            return (1.0 + 0.1 * torch.randn(shape, generator=g)).to(torch.bfloat16)
        std = 1.0 if name == "model.embed_tokens.weight" else 1.0 / math.sqrt(shape[1])
        return (torch.randn(shape, generator=g) * std).to(torch.bfloat16)

    def dense_expert_weight(self, layer: int, expert: int, proj: str) -> torch.Tensor:
        """The expert projection as bf16 [out, in] (dequantized when the format is quantized)."""
        w = self.expert_weight(layer, expert, proj)
        return dequantize(w, torch.bfloat16) if isinstance(w, QuantizedTensor) else w

    def expert_weight(self, layer: int, expert: int, proj: str) -> torch.Tensor | QuantizedTensor:
        shape = expert_shape(self.args, proj)
        g = _generator(self.seed, layer, expert, proj)
        if self.quant is not None:
            return synthetic_quantized(self.quant, shape, g)
        return (torch.randn(shape, generator=g) / math.sqrt(shape[1])).to(torch.bfloat16)


class QuantizingCheckpoint:
    """A dense checkpoint seen through a quantized format: experts are quantized as they are read."""

    def __init__(self, ckpt: Checkpoint, spec: QuantSpec) -> None:
        self.inner, self.args, self.quant = ckpt, ckpt.args, spec

    def tensor(self, name: str) -> torch.Tensor:
        return self.inner.tensor(name)

    def expert_weight(self, layer: int, expert: int, proj: str) -> QuantizedTensor:
        return quantize(self.inner.expert_weight(layer, expert, proj), self.quant)

    def dense_expert_weight(self, layer: int, expert: int, proj: str) -> torch.Tensor:
        return dequantize(self.expert_weight(layer, expert, proj), torch.bfloat16)


def dense_expert(ckpt, layer: int, expert: int, proj: str) -> torch.Tensor:
    fn = getattr(ckpt, "dense_expert_weight", None)
    if fn is not None:
        return fn(layer, expert, proj)
    w = ckpt.expert_weight(layer, expert, proj)
    return dequantize(w, torch.bfloat16) if isinstance(w, QuantizedTensor) else w


# -- the performance model -----------------------------------------------------------------------
def bytes_per_token(args: ModelArgs, spec: QuantSpec | None, dense_bytes: int, context: float) -> int:
    """Bytes one decode step must read: every non-expert weight a token touches (its embedding row,
    attention, router, norms, final norm, lm_head), the top-k experts of every layer in their stored
    format, and the KV cache over `context` positions."""
    D, L, V = args.hidden_size, args.num_hidden_layers, args.vocab_size
    per_layer = (args.attention_params + args.num_local_experts * D + 2 * D) * dense_bytes
    per_layer += args.num_experts_per_tok * expert_bytes(args, spec, dense_bytes)
    kv = 2 * args.num_key_value_heads * args.head_dim * context * dense_bytes
    head = (D + D + V * D) * dense_bytes  # embedding row, final norm, lm_head
    return int(head + L * (per_layer + kv))


def decode_bound(weight_bytes: float, mem_bw: float, misses_per_token: float = 0.0, one_expert_bytes: float = 0.0,
                 h2d_bw: float = math.inf) -> float:
    """Upper bound on decode tokens/s: reading `weight_bytes` at `mem_bw` plus copying
    `misses_per_token` experts of `one_expert_bytes` at `h2d_bw`, with no overlap and no compute."""
    seconds = weight_bytes / mem_bw
    if misses_per_token:
        seconds += misses_per_token * one_expert_bytes / h2d_bw
    return 1.0 / seconds


def _hybrid_bound(engine: Engine, args: ModelArgs, weight_bytes: float, mem_bw: float, stats: CacheStats) -> dict | None:
    """With offloaded experts and the CPU expert engine: the decode bound when every layer waits for
    its misses copied only, and when they are split between copies and the CPU (`cpu_experts`), from
    the measured per-expert costs and the measured miss rate."""
    cpu = getattr(engine.model.experts, "cpu", None)
    uses = stats.hits + stats.misses
    if cpu is None or not uses:
        return None
    miss_rate, L, k = stats.misses / uses, args.num_hidden_layers, args.num_experts_per_tok
    base = weight_bytes / mem_bw

    def bound(mode: str) -> float:
        return 1.0 / (base + L * layer_miss_time(miss_rate, k, cpu.costs, mode))

    return {"copy_expert_s": cpu.costs.copy_s, "cpu_expert_s": cpu.costs.cpu_s, "miss_rate": miss_rate,
            "copy_only_tokens_per_s": bound("never"), "hybrid_tokens_per_s": bound("auto"),
            "cpu_experts": stats.cpu_experts, "mode": cpu.mode}


# -- measurements ------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best_time(fn: Callable[[], object], device: torch.device, reps: int) -> float:
    fn()
    _sync(device)
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def memory_bandwidth(device: torch.device, nbytes: int = 512 * 2**20, reps: int = 5) -> float:
    """Read bandwidth (bytes/s): the best time of summing a float32 tensor much larger than the caches."""
    x = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    t = _best_time(lambda: x.sum(), device, reps)
    return nbytes / t


def host_to_device_bandwidth(device: torch.device, nbytes: int, reps: int = 5,
                             store: ExpertStore | None = None) -> tuple[float, str]:
    """Bandwidth of bringing one expert (`nbytes`) into a slot: a pinned host-to-device copy on CUDA
    (from the expert store itself when there is one, else from a page-locked buffer registered for
    the probe and released after it: never through torch's caching host allocator, which would
    keep a power-of-two pinned block for the rest of the run); on the CPU a memcpy between two host
    buffers (what a CPU slot refill is)."""
    slab = None
    if device.type == "cuda":
        if store is not None and store.pinned_bytes:
            src = store.buffers[0][0]
        else:
            from .experts import CudaHostRegister

            slab = HostSlab(nbytes, CudaHostRegister())
            src = slab.tensor[:nbytes]
        dst = torch.empty(src.numel(), dtype=torch.uint8, device=device)
        nbytes = src.numel()
        method = "pinned host-to-device copy"
    else:  # at least 64 MiB so the copy is not served from the caches (a refill's source is cold)
        nbytes = max(nbytes, 64 * 2**20)
        src = torch.ones(nbytes, dtype=torch.uint8)
        dst = torch.empty(nbytes, dtype=torch.uint8)
        method = "host memcpy (CPU slots)"
    try:
        t = _best_time(lambda: dst.copy_(src, non_blocking=True), device, reps)
    finally:
        if slab is not None:
            del src
            slab.close()
    return nbytes / t, method


def peak_rss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


@dataclass
class RunTimes:
    prefill_s: float
    ttft_s: float
    decode_s: float
    prompt_tokens: int
    gen_tokens: int

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.gen_tokens / self.decode_s if self.decode_s > 0 else 0.0


def _snapshot(stats: CacheStats) -> CacheStats:
    return replace(stats)


def measure_ours(engine: Engine, prompt: list[int], gen_tokens: int, warmup: int = WARMUP_TOKENS
                 ) -> tuple[RunTimes, CacheStats, CacheStats]:
    """Prefill `prompt`, decode `warmup` untimed tokens, then time `gen_tokens` greedy steps (EOS
    ignored). Returns the times and the expert-cache counters of the prefill and of the timed decode."""
    model, dev = engine.model, engine.device
    session = Session(model)  # chunked prefill, as in `run` and `chat`
    model.experts.reset_stats()
    _sync(dev)
    t0 = time.perf_counter()
    logits, _ = session.prefill(prompt)
    _sync(dev)
    prefill_s = time.perf_counter() - t0
    token = int(torch.argmax(logits))
    ttft = time.perf_counter() - t0
    prefill_stats = _snapshot(model.experts.stats)  # read now: CUDA stall times are collected on reading
    for _ in range(warmup):
        token = int(torch.argmax(session.step(token)))
    model.experts.reset_stats()
    t0 = time.perf_counter()
    for _ in range(gen_tokens):
        token = int(torch.argmax(session.step(token)))
    decode_s = time.perf_counter() - t0
    return RunTimes(prefill_s, ttft, decode_s, len(prompt), gen_tokens), prefill_stats, _snapshot(model.experts.stats)


# -- transformers baseline ---------------------------------------------------------------------
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


def _hf_tensor(ckpt, args: ModelArgs, name: str) -> torch.Tensor:
    """The tensor for one transformers parameter name, from Hub-named weights (both the per-expert
    layout of transformers 4 and the fused `gate_up_proj` / `down_proj` layout of transformers 5)."""
    hub = name.replace(".mlp.", ".block_sparse_moe.")
    if hub.endswith(".experts.gate_up_proj") or hub.endswith(".experts.down_proj"):
        layer = int(hub.split(".")[2])
        E = args.num_local_experts
        if hub.endswith("gate_up_proj"):
            return torch.stack([torch.cat([dense_expert(ckpt, layer, e, "w1"), dense_expert(ckpt, layer, e, "w3")])
                                for e in range(E)])
        return torch.stack([dense_expert(ckpt, layer, e, "w2") for e in range(E)])
    if ".experts." in hub:
        parts = hub.split(".")  # model.layers.L.block_sparse_moe.experts.E.wN.weight
        return dense_expert(ckpt, int(parts[2]), int(parts[5]), parts[6])
    return ckpt.tensor(hub)


def build_transformers(ckpt, args: ModelArgs, dtype: torch.dtype):
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
    _sync(dev)
    t0 = time.perf_counter()
    try:
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    except TypeError:  # transformers < 4.50 spells it num_logits_to_keep
        out = model(input_ids=ids, use_cache=True, num_logits_to_keep=1)
    _sync(dev)
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


# -- the whole benchmark -------------------------------------------------------------------------
@dataclass
class BenchOptions:
    preset: str | None = None
    model_dir: Path | None = None
    bits: int | None = None
    prompt_tokens: int = 512
    gen_tokens: int = 128
    baseline: str | None = None
    sweep_slots: bool = False
    csv_path: Path | None = None
    rounds: int = 1
    seed: int = 0
    layers: int | None = None  # presets only: the first N layers
    runtime: RuntimeOptions = field(default_factory=RuntimeOptions)


def _validate(o: BenchOptions) -> None:
    if (o.preset is None) == (o.model_dir is None):
        raise UserError("pass either -m MODEL or --preset", hint=f"presets: {', '.join(PRESETS)}")
    if o.prompt_tokens < 1 or o.gen_tokens < 1:
        raise UserError("--prompt-tokens and --gen-tokens must be at least 1")
    if o.baseline not in (None, "transformers"):
        raise UserError(f"unknown baseline '{o.baseline}'", hint="the only baseline is: transformers")
    if o.rounds < 1:
        raise UserError(f"--rounds must be at least 1, got {o.rounds}")
    if o.layers is not None and o.preset is None:
        raise UserError("--layers applies to --preset only", hint="a checkpoint (-m) runs all its layers")


def open_checkpoint(o: BenchOptions):
    spec = spec_from_bits(o.bits)
    if o.preset is not None:
        return SyntheticCheckpoint(preset_args(o.preset, o.layers), spec if o.bits is not None else None, o.seed)
    ckpt = Checkpoint(o.model_dir)
    if o.bits is None or (o.bits == 16 and ckpt.quant is None) or ckpt.quant == spec:
        return ckpt
    if ckpt.quant is not None:
        raise UserError(f"{o.model_dir} holds {ckpt.quant.bits}-bit experts; --bits {o.bits} needs the original checkpoint")
    return QuantizingCheckpoint(ckpt, spec)


def _available_ram() -> int | None:
    """The kernel's estimate of memory available without swapping (MemAvailable: free pages plus the
    reclaimable page cache); free pages alone (SC_AVPHYS_PAGES) leave the cache out."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _host_bytes(args: ModelArgs, spec: QuantSpec | None) -> int:
    dense = 2 * (args.params_total - args.params_experts)
    return dense + args.num_hidden_layers * args.num_local_experts * expert_bytes(args, spec)


def _check_ram(args: ModelArgs, spec: QuantSpec | None, device: torch.device, what: str) -> None:
    need = _host_bytes(args, spec) if device.type == "cpu" else args.num_hidden_layers * args.num_local_experts * expert_bytes(args, spec)
    free = _available_ram()
    if free is not None and need > 0.9 * free:
        raise UserError(f"{what} needs about {need / 2**30:.1f} GiB of RAM and {free / 2**30:.1f} GiB is available",
                        hint="use a smaller preset" + (" or --bits 4" if spec is None or spec.bits > 4 else ""))


def _median_times(runs: list[RunTimes]) -> RunTimes:
    return RunTimes(statistics.median(r.prefill_s for r in runs), statistics.median(r.ttft_s for r in runs),
                    statistics.median(r.decode_s for r in runs), runs[0].prompt_tokens, runs[0].gen_tokens)


def _swap_provider(engine: Engine, provider) -> None:
    engine.model.experts = provider
    for layer in engine.model.model.layers:
        layer.block_sparse_moe.provider = provider


def run_bench(o: BenchOptions, log: Callable[[str], None] = lambda s: None) -> dict:
    """Run the benchmark described by `o`; returns the result object (what `--json` prints)."""
    from .runtime import pick_device, pick_dtype

    _validate(o)
    apply_threads(o.runtime.threads)
    ckpt = open_checkpoint(o)
    args = ckpt.args
    device = pick_device(o.runtime.device)
    dtype = pick_dtype(o.runtime.dtype, device)
    spec = ckpt.quant
    warmup = WARMUP_TOKENS
    ctx = o.prompt_tokens + warmup + o.gen_tokens + 1
    if ctx > args.max_position_embeddings:
        raise UserError(f"prompt + generated tokens ({ctx}) exceed the model's {args.max_position_embeddings} positions")
    _check_ram(args, spec, device, "this benchmark")
    runtime = replace(o.runtime, ctx_size=ctx)
    if o.sweep_slots and runtime.experts_in_gpu is None:
        runtime.experts_in_gpu = args.num_experts_per_tok  # an expert store to sweep over
    # the budget the planner divides (as `build_engine` computes it): it caps the slot sweep
    gpu_budget = (runtime.gpu_mem or torch.cuda.mem_get_info(device)[0]) if device.type == "cuda" else None
    log("building the model")
    t0 = time.perf_counter()
    engine = build_engine(ckpt, None, runtime)  # bench feeds token ids: no tokenizer needed
    load_s = time.perf_counter() - t0
    gen = torch.Generator().manual_seed(o.seed)
    prompt = torch.randint(3, args.vocab_size, (o.prompt_tokens,), generator=gen).tolist()

    one_expert = expert_bytes(args, spec, dtype.itemsize)
    log("measuring bandwidth")
    mem_bw = memory_bandwidth(device)
    store = getattr(engine.model.experts, "store", None)
    h2d_bw, h2d_method = host_to_device_bandwidth(device, one_expert, store=store)
    if device.type == "cuda":  # the probes' buffers count neither in the peaks nor in what stays reserved
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)

    # One untimed pass each: first calls at new shapes pay one-time costs (kernel selection, allocator growth).
    log("warm-up")
    measure_ours(engine, prompt, 1, warmup)
    peak_rss = peak_rss_bytes()  # ours alone: the baseline is built after this
    peak_gpu = peak_gpu_reserved = None
    if device.type == "cuda":  # ours alone too
        peak_gpu, peak_gpu_reserved = torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device)
    hf_model, hf_info, hf_runs = None, None, []
    if o.baseline == "transformers":
        hf_model, hf_info = _pick_transformers(ckpt, args, prompt, log, device)
        measure_transformers(hf_model, prompt, 1, warmup)
    runs, prefill_stats, decode_stats = [], None, None
    for r in range(o.rounds):
        log(f"round {r + 1}/{o.rounds}: mixtral")
        times, prefill_stats, decode_stats = measure_ours(engine, prompt, o.gen_tokens, warmup)
        runs.append(times)
        if hf_model is not None:
            log(f"round {r + 1}/{o.rounds}: transformers")
            hf_runs.append(measure_transformers(hf_model, prompt, o.gen_tokens, warmup))
    ours = _median_times(runs)
    if hf_model is None:
        peak_rss = peak_rss_bytes()
        if device.type == "cuda":
            peak_gpu, peak_gpu_reserved = torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device)

    context = o.prompt_tokens + warmup + (o.gen_tokens - 1) / 2  # mean KV length over the timed steps
    weight_bytes = bytes_per_token(args, spec, dtype.itemsize, context)
    misses_per_token = decode_stats.misses / o.gen_tokens
    bound = decode_bound(weight_bytes, mem_bw, misses_per_token, one_expert, h2d_bw)
    result = {
        "model": f"preset:{o.preset}" if o.preset else str(o.model_dir),
        "synthetic": o.preset is not None,
        "note": SYNTHETIC_NOTE if o.preset else None,
        "bits": spec.bits if spec else 16,
        "expert_format": spec.name if spec else "bfloat16",
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "params_total": args.params_total,
        "params_active": args.params_active,
        "slots_per_layer": decode_stats.slots_per_layer,
        "prefetch": bool(engine.model.experts.prefetch_enabled),
        "prompt_tokens": o.prompt_tokens,
        "gen_tokens": o.gen_tokens,
        "warmup_tokens": warmup,
        "rounds": o.rounds,
        "load_s": load_s,
        "prefill_tokens_per_s": ours.prefill_tokens_per_s,
        "time_to_first_token_s": ours.ttft_s,
        "decode_tokens_per_s": ours.decode_tokens_per_s,
        "decode_ms_per_token": 1e3 * ours.decode_s / o.gen_tokens,
        "peak_rss_bytes": peak_rss,
        "peak_gpu_bytes": peak_gpu,
        "peak_gpu_reserved_bytes": peak_gpu_reserved,
        "expert_cache": decode_stats.as_dict(),
        "prefill_expert_cache": prefill_stats.as_dict(),
        "bandwidth": {"memory_read_bytes_per_s": mem_bw, "host_to_device_bytes_per_s": h2d_bw,
                      "host_to_device_method": h2d_method},
        "bound": {
            "weight_bytes_per_token": weight_bytes,
            "expert_bytes": one_expert,
            "misses_per_token": misses_per_token,
            "decode_tokens_per_s": bound,
            "achieved_fraction": ours.decode_tokens_per_s / bound,
            "hybrid": _hybrid_bound(engine, args, weight_bytes, mem_bw, decode_stats),
        },
        "baseline": None,
        "sweep": None,
    }
    if hf_model is not None:
        theirs = _median_times(hf_runs)
        result["baseline"] = hf_info | {
            "prefill_tokens_per_s": theirs.prefill_tokens_per_s,
            "time_to_first_token_s": theirs.ttft_s,
            "decode_tokens_per_s": theirs.decode_tokens_per_s,
            "prefill_ratio": ours.prefill_tokens_per_s / theirs.prefill_tokens_per_s,
            "decode_ratio": ours.decode_tokens_per_s / theirs.decode_tokens_per_s,
        }
        del hf_model
        gc.collect()
    if o.sweep_slots:
        k_max = args.num_local_experts
        if gpu_budget is not None:  # no more slots than the planner allows this budget
            k_max = min(k_max, plan_memory(args, spec, ctx, gpu_budget, dtype.itemsize,
                                           fused_attention_available(device, dtype, args)).slots_per_layer)
        result["sweep"] = sweep_slots(engine, prompt, o, mem_bw, h2d_bw, weight_bytes, one_expert, log, k_max)
        path = o.csv_path or Path("bench-slots.csv")
        write_sweep_csv(result["sweep"], path)
        result["sweep_csv"] = str(path)
        result["sweep_png"] = write_sweep_png(result["sweep"], path.with_suffix(".png"))
    return result


def baseline_device(device: torch.device, dense_bytes: int, free_bytes: int | None) -> tuple[torch.device, str | None]:
    """Where the transformers baseline runs: on our device when its dense weights (`dense_bytes`)
    fit in `free_bytes` of it with 10% to spare, else on the CPU, with the reason said plainly."""
    if device.type != "cuda":
        return device, None
    if free_bytes is not None and dense_bytes <= 0.9 * free_bytes:
        return device, None
    return torch.device("cpu"), (f"ran on the CPU, not on {device}: its dense weights ({dense_bytes / 1e9:.1f} GB) "
                                 f"do not fit the {(free_bytes or 0) / 1e9:.1f} GB free there; the ratios compare devices")


def _pick_transformers(ckpt, args: ModelArgs, prompt: list[int], log,
                       device: torch.device = torch.device("cpu")) -> tuple[object, dict]:
    """transformers on our device if it fits there (else the CPU, said plainly), in its faster dtype
    there (bfloat16 or float32, timed briefly; on CUDA float32 only if it fits too)."""
    import transformers

    dense = 2 * args.params_total  # bfloat16
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
    where, note = baseline_device(device, dense, free)
    _check_ram(args, None, torch.device("cpu"), "the transformers baseline (built dense on the host)")
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
    weights = "the same bfloat16 weights" if ckpt.quant is None else "the experts dequantized to bfloat16"
    impl = getattr(model.config, "_experts_implementation", None)
    return model, {"name": "transformers", "version": transformers.__version__, "dtype": best,
                   "device": str(where), "device_note": note,
                   "experts_implementation": impl, "weights": weights, "probe_decode_tokens_per_s": candidates}


def sweep_slots(engine: Engine, prompt: list[int], o: BenchOptions, mem_bw: float, h2d_bw: float,
                weight_bytes: int, one_expert: int, log, k_max: int | None = None) -> list[dict]:
    """Decode speed and hit rate for every slot count K from top-k to `k_max` (default: the number of
    experts; on CUDA the planner's allowance for the budget), with the same expert store and a fresh
    cache of K slots per layer each time: the previous cache is dropped and its device memory returned
    first, so two caches never coexist."""
    args = engine.args
    if not isinstance(engine.model.experts, ExpertCache):
        raise UserError("--sweep-slots needs offloaded experts", hint="leave --experts-in-gpu unset")
    store: ExpertStore = engine.model.experts.store
    prefetch = engine.model.experts.prefetch_enabled
    k_max = args.num_local_experts if k_max is None else min(k_max, args.num_local_experts)
    rows = []
    for k in range(args.num_experts_per_tok, k_max + 1):
        _swap_provider(engine, None)
        gc.collect()
        if engine.device.type == "cuda":
            torch.cuda.empty_cache()
        _swap_provider(engine, ExpertCache(store, k, engine.device, prefetch=prefetch))
        log(f"sweep: {k} slots per layer")
        times, _, stats = measure_ours(engine, prompt, o.gen_tokens)
        misses = stats.misses / o.gen_tokens
        rows.append({
            "slots_per_layer": k,
            "decode_tokens_per_s": times.decode_tokens_per_s,
            "hit_rate": stats.hit_rate,
            "misses_per_token": misses,
            "prefetch_accuracy": stats.prefetch_accuracy,
            "bytes_to_device": stats.bytes_to_device,
            "stall_s": stats.stall_s,
            "bound_tokens_per_s": decode_bound(weight_bytes, mem_bw, misses, one_expert, h2d_bw),
        })
    return rows


SWEEP_FIELDS = ("slots_per_layer", "decode_tokens_per_s", "hit_rate", "misses_per_token", "prefetch_accuracy",
                "bytes_to_device", "stall_s", "bound_tokens_per_s")


def write_sweep_csv(rows: list[dict], path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=SWEEP_FIELDS)
        w.writeheader()
        for row in rows:
            w.writerow({k: "" if row[k] is None else row[k] for k in SWEEP_FIELDS})


def write_sweep_png(rows: list[dict], path: Path) -> str | None:
    """A chart of tokens/s and hit rate per slot count, when matplotlib is installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    ks = [r["slots_per_layer"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(ks, [r["decode_tokens_per_s"] for r in rows], "o-", label="decode tokens/s")
    ax.plot(ks, [r["bound_tokens_per_s"] for r in rows], "--", label="bound")
    ax.set_xlabel("expert slots per layer")
    ax.set_ylabel("tokens/s")
    ax2 = ax.twinx()
    ax2.plot(ks, [r["hit_rate"] or 0 for r in rows], "s:", color="gray", label="hit rate")
    ax2.set_ylabel("hit rate")
    ax2.set_ylim(0, 1)
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return str(path)


__all__ = [
    "EXPERT_PROJS", "PRESETS", "BenchOptions", "SyntheticCheckpoint", "bytes_per_token", "decode_bound",
    "run_bench", "synthetic_quantized",
]
