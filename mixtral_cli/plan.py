"""Memory planner: what stays resident on the GPU and how many expert slots per layer fit a budget.

Everything but the experts is resident: embeddings, lm_head, attention, norms, routers, the KV
cache, a prefill workspace, the CUDA context and some allocator slack. The rest of the budget is
divided into expert slots, the same number K in every layer. K >= top-k is required (a token's
experts must be on the device together); K = num_experts means nothing is offloaded.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from quant.formats import QuantizedTensor, QuantSpec

from .config import ModelArgs
from .errors import UserError

MiB = 2**20
CUDA_CONTEXT_BYTES = 512 * MiB  # CUDA context + cuBLAS workspaces, measured ~0.5 GiB with torch
SLACK_FRACTION = 0.05  # caching-allocator fragmentation
PREFILL_CHUNK = 512  # tokens per prefill step assumed for the workspace


def expert_bytes(args: ModelArgs, spec: QuantSpec | None, dense_bytes: int = 2) -> int:
    """Bytes of one expert (w1, w3: I x D; w2: D x I) in the stored format, scales included."""
    D, I = args.hidden_size, args.intermediate_size
    if spec is None:
        return 3 * D * I * dense_bytes
    total = 0
    for shape in ((I, D), (D, I), (I, D)):
        for pshape, dtype in QuantizedTensor.expected_parts(spec, shape).values():
            n = 1
            for s in pshape:
                n *= s
            total += n * dtype.itemsize
    return total


def kv_cache_bytes(args: ModelArgs, ctx: int, dense_bytes: int = 2) -> int:
    """K and V for every layer: 2 x L x kv_heads x head_dim x ctx."""
    return 2 * args.num_hidden_layers * args.num_key_value_heads * args.head_dim * ctx * dense_bytes


def workspace_bytes(args: ModelArgs, ctx: int, dense_bytes: int = 2) -> int:
    """Peak activations of one prefill chunk: hidden states, expert FFN intermediates, attention
    scores (math attention path), one dequantized expert matrix, and the last-position logits."""
    T = min(PREFILL_CHUNK, ctx)
    D, I = args.hidden_size, args.intermediate_size
    hidden = 8 * T * D * dense_bytes
    ffn = 3 * T * I * dense_bytes
    scores = args.num_attention_heads * T * ctx * dense_bytes
    dequant = D * I * dense_bytes
    logits = args.vocab_size * 4
    return hidden + ffn + scores + dequant + logits


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
    expert_bytes: int
    experts_total: int  # layers x experts
    slots_per_layer: int
    experts_on_device: int
    offloaded: bool
    fits: bool  # at least top-k slots per layer fit
    minimum_budget: int  # smallest budget with top-k slots per layer

    @property
    def resident(self) -> int:
        return (self.embeddings + self.attention + self.norms_and_routers + self.kv_cache + self.workspace
                + self.cuda_context + self.allocator_slack)

    @property
    def total(self) -> int:
        return self.resident + self.experts_on_device * self.expert_bytes

    def as_dict(self) -> dict:
        return asdict(self) | {"resident": self.resident, "total": self.total}


def plan_memory(args: ModelArgs, spec: QuantSpec | None, ctx: int, budget: int, dense_bytes: int = 2) -> MemoryPlan:
    """Fit the resident parts, then as many expert slots per layer as the budget allows."""
    D, L, E = args.hidden_size, args.num_hidden_layers, args.num_local_experts
    heads = 1 if args.tie_word_embeddings else 2
    one_expert = expert_bytes(args, spec, dense_bytes)
    plan = MemoryPlan(
        budget=budget,
        embeddings=(heads * args.vocab_size * D + D) * dense_bytes,
        attention=L * args.attention_params * dense_bytes,
        norms_and_routers=L * (2 * D + E * D) * dense_bytes,
        kv_cache=kv_cache_bytes(args, ctx, dense_bytes),
        workspace=workspace_bytes(args, ctx, dense_bytes),
        cuda_context=CUDA_CONTEXT_BYTES,
        allocator_slack=int(budget * SLACK_FRACTION),
        expert_bytes=one_expert,
        experts_total=L * E,
        slots_per_layer=0,
        experts_on_device=0,
        offloaded=True,
        fits=False,
        minimum_budget=0,
    )
    need = plan.resident - plan.allocator_slack + L * args.num_experts_per_tok * one_expert
    plan.minimum_budget = int(need / (1 - SLACK_FRACTION)) + 1
    k = min(E, max(budget - plan.resident, 0) // (L * one_expert))
    if k >= args.num_experts_per_tok:
        plan.slots_per_layer = int(k)
        plan.experts_on_device = int(k) * L
        plan.offloaded = k < E
        plan.fits = True
    return plan


def require_fit(plan: MemoryPlan, top_k: int, ctx: int) -> MemoryPlan:
    """Refuse a budget that cannot hold top-k expert slots per layer, naming the minimum."""
    if not plan.fits:
        raise UserError(
            f"a GPU budget of {plan.budget / 2**30:.2f} GiB cannot hold {top_k} expert slots per layer "
            f"next to the resident weights and a {ctx}-token KV cache",
            hint=f"the minimum is {plan.minimum_budget / 2**30:.2f} GiB: raise --gpu-mem, lower the context, or use fewer bits",
        )
    return plan
