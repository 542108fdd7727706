"""The CPU as a second expert engine: the cost model by hand, and token-identical offloaded runs."""

from __future__ import annotations

import pytest
import torch
from test_experts import PROMPT, greedy

from mixtral_cli.engine.cpu_experts import CpuExperts, ExpertCosts, assign_misses
from mixtral_cli.engine.generate import Session
from mixtral_cli.engine.loader import RuntimeOptions, load_engine
from mixtral_cli.errors import UserError


def test_assign_misses_by_hand():
    # copy 10 ms, CPU 4 ms: the CPU finishes one (4) and a second (8) before one copy (10)
    assert assign_misses(2, ExpertCosts(copy_s=0.010, cpu_s=0.004), "auto") == [True, True]
    # CPU 6 ms: first on the CPU (6 < 10); the second would end at 12 on the CPU, 10 by copy
    assert assign_misses(2, ExpertCosts(copy_s=0.010, cpu_s=0.006), "auto") == [True, False]
    # CPU slower than a copy: 6 vs 3, then 6 vs 6 (a tie copies)
    assert assign_misses(2, ExpertCosts(copy_s=0.003, cpu_s=0.006), "auto") == [False, False]
    # three misses, CPU 5, copy 7: CPU (5<7), copy (10 vs 7), CPU (10 vs 14)
    assert assign_misses(3, ExpertCosts(copy_s=0.007, cpu_s=0.005), "auto") == [True, False, True]
    assert assign_misses(3, ExpertCosts(1.0, 9.0), "always") == [True] * 3
    assert assign_misses(3, ExpertCosts(9.0, 1.0), "never") == [False] * 3
    assert assign_misses(0, ExpertCosts(1.0, 1.0), "auto") == []
    with pytest.raises(ValueError):
        assign_misses(1, ExpertCosts(1.0, 1.0), "sometimes")


@pytest.fixture(scope="module")
def resident(engine_fp32):
    engine_fp32.model.setup_cache(256)
    return greedy(engine_fp32, PROMPT)[0]


class RecordingCpuExperts(CpuExperts):
    """Records how many misses each decode call offered to the CPU engine."""

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.offered: list[int] = []

    def split(self, missing):
        self.offered.append(len(missing))
        return super().split(missing)


# cpu_for[n]: of n misses in one decode call, how many run on the CPU, worked by hand from the costs
@pytest.mark.parametrize(("mode", "costs", "cpu_for"), [
    ("always", ExpertCosts(1.0, 1.0), (0, 1, 2)),
    ("auto", ExpertCosts(copy_s=1.0, cpu_s=0.6), (0, 1, 1)),  # a second CPU pass would end at 1.2 > 1.0
    ("auto", ExpertCosts(copy_s=1.0, cpu_s=0.4), (0, 1, 2)),  # both on the CPU: 0.8 < 1.0
    ("auto", ExpertCosts(copy_s=0.2, cpu_s=1.0), (0, 0, 0)),  # every miss copied
])
def test_cpu_experts_give_resident_tokens_and_counters_add_up(tiny_ckpt, resident, mode, costs, cpu_for):
    eng = load_engine(tiny_ckpt, RuntimeOptions(device="cpu", dtype="float32", ctx_size=64, experts_in_gpu=2,
                                                cpu_experts="never"))
    cache = eng.experts
    cpu = RecordingCpuExperts(cache.store, eng.args.num_experts_per_tok, torch.float32, mode, costs)
    cache.use_cpu_experts(cpu)
    try:
        tokens, stats = greedy(eng, PROMPT)
    finally:
        cpu.close()
    assert tokens == resident
    args = eng.args
    processed = len(PROMPT) + len(tokens) - 1
    assert stats.hits + stats.misses == args.num_hidden_layers * args.num_experts_per_tok * processed
    assert args.num_experts_per_tok == 2 and set(cpu.offered) <= {1, 2}  # what cpu_for covers
    assert stats.cpu_experts == sum(cpu_for[n] for n in cpu.offered)
    assert stats.bytes_to_device == cache.store.layout.nbytes * (stats.misses - stats.cpu_experts + stats.prefetches)
    assert len(cpu.offered) > 0 and stats.misses > 0 and 2 in cpu.offered


def test_prefill_never_runs_experts_on_the_cpu(tiny_ckpt):
    eng = load_engine(tiny_ckpt, RuntimeOptions(device="cpu", dtype="float32", ctx_size=64, experts_in_gpu=2,
                                                cpu_experts="always"))
    eng.experts.reset_stats()
    Session(eng.model).prefill(PROMPT)
    stats = eng.experts.stats
    assert stats.misses > 0 and stats.cpu_experts == 0


def test_cpu_experts_mode_is_validated(tiny_ckpt):
    with pytest.raises(UserError, match="cpu-experts"):
        load_engine(tiny_ckpt, RuntimeOptions(device="cpu", experts_in_gpu=2, cpu_experts="sometimes"))


def test_layer_miss_time_by_hand():
    from mixtral_cli.engine.cpu_experts import layer_miss_time, miss_time

    c = ExpertCosts(copy_s=3.6e-3, cpu_s=1.5e-3)  # PCIe 4.0 copy of a 4-bit expert vs DDR5 CPU pass
    assert miss_time(1, c, "never") == pytest.approx(3.6e-3)
    assert miss_time(2, c, "never") == pytest.approx(7.2e-3)
    assert miss_time(1, c, "auto") == pytest.approx(1.5e-3)
    assert miss_time(2, c, "auto") == pytest.approx(3.0e-3)  # both on the CPU: 3.0 < max(1.5, 3.6)
    # hit rate 0.8: P(1 miss) = 2 * 0.2 * 0.8 = 0.32, P(2 misses) = 0.04
    assert layer_miss_time(0.2, 2, c, "never") == pytest.approx(0.32 * 3.6e-3 + 0.04 * 7.2e-3)
    assert layer_miss_time(0.2, 2, c, "auto") == pytest.approx(0.32 * 1.5e-3 + 0.04 * 3.0e-3)
    assert layer_miss_time(0.0, 2, c, "auto") == 0.0
