"""Expert-cache simulator (`mixtral info --trace`): a routing trace replayed through cache policies,
counting the hits and misses each would have had and so the bytes it would copy to the device.

Plain Python, no torch, no weights. The replay asks for experts exactly as `model.SparseMoeBlock`
asks its provider (`requests`) and handles each request exactly as `experts.ExpertCache.run` does
(`replay`): experts already resident first, then copies of the missing ones into free or evicted
slots, an expert the request still needs never evicted, a slot free to take as soon as the
request has used its expert. Only where a miss goes differs by
policy:

- `PerLayerLRU` is today's engine: K slots in every layer (with a pool that is not a multiple of the
  layer count, quotas that differ by at most one), each layer its own LRU. With K per layer its
  counts equal the engine's `--experts-in-gpu K --no-prefetch --cpu-experts never`.
- `GlobalLRU`: one pool of N slots across all layers, least recently used out. Decode visits the
  layers in order, so with N below layers x top-k every expert is evicted just before its layer
  comes round again: a layer-cyclic pattern gets no hits at all.
- `FarthestLayer`: one pool of N slots; a miss evicts from the layer whose turn comes last (the
  current layer's idle experts, then the layer before it, and so on round the cycle; LRU within a
  layer). That is Belady's choice when every layer is visited once a cycle: the experts of the
  layers coming next stay, so even a pool far below layers x top-k keeps hitting.

Not simulated: speculative prefetch (its guesses come from hidden states a trace does not hold) and
misses computed on the CPU (`--cpu-experts`), both of which change what is resident.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

from .trace import PHASES, Trace

Request = tuple[str, int, list[int], list[int]]  # phase, layer, expert ids in request order, uses of each


class PerLayerLRU:
    """Per-layer slots: `quotas[L]` for layer L, each layer an LRU of its own."""

    name = "per-layer-lru"

    def __init__(self, quotas: Sequence[int]) -> None:
        if min(quotas) < 1:
            raise ValueError("every layer needs at least one slot")
        self.quotas = list(quotas)
        self.lru: list[OrderedDict[int, None]] = [OrderedDict() for _ in quotas]  # oldest first

    @classmethod
    def for_pool(cls, slots: int, layers: int) -> PerLayerLRU:
        """`slots` spread over `layers` as evenly as possible (the first layers get the remainder)."""
        return cls([slots // layers + (L < slots % layers) for L in range(layers)])

    def holds(self, layer: int, eid: int) -> bool:
        return eid in self.lru[layer]

    def touch(self, layer: int, eid: int) -> None:
        self.lru[layer].move_to_end(eid)

    def insert(self, layer: int, eid: int, keep: set[int]) -> bool:
        lru = self.lru[layer]
        if len(lru) >= self.quotas[layer]:
            victim = next((e for e in lru if e not in keep), None)
            if victim is None:
                return False
            del lru[victim]
        lru[eid] = None
        return True


class GlobalLRU:
    """One pool of `slots` across all layers, least recently used out."""

    name = "global-lru"

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self.lru: OrderedDict[tuple[int, int], None] = OrderedDict()  # (layer, expert), oldest first

    def holds(self, layer: int, eid: int) -> bool:
        return (layer, eid) in self.lru

    def touch(self, layer: int, eid: int) -> None:
        self.lru.move_to_end((layer, eid))

    def insert(self, layer: int, eid: int, keep: set[int]) -> bool:
        if len(self.lru) >= self.slots:
            victim = next((k for k in self.lru if not (k[0] == layer and k[1] in keep)), None)
            if victim is None:
                return False
            del self.lru[victim]
        self.lru[(layer, eid)] = None
        return True


class FarthestLayer:
    """One pool of `slots` across `layers` layers; a miss at layer L evicts from L's idle experts,
    then from L-1, L-2, ... round to L+1 (the layer whose turn is next goes last), LRU within a layer."""

    name = "farthest-layer"

    def __init__(self, slots: int, layers: int) -> None:
        self.slots, self.held = slots, 0
        self.lru: list[OrderedDict[int, None]] = [OrderedDict() for _ in range(layers)]

    def holds(self, layer: int, eid: int) -> bool:
        return eid in self.lru[layer]

    def touch(self, layer: int, eid: int) -> None:
        self.lru[layer].move_to_end(eid)

    def insert(self, layer: int, eid: int, keep: set[int]) -> bool:
        if self.held >= self.slots:
            n = len(self.lru)
            found = next(((lru, e) for lru in (self.lru[(layer - d) % n] for d in range(n))
                          for e in lru if lru is not self.lru[layer] or e not in keep), None)
            if found is None:
                return False
            del found[0][found[1]]
            self.held -= 1
        self.lru[layer][eid] = None
        self.held += 1
        return True


Policy = PerLayerLRU | GlobalLRU | FarthestLayer
POLICIES = (PerLayerLRU.name, GlobalLRU.name, FarthestLayer.name)


def make_policy(name: str, slots: int, layers: int) -> Policy:
    """The policy `name` with a pool of `slots` slots over `layers` layers."""
    if name == PerLayerLRU.name:
        return PerLayerLRU.for_pool(slots, layers)
    if name == GlobalLRU.name:
        return GlobalLRU(slots)
    if name == FarthestLayer.name:
        return FarthestLayer(slots, layers)
    raise ValueError(f"unknown policy {name!r}")


def requests(trace: Trace) -> list[Request]:
    """What the MoE blocks ask their provider for, pass by pass and layer by layer, as
    `SparseMoeBlock.forward` does: for one token, its experts in routing order, one use each; for
    several, each selected expert once in id order, with the number of its (token, choice) pairs."""
    out: list[Request] = []
    for p in trace.passes:
        for L in range(trace.header.num_layers):
            if len(p.tokens) == 1:
                ids = p.experts[0][L]
                out.append((p.phase, L, list(ids), [1] * len(ids)))
                continue
            counts: dict[int, int] = {}
            for per_layer in p.experts:
                for e in per_layer[L]:
                    counts[e] = counts.get(e, 0) + 1
            used = sorted(counts)
            out.append((p.phase, L, used, [counts[e] for e in used]))
    return out


def replay(policy: Policy, layer: int, expert_ids: list[int]) -> int:
    """One request, as `ExpertCache.run` and its hand-out serve it; returns the misses (experts that had
    to be copied in). Copies of the missing experts start at once, as far as slots can be taken
    without evicting an expert the request needs (for `FarthestLayer` this decides the victim: the
    request's own experts are not idle yet); then the resident experts are used, then the copied
    ones. A copy that found no slot at first is made at its turn (the engine makes it as soon as a
    used expert frees a slot: the same victim, since the experts used in between are more recent);
    by then every expert before it in the request is used and so a victim exists."""
    keep = set(expert_ids)  # not evicted until this request has used them
    missing = [e for e in expert_ids if not policy.holds(layer, e)]
    order = [e for e in expert_ids if policy.holds(layer, e)] + missing
    waiting = list(missing)
    while waiting and policy.insert(layer, waiting[0], keep):
        waiting.pop(0)
    for eid in order:
        if eid in waiting and not policy.insert(layer, eid, keep):
            raise RuntimeError(f"internal error: no slot for expert {eid} of layer {layer}")
        policy.touch(layer, eid)
        keep.discard(eid)
    return len(missing)


@dataclass
class Counts:
    tokens: int = 0
    uses: int = 0  # (token, selected expert) pairs
    hits: int = 0
    misses: int = 0

    @property
    def hit_rate(self) -> float | None:
        return self.hits / self.uses if self.uses else None

    def misses_per_token(self) -> float | None:
        return self.misses / self.tokens if self.tokens else None


@dataclass
class SimResult:
    policy: str
    slots: int  # the pool: all layers together
    by_phase: dict[str, Counts] = field(default_factory=lambda: {p: Counts() for p in PHASES})

    def as_dict(self, expert_bytes: int, layers: int) -> dict:
        def phase(c: Counts) -> dict:
            per_token = c.misses_per_token()
            return {"tokens": c.tokens, "uses": c.uses, "hits": c.hits, "misses": c.misses, "hit_rate": c.hit_rate,
                    "bytes_per_token": None if per_token is None else per_token * expert_bytes}

        return {"policy": self.policy, "slots": self.slots,
                "slots_per_layer": self.slots // layers if self.slots % layers == 0 else None,
                "expert_bytes": expert_bytes} | {p: phase(c) for p, c in self.by_phase.items()}


def simulate(trace: Trace, policy_name: str, slots: int, calls: list[Request] | None = None) -> SimResult:
    """Replay `trace` (or its `requests`, computed once for many runs) through a fresh, empty cache."""
    h = trace.header
    policy = make_policy(policy_name, slots, h.num_layers)
    result = SimResult(policy_name, slots)
    for p in trace.passes:
        result.by_phase[p.phase].tokens += len(p.tokens)
    for phase, layer, ids, uses in requests(trace) if calls is None else calls:
        c = result.by_phase[phase]
        misses = replay(policy, layer, ids)
        c.uses += sum(uses)
        c.misses += misses
        c.hits += sum(uses) - misses
    return result
