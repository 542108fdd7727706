"""Memory planner: what stays resident on the GPU and how many expert slots per layer fit a budget.

Everything but the experts is resident: embeddings, lm_head, attention, norms, routers, the KV
cache, the workspace of one prefill chunk, the CUDA context and some allocator slack. The rest of
the budget is divided into expert slots, the same number K in every layer. K >= top-k is required
(a token's experts must be on the device together); K = num_experts means nothing is offloaded.

The workspace is what the forward pass allocates besides the weights and the KV cache while it
processes one chunk of `PREFILL_CHUNK` tokens (prefill is always chunked to this size: see
`generate.Session.prefill` and `evaluate.window_nll`); `Workspace` lists its parts.

The byte accounting of the weights lives here too, built on `ModelArgs`' parameter counts: one
expert in its stored format, the shared (never quantized) weights, the whole model, what one decode
step reads, and the decode-speed bound that follows from it (`info` and `bench` report these).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..checkpoints.config import ModelArgs
from ..errors import UserError
from ..kernels.formats import QuantizedTensor, QuantSpec

MiB = 2**20
CUDA_CONTEXT_BYTES = 512 * MiB  # CUDA context + cuBLAS workspaces, measured ~0.5 GiB with torch
SLACK_FRACTION = 0.05  # caching-allocator fragmentation
PREFILL_CHUNK = 512  # tokens per prefill forward pass, everywhere (generation, chat, perplexity, bench)
LOGITS_ROWS = 16  # perplexity turns hidden states into logits this many positions at a time
ALIGN = 64  # bytes; every tensor of an expert starts at a multiple of this in its store/slot buffer


def _expert_parts(args: ModelArgs, spec: QuantSpec | None, dense_bytes: int) -> list[int]:
    """Bytes of every stored tensor of one expert (w1, w2, w3 and their quantization parts)."""
    D, I = args.hidden_size, args.intermediate_size
    sizes = []
    for shape in ((I, D), (D, I), (I, D)):
        if spec is None:
            sizes.append(shape[0] * shape[1] * dense_bytes)
            continue
        for pshape, dtype in QuantizedTensor.expected_parts(spec, shape).values():
            n = 1
            for s in pshape:
                n *= s
            sizes.append(n * dtype.itemsize)
    return sizes


def expert_bytes(args: ModelArgs, spec: QuantSpec | None, dense_bytes: int = 2) -> int:
    """Bytes of one expert (w1, w3: I x D; w2: D x I) in the stored format, scales included."""
    return sum(_expert_parts(args, spec, dense_bytes))


def slot_bytes(args: ModelArgs, spec: QuantSpec | None, dense_bytes: int = 2) -> int:
    """Bytes of one expert packed into one buffer, every tensor starting at a multiple of `ALIGN`
    (what one host-store entry and one device slot hold; `experts.ExpertLayout` packs it)."""
    return sum(-(-n // ALIGN) * ALIGN for n in _expert_parts(args, spec, dense_bytes))


def shared_bytes(args: ModelArgs, dense_bytes: int = 2) -> int:
    """Every weight but the experts (embeddings, lm_head, attention, routers, norms), never quantized."""
    return args.params_shared * dense_bytes


def all_experts_bytes(args: ModelArgs, spec: QuantSpec | None, dense_bytes: int = 2) -> int:
    """Every expert of every layer in the stored format."""
    return args.num_hidden_layers * args.num_local_experts * expert_bytes(args, spec, dense_bytes)


def weight_bytes(args: ModelArgs, spec: QuantSpec | None, dense_bytes: int = 2) -> int:
    """The whole model: shared weights plus every expert in the stored format."""
    return shared_bytes(args, dense_bytes) + all_experts_bytes(args, spec, dense_bytes)


def kv_cache_bytes(args: ModelArgs, ctx: float, dense_bytes: int = 2) -> int:
    """K and V for every layer: 2 x L x kv_heads x head_dim x ctx (`ctx` may be a mean length)."""
    return int(2 * args.num_hidden_layers * args.num_key_value_heads * args.head_dim * ctx * dense_bytes)


def bytes_per_token(args: ModelArgs, spec: QuantSpec | None, dense_bytes: int, context: float) -> int:
    """Bytes one decode step must read: every non-expert weight a token touches (its embedding row,
    attention, router, norms, final norm, lm_head), the top-k experts of every layer in their stored
    format, and the KV cache over `context` positions."""
    experts = args.num_hidden_layers * args.num_experts_per_tok * expert_bytes(args, spec, dense_bytes)
    return args.params_shared_per_token * dense_bytes + experts + kv_cache_bytes(args, context, dense_bytes)


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
    - `dequantized_matrix`: quantized experts only: one expert matrix dequantized to the compute
      dtype, I x D x b (int8 on CUDA for every call, nf4 when bitsandbytes takes its
      dequantize-then-matmul path for many tokens), plus nf4's fp32 block absmax, twice.
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


def workspace(args: ModelArgs, spec: QuantSpec | None, ctx: int, dense_bytes: int = 2,
              fused_attention: bool = True) -> Workspace:
    T, S = min(PREFILL_CHUNK, ctx), ctx
    D, I, H, Hd, V = args.hidden_size, args.intermediate_size, args.num_attention_heads, args.head_dim, args.vocab_size
    b = dense_bytes
    dequant = 0
    if spec is not None:
        dequant = I * D * b
        if spec.name == "nf4":
            dequant += 2 * (I * D // spec.group_size) * 4
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


def plan_memory(args: ModelArgs, spec: QuantSpec | None, ctx: int, budget: int, dense_bytes: int = 2,
                fused_attention: bool = True) -> MemoryPlan:
    """Fit the resident parts, then as many expert slots per layer as the budget allows.
    `fused_attention`: whether a fused SDPA kernel serves masked grouped-query attention on the
    target GPU (`model.fused_attention_available`); without one the math path's scores are reserved."""
    L, E = args.num_hidden_layers, args.num_local_experts
    one_slot = slot_bytes(args, spec, dense_bytes)
    ws = workspace(args, spec, ctx, dense_bytes, fused_attention)
    plan = MemoryPlan(
        budget=budget,
        embeddings=args.embedding_params * dense_bytes,
        attention=L * args.attention_params * dense_bytes,
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
        fewer = " or use 4-bit experts" if spec is None or spec.bits > 4 else ""
        raise UserError(
            f"a GPU budget of {plan.budget / 2**30:.2f} GiB cannot hold {top_k} expert slots per layer "
            f"next to the resident weights and a {ctx}-token KV cache",
            hint=f"the minimum is {plan.minimum_budget / 2**30:.2f} GiB: raise --gpu-mem, lower the context{fewer}",
        )
    return plan
