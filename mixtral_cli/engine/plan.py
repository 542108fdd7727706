"""Memory planner: what stays resident on the GPU and how many expert slots per layer fit a budget.

Everything but the experts is resident: embeddings, lm_head, attention, norms, routers, the KV
cache, the workspace of one prefill chunk, the CUDA context and some allocator slack. The rest of
the budget is divided into expert slots, the same number K in every layer. K >= top-k is required
(a token's experts must be on the device together); K = num_experts means nothing is offloaded.

The workspace is what the forward pass allocates besides the weights and the KV cache while it
processes one chunk of `PREFILL_CHUNK` tokens (prefill is always chunked to this size: see
`generate.Session.prefill` and `evaluate.window_logprobs`); `Workspace` lists its parts.

The byte accounting of the weights lives here too, built on the checkpoint layout
(`checkpoints.layout`) and its `Quantization`: one expert in its stored format, the shared weights
(attention and output in their groups' formats), the whole model, what one decode step reads, and
the decode-speed bound that follows from it (`info` and `bench` report these).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from ..checkpoints.config import ModelArgs
from ..checkpoints.layout import (
    ATTENTION_PROJS,
    EMBEDDING,
    GROUP_MODULES,
    Quantization,
    attention_shape,
    expert_bytes,
    group_of,
    group_shapes,
    packed_expert_bytes,
    stored_tensors,
    weight_part_bytes,
)
from ..errors import UserError
from ..kernels.formats import FORMATS, QuantSpec, aligned
from ..sizes import format_gb
from ..system.host_memory import HOST_HEADROOM, room_for

MiB = 2**20
CUDA_CONTEXT_BYTES = 512 * MiB  # CUDA context + cuBLAS workspaces, measured ~0.5 GiB with torch
SLACK_FRACTION = 0.05  # caching-allocator fragmentation
PREFILL_CHUNK = 512  # tokens per prefill forward pass, everywhere (generation, chat, perplexity, bench)
LOGITS_ROWS = 16  # perplexity turns hidden states into logits this many positions at a time


def fewer_bits_hint(spec: QuantSpec | None) -> str | None:
    """'--bits 4' where the experts could be stored in fewer bits than `spec` (None: dense), else None:
    the one place that decides to suggest a smaller format."""
    smallest = min(f.bits for f in FORMATS.values())
    return None if spec is not None and spec.bits <= smallest else f"--bits {smallest}"


def attention_bytes(args: ModelArgs, spec: QuantSpec | None, dense_bytes: int = 2) -> int:
    """One layer's q, k, v and o projections in `spec` (None: dense at `dense_bytes`)."""
    return sum(sum(weight_part_bytes(attention_shape(args, p), spec, dense_bytes)) for p in ATTENTION_PROJS)


def output_bytes(args: ModelArgs, spec: QuantSpec | None, dense_bytes: int = 2) -> int:
    """The output layer (lm_head) as its matmul reads it: quantized in `spec`, or the dense [V, D]
    matrix (with tied embeddings, the embedding table itself)."""
    return sum(weight_part_bytes((args.vocab_size, args.hidden_size), spec, dense_bytes))


def embeddings_bytes(args: ModelArgs, quant: Quantization, dense_bytes: int = 2) -> int:
    """The embedding table, the stored output layer (none when tied and dense) and the final norm."""
    table = args.vocab_size * args.hidden_size * dense_bytes
    output = 0 if args.tie_word_embeddings and quant.output is None else output_bytes(args, quant.output, dense_bytes)
    return table + output + args.hidden_size * dense_bytes


def shared_bytes(args: ModelArgs, quant: Quantization, dense_bytes: int = 2) -> int:
    """Every weight but the experts: embeddings and output, attention in its format, routers and norms."""
    per_layer = attention_bytes(args, quant.attention, dense_bytes) + (args.router_params + args.norm_params) * dense_bytes
    return embeddings_bytes(args, quant, dense_bytes) + args.num_hidden_layers * per_layer


def all_experts_bytes(args: ModelArgs, spec: QuantSpec | None, dense_bytes: int = 2) -> int:
    """Every expert of every layer in the stored format."""
    return args.num_hidden_layers * args.num_local_experts * expert_bytes(args, spec, dense_bytes)


def model_bytes(args: ModelArgs, quant: Quantization, dense_bytes: int = 2) -> int:
    """The whole model: shared weights plus every expert, each group in its format."""
    return shared_bytes(args, quant, dense_bytes) + all_experts_bytes(args, quant.experts, dense_bytes)


def kv_cache_bytes(args: ModelArgs, ctx: float, dense_bytes: int = 2) -> int:
    """K and V for every layer: 2 x L x kv_heads x head_dim x ctx (`ctx` may be a mean length)."""
    return int(2 * args.num_hidden_layers * args.num_key_value_heads * args.head_dim * ctx * dense_bytes)


def bytes_per_token(args: ModelArgs, quant: Quantization, dense_bytes: int, context: float) -> int:
    """Bytes one decode step must read: its embedding row, every layer's attention (in its format),
    router and norms, the final norm, the output layer (in its format), the top-k experts of every
    layer in their stored format, and the KV cache over `context` positions."""
    L, D, b = args.num_hidden_layers, args.hidden_size, dense_bytes
    experts = L * args.num_experts_per_tok * expert_bytes(args, quant.experts, b)
    layers = L * (attention_bytes(args, quant.attention, b) + (args.router_params + args.norm_params) * b)
    return 2 * D * b + layers + output_bytes(args, quant.output, b) + experts + kv_cache_bytes(args, context, b)


def copy_wait_s(misses_per_token: float, one_expert_bytes: float, h2d_bw: float) -> float:
    """Seconds per decoded token spent copying missed experts (of `one_expert_bytes`) at `h2d_bw`."""
    return misses_per_token * one_expert_bytes / h2d_bw


def decode_bound(weight_bytes_per_token: float, mem_bw: float, wait_s: float = 0.0) -> float:
    """Upper bound on decode tokens/s: reading `weight_bytes_per_token` at `mem_bw` plus `wait_s` per
    token waiting for missed experts (`copy_wait_s`, or the CPU engine's share), with no overlap and
    no compute."""
    return 1.0 / (weight_bytes_per_token / mem_bw + wait_s)


@dataclass
class Workspace:
    """Peak bytes the forward pass allocates for one prefill chunk of T tokens over a context of S
    positions, by part (b = bytes of the compute dtype):

    - `activations`: 8 x T x D x b. The residual stream, the normalised input, q/k/v and the rotary
      temporaries, the attention output, the MoE block's input, output accumulator, gathered tokens
      and weighted expert output (fp32 before the cast back); RMSNorm's fp32 copies count as two.
    - `expert_intermediates`: 3 x T x I x b: w1's output (then its SiLU), w3's output and their
      product, live together inside one expert call (an expert sees at most T tokens of a chunk).
    - `attention`: a later chunk's [T, S] boolean mask and the additive form SDPA turns it into
      (T x S x (1 + b)); the fused kernels (flash, memory-efficient) allocate nothing else of that
      size. Where no fused kernel takes a masked grouped-query call (`fused_attention=False`: some
      torch versions, some GPUs and dtypes), SDPA's math backend materialises the scores of the chunk
      against the whole context, and that is reserved instead: fp32 scores and probabilities
      [H, T, S], K and V expanded to H heads in fp32 [H, S, Hd] and q in fp32 [H, T, Hd], plus the mask.
    - `dequantized_matrix`: the largest quantized matrix (an expert's I x D, the output layer's V x D,
      an attention projection) dequantized to the compute dtype (int8 on CUDA for every call, nf4
      when bitsandbytes takes its dequantize-then-matmul path for many tokens), plus nf4's fp32
      block absmax, twice. The transient of one matmul at a time: the largest counts.
    - `logits`: `LOGITS_ROWS` positions of logits in the compute dtype and in fp32, and their fp32
      log-probabilities (generation needs the last position only; perplexity scores that many rows
      at a time).
    """

    activations: int
    expert_intermediates: int
    attention: int
    dequantized_matrix: int
    logits: int

    @property
    def total(self) -> int:
        return self.activations + self.expert_intermediates + self.attention + self.dequantized_matrix + self.logits


def workspace(args: ModelArgs, quant: Quantization, ctx: int, dense_bytes: int = 2,
              fused_attention: bool = True) -> Workspace:
    T, S = min(PREFILL_CHUNK, ctx), ctx
    D, I, H, Hd, V = args.hidden_size, args.intermediate_size, args.num_attention_heads, args.head_dim, args.vocab_size
    b = dense_bytes
    dequant = max([spec.format.dequantize_workspace(shape, spec.group_size, b)
                   for group in GROUP_MODULES if (spec := quant.spec(group)) is not None
                   for shape in group_shapes(args, group)], default=0)
    return Workspace(
        activations=8 * T * D * b,
        expert_intermediates=3 * T * I * b,
        attention=T * S * (1 + b) + (0 if fused_attention else 2 * H * T * S * 4 + 2 * H * S * Hd * 4 + H * T * Hd * 4),
        dequantized_matrix=dequant,
        logits=LOGITS_ROWS * V * (b + 4 + 4),
    )


@dataclass
class MemoryPlan:
    budget: int
    embeddings: int  # embed_tokens + lm_head + final norm
    attention: int  # q, k, v, o of every layer
    norms_and_routers: int
    kv_cache: int
    workspace: int
    cuda_context: int
    allocator_slack: int
    expert_bytes: int  # one device slot (one expert, each tensor ALIGN-aligned)
    experts_total: int  # layers x experts
    slots_per_layer: int
    experts_on_device: int
    offloaded: bool
    fits: bool  # at least top-k slots per layer fit
    minimum_budget: int  # smallest budget with top-k slots per layer
    host_pinned: int = 0  # host RAM page-locked for the expert store (every expert) when offloaded
    prefill_chunk: int = PREFILL_CHUNK
    fused_attention: bool = True
    workspace_parts: dict | None = None

    @property
    def resident(self) -> int:
        return (self.embeddings + self.attention + self.norms_and_routers + self.kv_cache + self.workspace
                + self.cuda_context + self.allocator_slack)

    @property
    def total(self) -> int:
        return self.resident + self.experts_on_device * self.expert_bytes

    def as_dict(self) -> dict:
        return asdict(self) | {"resident": self.resident, "total": self.total}


def plan_memory(args: ModelArgs, quant: Quantization, ctx: int, budget: int, dense_bytes: int = 2,
                fused_attention: bool = True) -> MemoryPlan:
    """Fit the resident parts, then as many expert slots per layer as the budget allows.
    `fused_attention`: whether a fused SDPA kernel serves masked grouped-query attention on the
    target GPU (`loader.fused_attention_available`); without one the math path's scores are reserved."""
    L, E = args.num_hidden_layers, args.num_local_experts
    one_slot = packed_expert_bytes(args, quant.experts, dense_bytes)
    ws = workspace(args, quant, ctx, dense_bytes, fused_attention)
    plan = MemoryPlan(
        budget=budget,
        embeddings=embeddings_bytes(args, quant, dense_bytes),
        attention=L * attention_bytes(args, quant.attention, dense_bytes),
        norms_and_routers=L * (args.norm_params + args.router_params) * dense_bytes,
        kv_cache=kv_cache_bytes(args, ctx, dense_bytes),
        workspace=ws.total,
        cuda_context=CUDA_CONTEXT_BYTES,
        allocator_slack=int(budget * SLACK_FRACTION),
        expert_bytes=one_slot,
        experts_total=L * E,
        slots_per_layer=0,
        experts_on_device=0,
        offloaded=True,
        fits=False,
        minimum_budget=0,
        fused_attention=fused_attention,
        workspace_parts=asdict(ws),
    )
    need = plan.resident - plan.allocator_slack + L * args.num_experts_per_tok * one_slot
    plan.minimum_budget = int(need / (1 - SLACK_FRACTION)) + 1
    k = min(E, max(budget - plan.resident, 0) // (L * one_slot))
    if k >= args.num_experts_per_tok:
        plan.slots_per_layer = int(k)
        plan.experts_on_device = int(k) * L
        plan.offloaded = k < E
        plan.fits = True
    if plan.offloaded:
        plan.host_pinned = L * E * one_slot
    return plan


def require_fit(plan: MemoryPlan, top_k: int, ctx: int, spec: QuantSpec | None = None) -> MemoryPlan:
    """Refuse a budget that cannot hold top-k expert slots per layer, naming the minimum (``spec``:
    the experts' format, to suggest 4-bit experts only where they are not 4-bit already)."""
    if not plan.fits:
        bits = fewer_bits_hint(spec)
        fewer = f" or use {bits}" if bits else ""
        raise UserError(
            f"a GPU budget of {plan.budget / 2**30:.2f} GiB cannot hold {top_k} expert slots per layer "
            f"next to the resident weights and a {ctx}-token KV cache",
            hint=f"the minimum is {plan.minimum_budget / 2**30:.2f} GiB: raise --gpu-mem, lower the context{fewer}",
        )
    return plan


# -- host RAM ----------------------------------------------------------------------------------------
def streamed_shared(args: ModelArgs, quant: Quantization) -> dict[str, tuple[tuple[int, ...], object]]:
    """The stored non-expert tensors a decode step reads whole, with shape and dtype (None: dense):
    all but the embedding table, of which a step reads one row (unless the output layer is that
    table). A CPU run puts these in its arena; the embedding stays in the memory-mapped file, where
    only the rows used are resident."""
    table_is_output = args.tie_word_embeddings and quant.output is None
    return {name: v for name, v in stored_tensors(args, quant).items()
            if group_of(name.rpartition(".")[0]) != "experts" and (name != EMBEDDING or table_is_output)}


def arena_bytes(args: ModelArgs, quant: Quantization, dense_bytes: int, experts: bool) -> int:
    """CPU arena bytes: the streamed shared weights (dense ones at `dense_bytes`) and, with `experts`,
    every expert packed as in the store, each tensor rounded up to `ALIGN`."""
    total = sum(aligned(math.prod(shape) * (dense_bytes if dtype is None else dtype.itemsize))
                for shape, dtype in streamed_shared(args, quant).values())
    if experts:
        total += args.num_hidden_layers * args.num_local_experts * packed_expert_bytes(args, quant.experts, dense_bytes)
    return total


@dataclass(frozen=True)
class HostPlan:
    """What a run holds in host RAM, exactly as `loader.build_engine` places it, and whether that fits
    (`room_for`: `HOST_HEADROOM` left to the system). `run`, `bench` and `info` all decide with this.

    - `store`: the expert store (every expert packed) when experts are offloaded; page-locked on CUDA.
    - `arena`: on the CPU, the weights read into the huge-page arena.
    - `mapped`: the arena would not fit, so the weights are computed from the memory-mapped files
      instead, where the kernel pages them in and out (a checkpoint on disk only: generated weights
      have no file to fall back on, so for them the arena's bytes must fit as anonymous memory).
    """

    store: int
    pinned: bool
    arena: int
    mapped: bool
    fits: bool
    available: int | None
    spec: QuantSpec | None

    @property
    def held(self) -> int:
        """Anonymous host RAM the run holds: the store, and the arena when it is used."""
        return self.store + (0 if self.mapped else self.arena)

    def require(self, what: str = "the model") -> HostPlan:
        """Refuse a plan that does not fit, in one line naming the need and what to do."""
        if not self.fits:
            raise host_ram_refusal(what, self.held, self.pinned, self.available, self.spec)
        return self


def host_ram_refusal(what: str, need: int, pinned: bool, available: int | None, spec: QuantSpec | None) -> UserError:
    """The one message for host RAM that `room_for` refuses: the need, what is free, what to do."""
    kind = "pinned host RAM" if pinned else "host RAM"
    bits = fewer_bits_hint(spec)
    hint = "free some RAM or use a machine with more"
    return UserError(f"{what} needs {format_gb(need)} of {kind} plus {format_gb(HOST_HEADROOM)} for the system, "
                     f"and {format_gb(available or 0)} is available", hint=f"use {bits}, or {hint}" if bits else hint)


def plan_host(args: ModelArgs, quant: Quantization, device: str, resident: bool, dense_bytes: int,
              mapped_source: bool, available: int | None) -> HostPlan:
    """The host side of a run on `device` ("cpu" or "cuda") with every expert on it (`resident`) or
    offloaded to the store; `mapped_source`: the weights come from memory-mapped files (a checkpoint,
    not generated ones), so the CPU can fall back to computing from them."""
    spec = quant.experts
    store = 0 if resident else args.num_hidden_layers * args.num_local_experts * packed_expert_bytes(args, spec, dense_bytes)
    pinned = device == "cuda" and not resident
    if device != "cpu":
        return HostPlan(store, pinned, 0, False, room_for(store, available), available, spec)
    arena = arena_bytes(args, quant, dense_bytes, experts=resident)
    if room_for(store + arena, available) or not mapped_source:
        return HostPlan(store, False, arena, False, room_for(store + arena, available), available, spec)
    return HostPlan(store, False, arena, True, room_for(store, available), available, spec)
