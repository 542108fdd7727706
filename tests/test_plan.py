"""The memory planner on the real Mixtral-8x7B shapes, against hand computation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mixtral_cli.config import ModelArgs
from mixtral_cli.errors import UserError
from mixtral_cli.plan import expert_bytes, plan_memory, require_fit
from quant.formats import spec_for_bits

ARGS = ModelArgs.from_dict(json.loads((Path(__file__).parent / "data" / "mixtral-8x7b-instruct-v0.1.config.json").read_text()))
GiB = 2**30


def test_expert_bytes_by_hand():
    n = 14336 * 4096  # weights per matrix
    # nf4: 4-bit codes, one 8-bit scale per 64 weights, one fp32 per 256 scales, one fp32 offset
    nf4_matrix = n // 2 + n // 64 + 4 * (n // 64 // 256) + 4
    assert expert_bytes(ARGS, spec_for_bits(4)) == 3 * nf4_matrix == 90_875_916
    # int8, block 128: 1 byte per weight, one fp32 scale per 128 weights
    assert expert_bytes(ARGS, spec_for_bits(8)) == 3 * (n + 4 * (n // 128))
    assert expert_bytes(ARGS, None) == 3 * n * 2


def test_plan_8x7b_4bit_24gib_4096_ctx_by_hand():
    budget = 24 * GiB
    plan = plan_memory(ARGS, spec_for_bits(4), 4096, budget)
    assert plan.embeddings == (2 * 32000 * 4096 + 4096) * 2
    assert plan.attention == 32 * 4096 * (2 * 4096 + 2 * 1024) * 2
    assert plan.norms_and_routers == 32 * (2 * 4096 + 8 * 4096) * 2
    assert plan.kv_cache == 2 * 32 * 8 * 128 * 4096 * 2 == 512 * 2**20
    assert plan.workspace == 8 * 512 * 4096 * 2 + 3 * 512 * 14336 * 2 + 32 * 512 * 4096 * 2 + 4096 * 14336 * 2 + 32000 * 4
    resident = (plan.embeddings + plan.attention + plan.norms_and_routers + plan.kv_cache + plan.workspace
                + 512 * 2**20 + int(budget * 0.05))
    assert plan.resident == resident
    slots = (budget - resident) // (32 * 90_875_916)
    assert plan.slots_per_layer == slots == 6
    assert plan.offloaded and plan.fits
    assert plan.total == resident + 32 * slots * 90_875_916 <= budget


def test_everything_fits_on_a_big_card():
    plan = plan_memory(ARGS, spec_for_bits(4), 4096, 80 * GiB)
    assert plan.slots_per_layer == 8 and not plan.offloaded


def test_too_small_budget_names_the_minimum():
    plan = plan_memory(ARGS, spec_for_bits(4), 4096, 6 * GiB)
    assert not plan.fits
    with pytest.raises(UserError) as err:
        require_fit(plan, 2, 4096)
    assert f"{plan.minimum_budget / GiB:.2f} GiB" in err.value.hint
    # the minimum is enough, and just below it is not
    assert plan_memory(ARGS, spec_for_bits(4), 4096, plan.minimum_budget).slots_per_layer == 2
    assert not plan_memory(ARGS, spec_for_bits(4), 4096, plan.minimum_budget - 2**20).fits


def test_longer_context_costs_slots():
    short = plan_memory(ARGS, spec_for_bits(4), 4096, 24 * GiB)
    long = plan_memory(ARGS, spec_for_bits(4), 32768, 24 * GiB)
    assert long.kv_cache == 8 * short.kv_cache
    assert long.slots_per_layer < short.slots_per_layer
