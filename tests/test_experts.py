"""Expert offloading: the LRU cache, prefetch and store, against the all-resident model."""

from __future__ import annotations

import pytest
import torch

from mixtral_cli.experts import ExpertCache, ExpertLayout, ExpertStore
from mixtral_cli.generate import Completion, GenerationConfig, SamplingConfig, Session
from mixtral_cli.runtime import RuntimeOptions, load_engine

CPU = torch.device("cpu")


def greedy(engine, prompt: list[int], n: int = 16):
    engine.model.experts.reset_stats()
    cfg = GenerationConfig(max_tokens=n, sampling=SamplingConfig(temperature=0))
    completion = Completion(Session(engine.model), engine.tokenizer, prompt, cfg)
    return list(completion.tokens()), engine.model.experts.stats


PROMPT = [1, 415, 5565, 302, 4843, 349, 264, 19555, 7540, 302, 9254, 28723]


@pytest.fixture(scope="module")
def resident_tokens(engine_fp32):
    engine_fp32.model.setup_cache(256)
    tokens, stats = greedy(engine_fp32, PROMPT)
    return tokens


@pytest.mark.parametrize("slots", [2, 3, 5, 7, 8])
@pytest.mark.parametrize("prefetch", [True, False])
def test_offloaded_generation_identical_to_resident(tiny_ckpt, resident_tokens, slots, prefetch):
    eng = load_engine(tiny_ckpt, RuntimeOptions(device="cpu", dtype="float32", ctx_size=64, experts_in_gpu=slots,
                                                prefetch=prefetch))
    tokens, stats = greedy(eng, PROMPT)
    assert tokens == resident_tokens
    args = eng.args
    processed = len(PROMPT) + len(tokens) - 1  # the last sampled token is never fed back
    assert stats.hits + stats.misses == args.num_hidden_layers * args.num_experts_per_tok * processed
    assert stats.slots_per_layer == slots
    if slots < args.num_local_experts:
        assert isinstance(eng.model.experts, ExpertCache)
        assert stats.misses > 0
        assert stats.bytes_to_device == eng.model.experts.store.layout.nbytes * (stats.misses + stats.prefetches)
        assert stats.prefetch_hits <= stats.prefetches
        assert (stats.prefetches > 0) == prefetch


def test_slots_outside_range_are_refused(tiny_ckpt):
    from mixtral_cli.errors import UserError

    for k in (1, 9):
        with pytest.raises(UserError, match="experts-in-gpu"):
            load_engine(tiny_ckpt, RuntimeOptions(device="cpu", experts_in_gpu=k))


# -- the cache on its own, with a scripted routing sequence ------------------------------------
def tiny_cache(slots: int, n_experts: int = 6, n_layers: int = 2, prefetch: bool = True) -> ExpertCache:
    def weights(layer: int, e: int):
        # each expert's w1 carries its identity so a slot's content can be checked
        w1 = torch.full((4, 2), float(100 * layer + e))
        return [w1, torch.zeros(2, 4), torch.zeros(4, 2)]

    store = ExpertStore(ExpertLayout(weights(0, 0)), n_layers, n_experts, pin=False)
    for L in range(n_layers):
        for e in range(n_experts):
            store.put(L, e, weights(L, e))
    return ExpertCache(store, slots, CPU, prefetch=prefetch)


def use(cache: ExpertCache, layer: int, ids: list[int]) -> list[int]:
    seen = []
    for eid, expert in cache.run(layer, ids, [1] * len(ids)):
        assert float(expert.w1.weight[0, 0]) == 100 * layer + eid  # the slot holds that expert's weights
        seen.append(eid)
    return seen


def test_lru_order_is_exact_on_a_scripted_sequence():
    cache = tiny_cache(slots=3)
    # Resident experts run first (missing ones copy meanwhile); eviction takes the least recently
    # used expert that the current call does not need.
    script = [[0, 1], [2, 0], [3, 1], [0, 4], [4, 2]]
    expected_order = [[0, 1], [0, 2], [1, 3], [0, 4], [4, 2]]
    expected_lru = [[0, 1], [1, 0, 2], [2, 1, 3], [3, 0, 4], [0, 4, 2]]
    expected_misses = [2, 1, 1, 2, 1]
    misses = 0
    for ids, order, lru, new in zip(script, expected_order, expected_lru, expected_misses, strict=True):
        assert use(cache, 0, ids) == order
        misses += new
        assert cache.stats.misses == misses
        assert cache.resident(0) == lru
    assert cache.stats.hits + cache.stats.misses == sum(len(s) for s in script)


def test_lru_evicts_least_recently_used():
    cache = tiny_cache(slots=3)
    use(cache, 0, [0, 1])
    use(cache, 0, [2])
    use(cache, 0, [0])  # 1 is now the oldest
    use(cache, 0, [3])
    assert 1 not in cache.resident(0) and set(cache.resident(0)) == {0, 2, 3}


def test_expert_in_use_is_never_evicted():
    cache = tiny_cache(slots=2, prefetch=True)
    use(cache, 0, [0, 1])
    it = cache.run(0, [2, 3], [1, 1])
    eid, expert = next(it)  # 2 is in use, 3 is needed next
    cache.prefetch(0, [4, 5])  # a hint for the same layer may not push them out
    assert {2, 3} <= set(cache.resident(0)) | {eid}
    assert float(expert.w1.weight[0, 0]) == eid
    assert [e for e, _ in it] == [3]


def test_more_experts_than_slots_in_one_call():
    """Prefill may need more distinct experts than slots: each is loaded as an earlier one finishes."""
    cache = tiny_cache(slots=2, n_experts=6)
    assert sorted(use(cache, 1, [0, 1, 2, 3, 4, 5])) == [0, 1, 2, 3, 4, 5]
    assert cache.stats.misses == 6


def test_prefetch_hits_are_counted_once():
    cache = tiny_cache(slots=3)
    cache.prefetch(1, [4, 5])
    assert cache.stats.prefetches == 2 and set(cache.resident(1)) == {4, 5}
    use(cache, 1, [4, 0])
    use(cache, 1, [4, 5])
    assert cache.stats.prefetch_hits == 2
    assert cache.stats.misses == 1  # only expert 0
    cache.prefetch(1, [4])  # already resident: nothing to copy
    assert cache.stats.prefetches == 2


def test_disabled_prefetch_moves_nothing():
    cache = tiny_cache(slots=3, prefetch=False)
    cache.prefetch(0, [1, 2])
    assert cache.resident(0) == [] and cache.stats.bytes_to_device == 0


def test_reset_forgets_earlier_prefetches():
    cache = tiny_cache(slots=3)
    cache.prefetch(0, [1])
    cache.reset_stats()
    use(cache, 0, [1])
    assert cache.stats.prefetch_hits == 0 and cache.stats.prefetches == 0 and cache.stats.hits == 1
