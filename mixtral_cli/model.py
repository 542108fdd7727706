"""The whole Mixtral forward pass, read top-down.

RMSNorm, rotary embeddings, grouped-query attention over a preallocated KV cache, the router and
the sparse MoE block, the decoder layer and the transformer. No I/O, no device policy, no sampling.
Module attribute names follow the Hub checkpoint keys so weights load by name.

The MoE block never owns its experts: it asks an ``ExpertProvider`` for them, so whether an expert
is resident, quantized, or copied in from host memory is not the model's business.

Shape legend: T tokens in this call, S cached positions, D hidden, H query heads, K kv heads,
Hd head dim, E experts, A active experts per token, I expert FFN width, V vocab.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelArgs


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32, scale in the compute dtype (as the reference implementation does).
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [T, Hd] for the given absolute positions (half-split convention)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim))
    freqs = positions.float()[:, None] * inv_freq[None, :]  # [T, Hd/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [T, Hd]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x [heads, T, Hd]; cos/sin [T, Hd]
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class KVCache(nn.Module):
    """Static per-layer cache: keys and values for positions [0, max_len)."""

    def __init__(self, max_len: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype, device) -> None:
        super().__init__()
        shape = (n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, pos: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [K, T, Hd] at positions pos..pos+T; return all keys/values up to pos+T."""
        end = pos + k.shape[1]
        self.k[:, pos:end] = k
        self.v[:, pos:end] = v
        return self.k[:, :end], self.v[:, :end]


def attention_mask(pos: int, n_new: int, sliding_window: int | None, device) -> torch.Tensor | None:
    """Boolean [T, S] mask (True = may attend) for queries pos..pos+T over keys 0..pos+T.

    None when plain causal attention over everything cached is exact (single decode step, no window).
    """
    total = pos + n_new
    if n_new == 1 and (sliding_window is None or total <= sliding_window):
        return None
    q_pos = torch.arange(pos, total, device=device)[:, None]
    k_pos = torch.arange(total, device=device)[None, :]
    mask = k_pos <= q_pos
    if sliding_window is not None:
        mask &= (q_pos - k_pos) < sliding_window
    return mask


class Attention(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = args.num_attention_heads, args.num_key_value_heads, args.head_dim
        D, Hd = args.hidden_size, args.head_dim
        self.q_proj = nn.Linear(D, self.n_heads * Hd, bias=False)
        self.k_proj = nn.Linear(D, self.n_kv * Hd, bias=False)
        self.v_proj = nn.Linear(D, self.n_kv * Hd, bias=False)
        self.o_proj = nn.Linear(self.n_heads * Hd, D, bias=False)

    def forward(
        self, x: torch.Tensor, pos: int, cache: KVCache, rope: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        T = x.shape[0]
        q = self.q_proj(x).view(T, self.n_heads, self.head_dim).transpose(0, 1)  # [H, T, Hd]
        k = self.k_proj(x).view(T, self.n_kv, self.head_dim).transpose(0, 1)  # [K, T, Hd]
        v = self.v_proj(x).view(T, self.n_kv, self.head_dim).transpose(0, 1)  # [K, T, Hd]
        cos, sin = rope
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        keys, values = cache.update(pos, k, v)  # [K, S, Hd]
        if mask is None:
            out = F.scaled_dot_product_attention(q, keys, values, is_causal=(T > 1 and pos == 0), enable_gqa=True)
        else:
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)
        return self.o_proj(out.transpose(0, 1).reshape(T, self.n_heads * self.head_dim))  # [T, D]


class Expert(nn.Module):
    """SwiGLU FFN: w2(silu(w1 x) * w3 x). w1/w3: D->I, w2: I->D (dense or quantized linears)."""

    def __init__(self, w1: nn.Module, w2: nn.Module, w3: nn.Module) -> None:
        super().__init__()
        self.w1, self.w2, self.w3 = w1, w2, w3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


ExpertFn = Callable[[torch.Tensor], torch.Tensor]


class ExpertProvider(Protocol):
    """Where experts live. The MoE block asks for the experts it needs and uses them in the given order."""

    prefetch_enabled: bool

    def run(self, layer: int, expert_ids: Sequence[int], uses: Sequence[int]) -> Iterator[tuple[int, ExpertFn]]:
        """Yield (expert id, callable) for each requested id, in an order of the provider's choosing.
        `uses[i]` is how many (token, choice) pairs expert_ids[i] serves in this call. An expert stays
        usable (never evicted) until the iterator advances past it."""
        ...

    def prefetch(self, layer: int, expert_ids: Sequence[int]) -> None:
        """Hint: these experts of `layer` will probably be needed soon."""
        ...

    def reset_stats(self) -> None:
        """Zero the use counters (`stats`)."""
        ...


def route(gate: nn.Linear, x: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Router: fp32 softmax over E logits, top-k, renormalised. Returns weights [T, A] fp32, ids [T, A]."""
    probs = F.softmax(gate(x).float(), dim=-1)  # [T, E]
    weights, ids = torch.topk(probs, top_k, dim=-1)  # [T, A]
    return weights / weights.sum(dim=-1, keepdim=True), ids


class SparseMoeBlock(nn.Module):
    def __init__(self, args: ModelArgs, layer: int, experts: ExpertProvider) -> None:
        super().__init__()
        self.layer = layer
        self.top_k = args.num_experts_per_tok
        self.gate = nn.Linear(args.hidden_size, args.num_local_experts, bias=False)
        self.provider = experts  # a plain object, not a submodule: experts are loaded and placed by it

    def forward(self, x: torch.Tensor, next_gate: nn.Linear | None = None) -> torch.Tensor:
        weights, ids = route(self.gate, x, self.top_k)  # [T, A]
        if next_gate is not None and self.provider.prefetch_enabled:
            # Speculate: the next layer's router applied to this layer's hidden state of the newest token.
            _, guess = route(next_gate, x[-1:], self.top_k)
            self.provider.prefetch(self.layer + 1, guess[0].tolist())
        if x.shape[0] == 1:
            return self._decode(x, weights[0], ids[0].tolist())
        return self._prefill(x, weights, ids)

    def _decode(self, x: torch.Tensor, weights: torch.Tensor, ids: list[int]) -> torch.Tensor:
        # One token: touch only its A selected experts.
        out = torch.zeros_like(x)
        slot_of = {eid: a for a, eid in enumerate(ids)}
        for eid, expert in self.provider.run(self.layer, ids, [1] * len(ids)):
            out += (expert(x) * weights[slot_of[eid]]).to(x.dtype)
        return out

    def _prefill(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        # Many tokens: group the (token, choice) pairs by expert and run each selected expert once.
        T, A = ids.shape
        flat_ids = ids.flatten()  # [T*A]
        order = torch.argsort(flat_ids, stable=True)
        counts = torch.bincount(flat_ids, minlength=self.gate.out_features).tolist()
        starts = [0]
        for c in counts:
            starts.append(starts[-1] + c)
        token_of = order // A  # [T*A], token index of each sorted pair
        pair_weight = weights.flatten()[order]  # [T*A] fp32
        out = torch.zeros_like(x)
        used = [e for e, c in enumerate(counts) if c]
        for eid, expert in self.provider.run(self.layer, used, [counts[e] for e in used]):
            sl = slice(starts[eid], starts[eid + 1])
            tokens = token_of[sl]
            y = expert(x[tokens]) * pair_weight[sl, None]  # [n, D]
            out.index_add_(0, tokens, y.to(x.dtype))
        return out


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer: int, experts: ExpertProvider) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = Attention(args)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.block_sparse_moe = SparseMoeBlock(args, layer, experts)

    def forward(
        self, h: torch.Tensor, pos: int, cache: KVCache, rope: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None, next_gate: nn.Linear | None,
    ) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), pos, cache, rope, mask)
        return h + self.block_sparse_moe(self.post_attention_layernorm(h), next_gate)


class MixtralModel(nn.Module):
    def __init__(self, args: ModelArgs, experts: ExpertProvider) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(args, i, experts) for i in range(args.num_hidden_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)


class Mixtral(nn.Module):
    """Batch-1 causal LM with a static KV cache of `max_len` positions."""

    def __init__(self, args: ModelArgs, experts: ExpertProvider) -> None:
        super().__init__()
        self.args = args
        self.experts = experts
        self.model = MixtralModel(args, experts)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        self.caches: list[KVCache] = []

    def setup_cache(self, max_len: int) -> None:
        """(Re)allocate the KV cache for `max_len` positions in the embedding's dtype and device."""
        w = self.model.embed_tokens.weight
        a = self.args
        self.caches = [KVCache(max_len, a.num_key_value_heads, a.head_dim, w.dtype, w.device) for _ in range(a.num_hidden_layers)]

    @property
    def max_len(self) -> int:
        return self.caches[0].k.shape[1] if self.caches else 0

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, pos: int, last_only: bool = False) -> torch.Tensor:
        """tokens [T] at positions pos..pos+T -> fp32 logits [T, V] (or [1, V] with last_only)."""
        T = tokens.shape[0]
        if pos + T > self.max_len:
            raise ValueError(f"positions up to {pos + T} exceed the KV cache ({self.max_len})")
        h = self.model.embed_tokens(tokens)  # [T, D]
        positions = torch.arange(pos, pos + T, device=tokens.device)
        rope = rope_cos_sin(positions, self.args.head_dim, self.args.rope_theta, h.dtype)
        mask = attention_mask(pos, T, self.args.sliding_window, tokens.device)
        layers = self.model.layers
        for i, layer in enumerate(layers):
            next_gate = layers[i + 1].block_sparse_moe.gate if i + 1 < len(layers) else None
            h = layer(h, pos, self.caches[i], rope, mask, next_gate)
        if last_only:
            h = h[-1:]
        return self.lm_head(self.model.norm(h)).float()  # [T, V]
