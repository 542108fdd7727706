"""The whole Mixtral forward pass, read top-down.

RMSNorm, rotary embeddings, grouped-query attention over a preallocated KV cache, the router and
the sparse MoE block, the decoder layer and the transformer. No I/O, no device policy, no sampling.
Module attribute names follow the Hub checkpoint keys so weights load by name.

The MoE block never owns its experts: it asks an ``ExpertProvider`` for them, so whether an expert
is resident, quantized, or copied in from host memory is not the model's business. The model holds
the one reference to the provider; the layer loop hands it to every block on each pass, wrapped in
the ``Lookahead`` that hints the provider what the next layers will probably need. Which SDPA kernel
serves a call is torch's choice; what the planner must reserve for it is decided in ``loader``.

Shape legend: T tokens in this call, S cached positions, D hidden, H query heads, K kv heads,
Hd head dim, E experts, A active experts per token, I expert FFN width, V vocab.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoints.config import ModelArgs
from ..kernels import dispatch
from ..kernels.pointwise import apply_rope, rms_norm
from .provider import ExpertFn, ExpertProvider

if TYPE_CHECKING:
    from .trace import TraceWriter


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)  # normalised in fp32, scaled in the compute dtype


def rope_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [T, Hd] for the given absolute positions (half-split convention)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim))
    freqs = positions.float()[:, None] * inv_freq[None, :]  # [T, Hd/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [T, Hd]
    return emb.cos().to(dtype), emb.sin().to(dtype)


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

    None when SDPA's own causal mask is exact: a single decode step, or a first chunk (pos 0, where
    `is_causal`'s top-left alignment is right), and the window cuts nothing. A later prefill chunk
    (T < S) needs the explicit mask: `is_causal` would align it top-left.
    """
    total = pos + n_new
    if (n_new == 1 or pos == 0) and (sliding_window is None or total <= sliding_window):
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
        self.window = args.sliding_window

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
        if T == 1:
            # One token: the window (if any) is a contiguous range of positions, so no mask is needed.
            S = keys.shape[1]
            start = max(0, S - self.window) if self.window else 0
            out = dispatch.decode_attention(q[:, 0], keys, values, start)  # [H, Hd]
            return self.o_proj(out.reshape(1, self.n_heads * self.head_dim))
        # 4-D [1, heads, T|S, Hd]: the fused kernels (flash, memory-efficient, cuDNN; on the CPU its
        # flash kernel) take only 4-D inputs; 3-D ones fall back to the math path, which repeats K/V
        # to H heads and materialises the [H, T, S] scores in fp32.
        out = F.scaled_dot_product_attention(q[None], keys[None], values[None], attn_mask=mask,
                                             is_causal=mask is None and T > 1, enable_gqa=True)
        return self.o_proj(out[0].transpose(0, 1).reshape(T, self.n_heads * self.head_dim))  # [T, D]


class Expert(nn.Module):
    """SwiGLU FFN: w2(silu(w1 x) * w3 x). w1/w3: D->I, w2: I->D (dense or quantized linears)."""

    def __init__(self, w1: nn.Module, w2: nn.Module, w3: nn.Module) -> None:
        super().__init__()
        self.w1, self.w2, self.w3 = w1, w2, w3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def route(gate: nn.Linear, x: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Router: fp32 softmax over E logits, top-k, renormalised. Returns weights [T, A] fp32, ids [T, A]."""
    return dispatch.route(x, gate.weight, top_k)


class Lookahead:
    """The expert provider as the layer loop hands it to the MoE blocks for one pass, with speculative
    prefetch: after layer L has asked for its experts, the provider is hinted the experts that the
    routers of the next `depth` layers pick from L's input of the newest token. The hint comes after
    the request, so the copies it starts queue behind L's own; the residual stream changes little
    between layers, so the guess is often right (docs/offloading.md has the measurements).

    `trace`: where the blocks record their routing while a trace is recorded (`trace.py`), else None."""

    def __init__(self, experts: ExpertProvider, routers: Sequence[nn.Linear], top_k: int, depth: int,
                 trace: TraceWriter | None = None) -> None:
        self.experts = experts
        self.routers = routers  # every layer's, in order
        self.top_k, self.depth = top_k, depth
        self.trace = trace

    def guess(self, layer: int, newest: torch.Tensor) -> list[torch.Tensor]:
        """The ids [A] that each of the layers after `layer` would route `newest` [1, D] to (none when
        the provider does not prefetch), left on the device: the block brings them to the host with
        its own routing, in one sync."""
        if not self.experts.prefetch_enabled:
            return []
        return [route(g, newest, self.top_k)[1][0] for g in self.routers[layer + 1:layer + 1 + self.depth]]

    def run(self, layer: int, expert_ids: Sequence[int], uses: Sequence[int], guessed: Sequence[int]
            ) -> Iterator[tuple[int, ExpertFn]]:
        """The provider's `run`, then the hints: `guessed` holds `guess`'s ids on the host, A per layer."""
        experts = self.experts.run(layer, expert_ids, uses)
        A = self.top_k
        for depth in range(len(guessed) // A):
            self.experts.prefetch(layer + 1 + depth, guessed[depth * A:(depth + 1) * A])
        return experts


class SparseMoeBlock(nn.Module):
    def __init__(self, args: ModelArgs, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.top_k = args.num_experts_per_tok
        self.gate = nn.Linear(args.hidden_size, args.num_local_experts, bias=False)

    def forward(self, x: torch.Tensor, experts: Lookahead) -> torch.Tensor:
        A = self.top_k
        weights, ids = route(self.gate, x, A)  # [T, A]
        if experts.trace is not None:
            experts.trace.record(self.layer, ids.tolist())
        guesses = experts.guess(self.layer, x[-1:])  # each [A]
        if x.shape[0] == 1:
            # One token: touch only its A selected experts (one host sync for its ids and the guesses).
            picked = (torch.cat([ids[0], *guesses]) if guesses else ids[0]).tolist()
            eids = picked[:A]
            chosen = experts.run(self.layer, eids, [1] * A, guessed=picked[A:])
            return self._decode(x, weights[0], eids, chosen)
        # Many tokens: group the (token, choice) pairs by expert and run each selected expert once.
        flat_ids = ids.flatten()  # [T*A]
        E = self.gate.out_features
        picked = torch.cat([torch.bincount(flat_ids, minlength=E), *guesses]).tolist()
        counts = picked[:E]
        used = [e for e, c in enumerate(counts) if c]
        chosen = experts.run(self.layer, used, [counts[e] for e in used], guessed=picked[E:])
        return self._prefill(x, weights, flat_ids, counts, chosen)

    def _decode(self, x: torch.Tensor, weights: torch.Tensor, ids: list[int],
                experts: Iterator[tuple[int, ExpertFn]]) -> torch.Tensor:
        out = torch.zeros_like(x)
        slot_of = {eid: a for a, eid in enumerate(ids)}
        for eid, expert in experts:
            out += (expert(x) * weights[slot_of[eid]]).to(x.dtype)
        return out

    def _prefill(self, x: torch.Tensor, weights: torch.Tensor, flat_ids: torch.Tensor, counts: list[int],
                 experts: Iterator[tuple[int, ExpertFn]]) -> torch.Tensor:
        A = self.top_k
        order = torch.argsort(flat_ids, stable=True)
        starts = [0]
        for c in counts:
            starts.append(starts[-1] + c)
        token_of = order // A  # [T*A], token index of each sorted pair
        pair_weight = weights.flatten()[order]  # [T*A] fp32
        out = torch.zeros_like(x)
        for eid, expert in experts:
            sl = slice(starts[eid], starts[eid + 1])
            tokens = token_of[sl]
            y = expert(x[tokens]) * pair_weight[sl, None]  # [n, D]
            out.index_add_(0, tokens, y.to(x.dtype))
        return out


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = Attention(args)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.block_sparse_moe = SparseMoeBlock(args, layer)

    def forward(
        self, h: torch.Tensor, pos: int, cache: KVCache, rope: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None, experts: Lookahead,
    ) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), pos, cache, rope, mask)
        return h + self.block_sparse_moe(self.post_attention_layernorm(h), experts)


class MixtralModel(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(args, i) for i in range(args.num_hidden_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)


class Mixtral(nn.Module):
    """Batch-1 causal LM with a static KV cache of `max_len` positions.

    `experts`: the expert provider, held here only (a plain object, not a submodule: it loads and
    places the experts), so assigning another swaps it for every layer. `prefetch_depth`: how many
    following layers the `Lookahead` hints after each layer's request (1: the next layer only;
    docs/offloading.md has the measurements behind the choice). `trace`: the routing recorder while
    a trace is recorded (`trace.recording` sets it), else None."""

    prefetch_depth = 1

    def __init__(self, args: ModelArgs, experts: ExpertProvider) -> None:
        super().__init__()
        self.args = args
        self.experts = experts
        self.model = MixtralModel(args)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        self.caches: list[KVCache] = []
        self.trace: TraceWriter | None = None

    def setup_cache(self, max_len: int) -> None:
        """(Re)allocate the KV cache for `max_len` positions in the embedding's dtype and device."""
        w = self.model.embed_tokens.weight
        a = self.args
        self.caches = [KVCache(max_len, a.num_key_value_heads, a.head_dim, w.dtype, w.device) for _ in range(a.num_hidden_layers)]

    @property
    def max_len(self) -> int:
        return self.caches[0].k.shape[1] if self.caches else 0

    @torch.inference_mode()
    def run_layers(self, tokens: torch.Tensor, pos: int) -> torch.Tensor:
        """tokens [T] at positions pos..pos+T through every layer (filling the KV cache) -> hidden
        states [T, D] before the final norm."""
        T = tokens.shape[0]
        if pos + T > self.max_len:
            raise ValueError(f"positions up to {pos + T} exceed the KV cache ({self.max_len})")
        h = self.model.embed_tokens(tokens)  # [T, D]
        positions = torch.arange(pos, pos + T, device=tokens.device)
        rope = rope_cos_sin(positions, self.args.head_dim, self.args.rope_theta, h.dtype)
        mask = attention_mask(pos, T, self.args.sliding_window, tokens.device)
        layers = self.model.layers
        experts = Lookahead(self.experts, [layer.block_sparse_moe.gate for layer in layers],
                            self.args.num_experts_per_tok, self.prefetch_depth, self.trace)
        for i, layer in enumerate(layers):
            h = layer(h, pos, self.caches[i], rope, mask, experts)
        return h

    @torch.inference_mode()
    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Hidden states [N, D] from `run_layers` -> fp32 logits [N, V]."""
        return self.lm_head(self.model.norm(h)).float()

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, pos: int, last_only: bool = False) -> torch.Tensor:
        """tokens [T] at positions pos..pos+T -> fp32 logits [T, V] (or [1, V] with last_only), in one
        pass; `generate.Session.prefill` splits long prompts into chunks."""
        h = self.run_layers(tokens, pos)
        return self.head(h[-1:] if last_only else h)  # [T, V]
