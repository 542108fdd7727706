"""Expert offloading: the LRU cache, prefetch and store, against the all-resident model."""

from __future__ import annotations

import pytest
import torch

from mixtral_cli.engine.experts import ExpertCache, ExpertLayout, ExpertStore, SyncTransfer
from mixtral_cli.engine.generate import Completion, Session
from mixtral_cli.engine.loader import RuntimeOptions, load_engine
from mixtral_cli.kernels.formats import quantize, spec_for_bits
from mixtral_cli.settings import GenerationConfig, SamplingConfig

CPU = torch.device("cpu")


def greedy(engine, prompt: list[int], n: int = 16):
    engine.experts.reset_stats()
    cfg = GenerationConfig(max_tokens=n, sampling=SamplingConfig(temperature=0))
    completion = Completion(Session(engine.model), engine.tokenizer, prompt, cfg)
    return list(completion.tokens()), engine.experts.stats


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
                                                prefetch=prefetch, cpu_experts="never"))
    tokens, stats = greedy(eng, PROMPT)
    assert tokens == resident_tokens
    args = eng.args
    processed = len(PROMPT) + len(tokens) - 1  # the last sampled token is never fed back
    assert stats.hits + stats.misses == args.num_hidden_layers * args.num_experts_per_tok * processed
    assert stats.slots_per_layer == slots
    if slots < args.num_local_experts:
        assert isinstance(eng.experts, ExpertCache)
        assert stats.misses > 0
        assert stats.bytes_to_device == eng.experts.store.layout.nbytes * (stats.misses + stats.prefetches)
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


def test_no_free_slot_is_a_clear_error_and_leaves_the_cache_usable(monkeypatch):
    """The MoE block hands experts back in order, so a missing expert always finds a slot; if every
    slot were still held (a caller interleaving runs of one layer), the run stops with one clear
    error instead of overwriting an expert in use, and the cache stays consistent."""
    cache = tiny_cache(slots=2, prefetch=False)
    use(cache, 0, [0, 1])
    slots = cache.layers[0]
    monkeypatch.setattr(slots, "victim", lambda keep: None)  # every slot held by an expert in use
    with pytest.raises(RuntimeError, match="no expert slot free"):
        use(cache, 0, [0, 2])
    assert slots.busy == set() and sorted(cache.resident(0)) == [0, 1]
    monkeypatch.undo()
    assert use(cache, 0, [2]) == [2] and 2 in cache.resident(0)


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


# -- the host store: one slab, exactly its bytes, pinned once -------------------------------------
class RecordingPinner:
    """Stands in for cudaHostRegister on the CPU: records what would be page-locked."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def register(self, ptr: int, nbytes: int) -> None:
        self.calls.append(("register", ptr, nbytes))

    def unregister(self, ptr: int) -> None:
        self.calls.append(("unregister", ptr))


def small_layout() -> ExpertLayout:
    # w1, w3 [4, 2] and w2 [2, 4] float32: 32 bytes each, padded to 64 -> 192 bytes per expert
    return ExpertLayout([torch.zeros(4, 2), torch.zeros(2, 4), torch.zeros(4, 2)])


def test_store_pins_exactly_its_bytes_in_one_slab():
    import mmap

    layout = small_layout()
    assert layout.nbytes == 3 * 64
    pinner = RecordingPinner()
    # 32 layers x 8 experts x 192 bytes = 49152 bytes = exactly 12 pages of 4 KiB
    store = ExpertStore(layout, 32, 8, pin=True, pinner=pinner, available=lambda: 10**12)
    assert store.nbytes() == 32 * 8 * 192 == 49152
    page = mmap.PAGESIZE
    want = -(-49152 // page) * page  # = 49152 with 4 KiB or 16 KiB pages
    assert len(pinner.calls) == 1
    op, ptr, nbytes = pinner.calls[0]
    assert op == "register" and nbytes == want == store.pinned_bytes and ptr % page == 0
    # every expert is a view into the slab at its fixed offset: nothing else was allocated
    for L in (0, 5, 31):
        for e in (0, 7):
            assert store.buffers[L][e].data_ptr() == ptr + (L * 8 + e) * 192
            assert store.buffers[L][e].numel() == 192
    store.put(3, 2, [torch.full((4, 2), 7.0), torch.ones(2, 4), torch.ones(4, 2)])
    assert float(layout.unpack(store.buffers[3][2])[0][0, 0]) == 7.0
    store.close()
    assert pinner.calls[-1] == ("unregister", ptr) and store.pinned_bytes == 0
    # a CPU store is the same slab, not pinned
    cpu = ExpertStore(layout, 2, 3, pin=False, pinner=pinner)
    assert cpu.pinned_bytes == 0 and len(pinner.calls) == 2 and cpu.slab.size >= 2 * 3 * 192


def test_store_for_8x7b_at_4_bits_pins_21_7_gib_not_32(monkeypatch):
    """Built as the loader builds it, from one expert quantized at Mixtral-8x7B's shapes. The slab's
    mapping is one page here (its size is recorded) and the RAM reading is faked, so nothing near
    21.7 GiB is allocated. The caching host allocator would have pinned a power of two per expert
    (128 MiB each, 32 GiB)."""
    import json
    import mmap
    from pathlib import Path

    from mixtral_cli.checkpoints.config import ModelArgs
    from mixtral_cli.checkpoints.layout import EXPERT_PROJS, expert_shape
    from mixtral_cli.errors import UserError
    from mixtral_cli.system import host_memory

    cfg = json.loads((Path(__file__).parent / "data" / "mixtral-8x7b-instruct-v0.1.config.json").read_text())
    args = ModelArgs.from_dict(cfg)
    spec = spec_for_bits(4)
    by_shape = {shape: quantize(torch.zeros(shape, dtype=torch.bfloat16), spec)
                for shape in {expert_shape(args, p) for p in EXPERT_PROJS}}
    layout = ExpertLayout([by_shape[expert_shape(args, p)] for p in EXPERT_PROJS])
    # per matrix: 29,360,128 codes + 917,504 scales + 14,336 second-level absmax + 4 (-> 64) offset
    assert layout.nbytes == 3 * (29_360_128 + 917_504 + 14_336 + 64) == 90_876_096

    mapped: list[int] = []

    def one_page(size: int, huge_pages: bool = False) -> mmap.mmap:
        mapped.append(size)
        return mmap.mmap(-1, mmap.PAGESIZE)

    monkeypatch.setattr(host_memory, "anonymous_mapping", one_page)
    pinner = RecordingPinner()
    store = ExpertStore(layout, args.num_hidden_layers, args.num_local_experts, pin=True, pinner=pinner,
                        available=lambda: 64 * 2**30)
    total = 23_264_280_576  # 21.67 GiB, page-aligned: pinned as is
    assert mapped == [total] and [(op, n) for op, _, n in pinner.calls] == [("register", total)]
    assert store.nbytes() == store.pinned_bytes == total
    store.close()
    with pytest.raises(UserError, match="pinned host RAM"):  # a 16 GiB machine cannot hold it
        ExpertStore(layout, args.num_hidden_layers, args.num_local_experts, pin=True, pinner=RecordingPinner(),
                    available=lambda: 16 * 2**30)
    assert len(mapped) == 1  # refused before mapping anything


def test_store_refuses_to_pin_more_than_ram_allows():
    from mixtral_cli.errors import UserError
    from mixtral_cli.system.host_memory import HOST_HEADROOM

    sample = [quantize(torch.randn(256, 128), spec_for_bits(8)), quantize(torch.randn(128, 256), spec_for_bits(8)),
              quantize(torch.randn(256, 128), spec_for_bits(8))]
    layout = ExpertLayout(sample)
    need = layout.nbytes * 4 * 8
    pinner = RecordingPinner()
    ExpertStore(layout, 4, 8, pin=True, pinner=pinner, available=lambda: need + HOST_HEADROOM).close()
    with pytest.raises(UserError) as err:
        ExpertStore(layout, 4, 8, pin=True, pinner=RecordingPinner(), available=lambda: need + HOST_HEADROOM - 1)
    msg = str(err.value)
    assert "pinned host RAM" in msg and "available" in msg and "--bits 4" in err.value.hint
    assert "\n" not in msg
    # unknown RAM (no /proc/meminfo): no refusal
    ExpertStore(layout, 4, 8, pin=True, pinner=RecordingPinner(), available=lambda: None).close()


def test_mem_available_reads_meminfo(tmp_path):
    from mixtral_cli.system.host_memory import mem_available

    f = tmp_path / "meminfo"
    f.write_text("MemTotal:       32768000 kB\nMemFree:         1000000 kB\nMemAvailable:   28000000 kB\n")
    assert mem_available(f) == 28000000 * 1024
    assert mem_available(tmp_path / "missing") is None


# -- copy order ------------------------------------------------------------------------------------
class RecordingTransfer(SyncTransfer):
    """A CPU transfer that logs every copy as ("copy", layer, expert)."""

    def __init__(self, store: ExpertStore, log: list) -> None:
        super().__init__()
        self.log = log
        self.where = {store.buffers[L][e].data_ptr(): (L, e) for L in range(store.n_layers) for e in range(store.n_experts)}

    def start(self, slot, dst, src):
        self.log.append(("copy", *self.where[src.data_ptr()]))
        super().start(slot, dst, src)


def test_demand_copies_are_issued_before_speculative_ones(tiny_ckpt):
    """Through the real model: within each MoE block, every copy of an expert the layer needs is
    issued before the speculative copies for the next layer (a wrong guess never delays a needed
    expert), and no speculative copy is issued while a needed expert still waits for a slot."""
    for slots in (2, 3):
        eng = load_engine(tiny_ckpt, RuntimeOptions(device="cpu", dtype="float32", ctx_size=64, experts_in_gpu=slots,
                                                    cpu_experts="never"))
        cache = eng.experts
        log: list = []
        cache.transfer = RecordingTransfer(cache.store, log)
        run, prefetch = cache.run, cache.prefetch

        def logged_run(layer, ids, uses, run=run, log=log):
            log.append(("run", layer))
            return run(layer, ids, uses)

        def logged_prefetch(layer, ids, prefetch=prefetch, log=log):
            log.append(("prefetch", layer))
            prefetch(layer, ids)

        cache.run, cache.prefetch = logged_run, logged_prefetch
        tokens, stats = greedy(eng, PROMPT, n=8)
        assert stats.prefetches > 0 and stats.misses > 0
        running, hinted, speculated = None, None, False
        demand = speculative = 0
        for event in log:
            if event[0] == "run":
                running, hinted, speculated = event[1], None, False
            elif event[0] == "prefetch":
                hinted = event[1]
            elif event[1] == running:  # a copy the running block needs...
                assert not speculated  # ...never after a speculative copy of the same block
                demand += 1
            else:
                assert event[1] == hinted == running + 1  # a speculative copy, for the next layer
                speculated = True
                speculative += 1
        assert demand == stats.misses and speculative == stats.prefetches


def test_prefetch_waits_while_a_needed_expert_has_no_slot():
    cache = tiny_cache(slots=2, n_experts=6)
    log: list = []
    cache.transfer = RecordingTransfer(cache.store, log)
    it = cache.run(0, [0, 1, 2, 3], [1, 1, 1, 1])  # 2 copies start now, 2 wait for a slot
    assert log == [("copy", 0, 0), ("copy", 0, 1)]
    cache.prefetch(1, [4, 5])  # would queue ahead of experts 2 and 3: ignored
    assert cache.stats.prefetches == 0 and cache.resident(1) == []
    assert [e for e, _ in it] == [0, 1, 2, 3]
    assert log[2:] == [("copy", 0, 2), ("copy", 0, 3)]
    cache.prefetch(1, [4, 5])  # nothing pending: the hint is taken
    assert cache.stats.prefetches == 2 and log[4:] == [("copy", 1, 4), ("copy", 1, 5)]


def test_run_starts_demand_copies_before_returning():
    cache = tiny_cache(slots=3)
    log: list = []
    cache.transfer = RecordingTransfer(cache.store, log)
    it = cache.run(1, [2, 4], [1, 1])
    assert log == [("copy", 1, 2), ("copy", 1, 4)]  # before anything is consumed
    cache.prefetch(0, [5])
    assert log[-1] == ("copy", 0, 5)
    assert sorted(e for e, _ in it) == [2, 4]
