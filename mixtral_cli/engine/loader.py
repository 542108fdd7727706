"""Device and dtype policy, and loading a checkpoint into a ready-to-run model.

The model is built on the `meta` device and every weight is assigned in its final dtype and device,
so the full-precision model is never materialised when a quantized one is loaded, and no tensor is
held twice. On the CPU the weights are read from the files into one huge-page arena when it fits in
RAM (`host_memory.py`: decode streams them ~10% faster from there than from the mapped files), else
computed from the memory-mapped safetensors; on CUDA they are copied from those.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..checkpoints.config import ModelArgs
from ..checkpoints.layout import EXPERT_PROJS, OUTPUT, group_of, linear_shapes, shared_shapes
from ..checkpoints.reader import Checkpoint
from ..checkpoints.source import CheckpointSource
from ..checkpoints.tokenizer import Tokenizer
from ..errors import UserError
from ..kernels import native
from ..kernels.formats import QuantizedTensor
from ..kernels.linear import QuantLinear, use_dense_linears
from ..settings import DTYPE_NAMES, RuntimeOptions
from ..sizes import format_bytes
from ..system.host_memory import HostArena, mem_available
from .cpu_experts import CpuExperts, measure_costs
from .experts import ExpertCache, ExpertLayout, ExpertStore, ResidentExperts, make_expert
from .model import Mixtral
from .plan import plan_host, plan_memory, require_fit, streamed_shared
from .provider import ExpertProvider

DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}

log = logging.getLogger("mixtral_cli")


def pick_device(name: str) -> torch.device:
    """The device a validated `RuntimeOptions.device` names (`auto`: CUDA when there is a GPU)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was requested but no CUDA GPU is available", hint="use --device cpu")
    return torch.device(name)


def cuda_bf16_native(capability: tuple[int, int]) -> bool:
    """bfloat16 runs natively from compute capability 8.0 (Ampere) on. Below it torch only emulates
    it, and `torch.cuda.is_bf16_supported()` (which counts emulation) still says True."""
    return tuple(capability) >= (8, 0)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """Compute dtype of the unquantized parts. `auto`: bfloat16 (CPU matmuls in bf16 are ~2-5x faster
    than fp32 on AVX512-BF16 parts; GPUs without bf16 get float16)."""
    if name == "auto":
        if device.type == "cuda" and not cuda_bf16_native(torch.cuda.get_device_capability(device)):
            return torch.float16
        return torch.bfloat16
    return DTYPES[name]


def apply_threads(threads: int | None) -> None:
    """Set torch's CPU thread count. On a busy machine fewer threads than cores can be much faster:
    oneDNN's bf16 kernels wait for every thread of their parallel region."""
    if threads is None:
        return
    torch.set_num_threads(threads)
    native.set_threads(threads)


def fused_attention_available(device: torch.device, dtype: torch.dtype, args: ModelArgs) -> bool:
    """Whether a fused SDPA kernel (memory-efficient; flash takes no mask) serves a later prefill
    chunk's masked grouped-query call on `device`, as torch decides it. Where none does, SDPA
    falls back to its math path, which materialises the [H, T, S] scores (the planner reserves
    them then). On the CPU, torch's flash kernel takes masks."""
    if device.type != "cuda":
        return True
    try:
        from torch.backends.cuda import SDPAParams, can_use_efficient_attention

        q = torch.zeros(1, args.num_attention_heads, 8, args.head_dim, device=device, dtype=dtype)
        kv = torch.zeros(1, args.num_key_value_heads, 16, args.head_dim, device=device, dtype=dtype)
        mask = torch.zeros(8, 16, device=device, dtype=dtype)  # SDPA passes a boolean mask on in this additive form
        return bool(can_use_efficient_attention(SDPAParams(q, kv, kv, mask, 0.0, False, True)))
    except Exception:  # a torch without these entry points: assume the worst
        return False


@dataclass
class Engine:
    """A loaded model with its tokenizer, ready for generation."""

    model: Mixtral
    tokenizer: Tokenizer | None  # None for an engine fed token ids (bench, synthetic weights)
    checkpoint: CheckpointSource
    device: torch.device
    dtype: torch.dtype

    @property
    def args(self) -> ModelArgs:
        return self.model.args

    @property
    def experts(self) -> ExpertProvider:
        """Where the experts live and how often they were hit (`stats`): the model's one reference to
        its expert provider, so that assigning another here swaps it everywhere."""
        return self.model.experts

    @experts.setter
    def experts(self, provider: ExpertProvider) -> None:
        self.model.experts = provider


def _assign(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    module._parameters[attr] = nn.Parameter(tensor, requires_grad=False)


def gpu_budget(requested: int | None, device: torch.device) -> int:
    """The GPU memory the planner divides: `--gpu-mem` when given, else what the GPU has free now;
    never more than is free (`clamp_budget`)."""
    return clamp_budget(requested, torch.cuda.mem_get_info(device)[0])


def clamp_budget(requested: int | None, free: int) -> int:
    """`requested` (None: `free`), cut to `free` with one warning line when larger: a 24 GB card
    reports 23.6-23.7 GiB in all and less free, so `--gpu-mem 24GiB` would plan past its end."""
    if requested is None or requested <= free:
        return free if requested is None else requested
    log.warning("--gpu-mem %s is more than the GPU has free (%s): planning for %s", format_bytes(requested),
                format_bytes(free), format_bytes(free))
    return free


def expert_slots(opts: RuntimeOptions, args: ModelArgs, ckpt: CheckpointSource, device: torch.device,
                 dtype: torch.dtype, ctx: int) -> int:
    """Expert slots per layer: `--experts-in-gpu`, else the planner's answer on CUDA, else all of them."""
    if opts.experts_in_gpu is not None:
        return opts.experts_in_gpu
    if device.type != "cuda":
        return args.num_local_experts
    budget = gpu_budget(opts.gpu_mem, device)
    plan = plan_memory(args, ckpt.quant, ctx, budget, dense_bytes=dtype.itemsize,
                       fused_attention=fused_attention_available(device, dtype, args))
    return require_fit(plan, args.num_experts_per_tok, ctx, ckpt.quant.experts).slots_per_layer


def load_engine(
    model_dir: Path, opts: RuntimeOptions, on_progress: Callable[[int, int], None] | None = None
) -> Engine:
    """Load tokenizer and weights from `model_dir`; `on_progress(done, total)` counts layers."""
    ckpt = Checkpoint(model_dir)
    tok_path = Path(model_dir) / "tokenizer.model"
    if not tok_path.is_file():
        raise UserError(f"no tokenizer.model in {model_dir}", hint="re-run `mixtral download` for this model")
    return build_engine(ckpt, Tokenizer.from_file(tok_path), opts, on_progress)


def build_engine(
    ckpt: CheckpointSource, tokenizer: Tokenizer | None, opts: RuntimeOptions,
    on_progress: Callable[[int, int], None] | None = None,
) -> Engine:
    """Place the weights of `ckpt` on the device chosen by `opts`; `tokenizer` None for an engine
    that is fed token ids."""
    args = ckpt.args
    opts.validate_for_model(args)
    device = pick_device(opts.device)
    dtype = pick_dtype(opts.dtype, device)
    apply_threads(opts.threads)
    total = args.num_hidden_layers + 1

    ctx = opts.context_size(args)
    slots = expert_slots(opts, args, ckpt, device, dtype, ctx)
    resident = slots == args.num_local_experts
    # On the CPU the weights the model computes from go to one huge-page arena when it fits in RAM
    # (host_memory.py); otherwise they stay memory-mapped.
    host = plan_host(args, ckpt.quant, device.type, resident, dtype.itemsize, ckpt.memory_mapped,
                     mem_available()).require()
    arena = HostArena(host.arena) if host.arena and not host.mapped else None

    in_arena = set(streamed_shared(args, ckpt.quant)) if arena is not None else set()

    def place(name: str) -> torch.Tensor:
        if name in in_arena:
            return ckpt.tensor(name, into=arena, dtype=dtype)
        return ckpt.tensor(name).to(device=device, dtype=dtype)

    def place_quantized(prefix: str) -> QuantizedTensor:
        """A quantized attention or output weight, streamed whole by every step: into the arena."""
        return ckpt.weight(prefix, into=arena) if arena is not None else ckpt.weight(prefix).to(device)

    def expert_weights(L: int, e: int, target: torch.device) -> list:
        if arena is not None and resident:
            return [ckpt.expert_weight(L, e, p, into=arena, dtype=dtype) for p in EXPERT_PROJS]
        ws = [ckpt.expert_weight(L, e, p) for p in EXPERT_PROJS]
        return [w.to(device=target, dtype=dtype) if isinstance(w, torch.Tensor) else w.to(target) for w in ws]

    if resident:
        experts = []
        for L in range(args.num_hidden_layers):
            experts.append([make_expert(*expert_weights(L, e, device)) for e in range(args.num_local_experts)])
            if on_progress:
                on_progress(L + 1, total)
        provider = ResidentExperts(experts)
    else:
        cpu = torch.device("cpu")
        store = ExpertStore(ExpertLayout(expert_weights(0, 0, cpu)), args.num_hidden_layers, args.num_local_experts,
                            pin=device.type == "cuda")
        for L in range(args.num_hidden_layers):
            for e in range(args.num_local_experts):
                store.put(L, e, expert_weights(L, e, cpu))
            if on_progress:
                on_progress(L + 1, total)
        provider = ExpertCache(store, slots, device, prefetch=opts.prefetch)
        if opts.cpu_experts != "never":
            costs = measure_costs(store, device, provider.layers[0].buffers[0], dtype, args.hidden_size)
            provider.use_cpu_experts(CpuExperts(store, args.num_experts_per_tok, dtype, opts.cpu_experts, costs))

    with torch.device("meta"):
        model = Mixtral(args, provider)
    quantized = {prefix for prefix in linear_shapes(args)  # attention and output; experts are the provider's
                 if group_of(prefix) != "experts" and ckpt.quant.spec_for(prefix) is not None}
    for name in shared_shapes(args):
        if name.removesuffix(".weight") not in quantized:
            _assign(model, name, place(name))
    if args.tie_word_embeddings and OUTPUT not in quantized:
        model.lm_head.weight = model.model.embed_tokens.weight
    for prefix in sorted(quantized):
        parent, _, attr = prefix.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, QuantLinear(place_quantized(prefix)))
    model.eval()
    use_dense_linears(model, skip=("gate",))  # the router's product is part of `kernels.route`
    model.setup_cache(ctx)
    if on_progress:
        on_progress(total, total)
    return Engine(model, tokenizer, ckpt, device, dtype)
