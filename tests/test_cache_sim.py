"""The expert-cache simulator: hit counts worked out by hand for each policy, the per-layer LRU step
for step against the engine's `ExpertCache`, and `info --trace` against `run --json`'s counters."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from test_cli import assert_user_error, mixtral
from test_experts import tiny_cache
from test_trace import write_lines

from mixtral_cli.engine.cache_sim import POLICIES, PerLayerLRU, replay, requests, simulate
from mixtral_cli.engine.trace import Pass, Trace, TraceHeader


def decode_trace(layers: int, experts: int, steps: list[list[list[int]]], top_k: int = 2) -> Trace:
    """A trace of one decode pass per step; `steps[t][L]` is token t's experts at layer L."""
    passes = [Pass("decode", t, [0], [per_layer]) for t, per_layer in enumerate(steps)]
    return Trace(Path("hand"), TraceHeader("hand", layers, experts, top_k), passes)


def hits_misses(trace: Trace, policy: str, slots: int, phase: str = "decode") -> tuple[int, int]:
    c = simulate(trace, policy, slots).by_phase[phase]
    assert c.hits + c.misses == c.uses
    return c.hits, c.misses


def test_per_layer_lru_worked_out_by_hand():
    """One layer, 2 slots. [1, 2]: 1 hits, 2 evicts 0 (the LRU). [0, 1]: 1 hits; 0 cannot evict the
    busy 1, so it evicts 2. [3, 0]: 0 hits, 3 evicts 1. 3 hits, 5 misses, and 3 was used last."""
    trace = decode_trace(1, 4, [[[0, 1]], [[1, 2]], [[0, 1]], [[3, 0]]])
    assert hits_misses(trace, "per-layer-lru", 2) == (3, 5)
    policy = PerLayerLRU([2])
    for _, layer, ids, _ in requests(trace):
        replay(policy, layer, ids)
    assert list(policy.lru[0]) == [0, 3]  # oldest first


def test_a_prefill_needing_more_experts_than_slots():
    """3 tokens use experts 0, 1, 2, 3 (6 uses) with 2 slots: 4 misses, 2 hits; each slot is refilled as
    soon as its expert has been used, so 2 and 3 stay. The step after, [3, 0]: 3 hits, 0 misses."""
    prompt = Pass("prefill", 0, [5, 6, 7], [[[0, 1]], [[2, 3]], [[0, 2]]])
    step = Pass("decode", 3, [8], [[[3, 0]]])
    trace = Trace(Path("hand"), TraceHeader("hand", 1, 4, 2), [prompt, step])
    assert requests(trace) == [("prefill", 0, [0, 1, 2, 3], [2, 1, 2, 1]), ("decode", 0, [3, 0], [1, 1])]
    assert hits_misses(trace, "per-layer-lru", 2, "prefill") == (2, 4)
    assert hits_misses(trace, "per-layer-lru", 2, "decode") == (1, 1)


# every layer always routes to its experts 0 and 1: 3 layers x top-2 = 6 experts cycle through the pool
CYCLE = decode_trace(3, 4, [[[0, 1]] * 3] * 4)


def test_global_lru_thrashes_on_the_layer_cycle_and_the_layer_aware_policies_do_not():
    """4 slots for 6 experts. Global LRU: each layer's experts are the oldest when it comes round: 0 of
    24. Farthest-layer evicts the layer just used: token 1 keeps layers 0 and 2, token 2 hits them (4)
    and keeps 1 and 2... 0 + 4 + 2 + 4 = 10. Per-layer quotas 2, 1, 1: layer 0 hits both from token 2
    on (6), layers 1 and 2 hit the expert they used last (3 each): 12."""
    assert hits_misses(CYCLE, "global-lru", 4) == (0, 24)
    assert hits_misses(CYCLE, "farthest-layer", 4) == (10, 14)
    assert hits_misses(CYCLE, "per-layer-lru", 4) == (12, 12)
    assert PerLayerLRU.for_pool(4, 3).quotas == [2, 1, 1] and PerLayerLRU.for_pool(6, 3).quotas == [2, 2, 2]
    for policy in POLICIES:  # 6 slots hold the cycle: only the first token misses
        assert hits_misses(CYCLE, policy, 6) == (18, 6), policy


def test_global_lru_and_farthest_layer_worked_out_by_hand():
    """2 layers, 3 slots. Token 1 fills them and layer 1's second expert evicts (0, 0). Token 2: layer 0
    needs 0 and 2, both missing; layer 1's 1 hits, its 3 misses. Global LRU evicts (0, 1) then (1, 0)
    for layer 0 and (0, 0) for layer 1's 3 (the busy (1, 1) is kept); farthest-layer evicts layer 0's
    idle (0, 1), then (1, 0), then layer 0's oldest: 1 hit, 7 misses either way. Below one slot per
    layer (1 slot for 2 layers) farthest-layer still runs: every use misses."""
    trace = decode_trace(2, 4, [[[0, 1], [0, 1]], [[0, 2], [1, 3]]])
    assert hits_misses(trace, "global-lru", 3) == (1, 7)
    assert hits_misses(trace, "farthest-layer", 3) == (1, 7)
    assert hits_misses(trace, "farthest-layer", 1) == (0, 8)
    with pytest.raises(ValueError, match="at least one slot"):
        simulate(trace, "per-layer-lru", 1)


@pytest.mark.parametrize("slots", [1, 2, 3, 5, 6])
def test_per_layer_lru_steps_as_the_engine_cache(slots):
    """Random requests (one token's experts, or a prefill's with their use counts) through the real
    `ExpertCache` (CPU slots, no prefetch) and the simulator: the same residents in the same LRU order
    after every request, and the same counters."""
    rng = random.Random(slots)
    cache = tiny_cache(slots, n_experts=6, n_layers=2, prefetch=False)
    policy = PerLayerLRU([slots, slots])
    hits = misses = 0
    for _ in range(200):
        layer = rng.randrange(2)
        if rng.random() < 0.7:
            ids, uses = rng.sample(range(6), 2), [1, 1]
        else:
            ids = sorted(rng.sample(range(6), rng.randint(2, 6)))
            uses = [rng.randint(1, 4) for _ in ids]
        list(cache.run(layer, ids, uses))
        m = replay(policy, layer, ids)
        misses += m
        hits += sum(uses) - m
        assert cache.resident(layer) == list(policy.lru[layer])
    assert (cache.stats.hits, cache.stats.misses) == (hits, misses)


@pytest.mark.parametrize("slots", [2, 5])
def test_info_trace_per_layer_lru_equals_the_engine_counters(tiny_ckpt, tmp_path, slots):
    path = tmp_path / "run.trace"
    proc = mixtral("run", "-m", str(tiny_ckpt), "--raw", "--json", "--temp", "0", "-n", "8", "--device", "cpu",
                   "--experts-in-gpu", str(slots), "--no-prefetch", "--cpu-experts", "never", "--trace", str(path),
                   "The quick brown fox jumps over the lazy dog")
    assert proc.returncode == 0, proc.stderr
    engine = json.loads(proc.stdout)["expert_cache"]
    proc = mixtral("info", str(tiny_ckpt), "--trace", str(path), "--slots", str(slots), "--json")
    assert proc.returncode == 0, proc.stderr
    sim = json.loads(proc.stdout)["cache_simulation"]
    assert sim["not_simulated"] == ["prefetch", "cpu_experts"]
    (ours,) = [r for r in sim["results"] if r["policy"] == "per-layer-lru"]
    assert (ours["slots"], ours["slots_per_layer"]) == (3 * slots, slots)
    hits = ours["prefill"]["hits"] + ours["decode"]["hits"]
    misses = ours["prefill"]["misses"] + ours["decode"]["misses"]
    assert (hits, misses) == (engine["hits"], engine["misses"]) and misses > 0
    assert misses * sim["expert_bytes"] == engine["bytes_to_device"]
    decode = ours["decode"]
    assert decode["bytes_per_token"] == decode["misses"] / decode["tokens"] * sim["expert_bytes"]
    assert {r["policy"] for r in sim["results"]} == set(POLICIES)


STEPS = [[[0, 1], [2, 3], [4, 5]], [[0, 2], [2, 3], [5, 6]], [[1, 0], [7, 3], [4, 5]]]
TINY_LINES = [{"format": "mixtral-routing-trace", "version": 1, "model": "tiny", "num_layers": 3, "num_experts": 8,
               "top_k": 2},
              *({"phase": "decode", "pos": t, "tokens": [9], "experts": [s]} for t, s in enumerate(STEPS)),
              {"end": {"passes": 3, "tokens": 3}}]


def test_info_trace_default_sizes_and_the_budget_pool(tiny_ckpt, tmp_path):
    """Without --slots: 3 x K for K = 2..8. With a budget that leaves 10.5 slots beside the resident
    parts, the shared pool gets 10 (3 per layer for the per-layer cache)."""
    path = write_lines(tmp_path / "t.trace", *TINY_LINES)
    data = json.loads(mixtral("info", str(tiny_ckpt), "--trace", str(path), "--json").stdout)
    sizes = sorted({r["slots"] for r in data["cache_simulation"]["results"]})
    assert sizes == [6, 9, 12, 15, 18, 21, 24] and data["cache_simulation"]["budget_slots"] == 24
    plan = data["plan"]
    fixed, one = plan["resident"] - plan["allocator_slack"], plan["expert_bytes"]
    budget = int((fixed + 10.5 * one) / 0.95)
    proc = mixtral("info", str(tiny_ckpt), "--trace", str(path), "--gpu-mem", f"{budget}B", "--json")
    sim = json.loads(proc.stdout)["cache_simulation"]
    assert sim["budget_slots"] == 10 and 10 in {r["slots"] for r in sim["results"]}
    table = mixtral("info", str(tiny_ckpt), "--trace", str(path), "--gpu-mem", f"{budget}B", "--pool", "10",
                    "--pool", "2").stdout
    assert "10 budget" in table and "decode tokens" in table
    two = [line for line in table.splitlines() if line.strip("│ ").startswith("2 ")]
    assert two and all(row.count("%") == 2 for row in two)  # no per-layer cache below a slot per layer


def test_info_trace_refusals(tiny_ckpt, tmp_path):
    other = write_lines(tmp_path / "other.trace", {"format": "mixtral-routing-trace", "version": 1, "model": "x",
                                                   "num_layers": 2, "num_experts": 4, "top_k": 2},
                        {"end": {"passes": 0, "tokens": 0}})
    assert_user_error(mixtral("info", str(tiny_ckpt), "--trace", str(other)), "recorded with 2 layers x 4 experts")
    assert_user_error(mixtral("info", str(tiny_ckpt), "--slots", "2"), "--slots and --pool need --trace FILE")
    good = write_lines(tmp_path / "t.trace", *TINY_LINES)
    assert_user_error(mixtral("info", str(tiny_ckpt), "--trace", str(good), "--slots", "9"), "in [1, 8]")
    assert_user_error(mixtral("info", str(tiny_ckpt), "--trace", str(good), "--pool", "0"), "1 to 24 experts")
    assert_user_error(mixtral("info", str(tiny_ckpt), "--trace", str(tmp_path / "none")), "cannot read the trace")
