"""The memory planner on the real Mixtral-8x7B shapes, against hand computation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mixtral_cli.config import ModelArgs
from mixtral_cli.errors import UserError
from mixtral_cli.plan import expert_bytes, plan_memory, require_fit, slot_bytes, workspace
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


MiB = 2**20
SLOT_4BIT = 90_876_096  # one nf4 expert with each of its 12 tensors 64-byte aligned (see below)


def test_slot_bytes_by_hand():
    # nf4 per matrix: codes 29,360,128 + scales 917,504 + second-level absmax 14,336 are multiples of
    # 64; the 4-byte offset takes 64. Three matrices.
    assert slot_bytes(ARGS, spec_for_bits(4)) == 3 * (29_360_128 + 917_504 + 14_336 + 64) == SLOT_4BIT
    # int8: 58,720,256 codes + 1,835,008 float32 scales, both aligned already
    assert slot_bytes(ARGS, spec_for_bits(8)) == 3 * (58_720_256 + 1_835_008) == 181_665_792
    assert slot_bytes(ARGS, None) == expert_bytes(ARGS, None)


def test_workspace_of_one_512_token_chunk_by_hand():
    # bf16, chunk 512 over a 4096-token context
    ws = workspace(ARGS, spec_for_bits(4), 4096)
    assert ws.activations == 8 * 4 * MiB  # 8 tensors of [512, 4096] bf16, 4 MiB each
    assert ws.expert_intermediates == 3 * 14 * MiB  # 3 tensors of [512, 14336] bf16
    assert ws.attention == 2 * MiB + 4 * MiB  # the [512, 4096] mask as bool, then as bf16
    # one [14336, 4096] bf16 matrix (112 MiB) + 917,504 fp32 block absmax twice (7 MiB)
    assert ws.dequantized_matrix == 112 * MiB + 7 * MiB
    assert ws.logits == 16 * 32000 * (2 + 4 + 4)  # 16 rows: bf16 logits, fp32 copy, fp32 log-probs
    assert ws.total == 199 * MiB + 5_120_000
    # int8 dequantizes one matrix in one pass to bf16: 112 MiB, no absmax
    assert workspace(ARGS, spec_for_bits(8), 4096).dequantized_matrix == 112 * MiB
    assert workspace(ARGS, None, 4096).dequantized_matrix == 0
    # without a fused kernel for masked GQA, the math path's scores of the chunk against the whole
    # context: fp32 scores + probabilities 2 x 32 x 512 x 4096 x 4 (512 MiB), K and V expanded to 32
    # heads in fp32 2 x 32 x 4096 x 128 x 4 (128 MiB), q in fp32 32 x 512 x 128 x 4 (8 MiB)
    math = workspace(ARGS, spec_for_bits(4), 4096, fused_attention=False)
    assert math.attention == 6 * MiB + 512 * MiB + 128 * MiB + 8 * MiB
    # a context shorter than a chunk is one chunk of its own length
    short = workspace(ARGS, None, 100)
    assert short.activations == 8 * 100 * 4096 * 2 and short.attention == 100 * 100 * 3


def test_plan_8x7b_4bit_24gib_4096_ctx_by_hand():
    budget = 24 * GiB
    plan = plan_memory(ARGS, spec_for_bits(4), 4096, budget)
    assert plan.embeddings == (2 * 32000 * 4096 + 4096) * 2
    assert plan.attention == 32 * 4096 * (2 * 4096 + 2 * 1024) * 2
    assert plan.norms_and_routers == 32 * (2 * 4096 + 8 * 4096) * 2
    assert plan.kv_cache == 2 * 32 * 8 * 128 * 4096 * 2 == 512 * 2**20
    assert plan.workspace == 199 * MiB + 5_120_000
    assert plan.expert_bytes == SLOT_4BIT and plan.prefill_chunk == 512
    resident = (plan.embeddings + plan.attention + plan.norms_and_routers + plan.kv_cache + plan.workspace
                + 512 * 2**20 + int(budget * 0.05))
    assert plan.resident == resident
    slots = (budget - resident) // (32 * SLOT_4BIT)
    assert plan.slots_per_layer == slots == 6
    assert plan.offloaded and plan.fits
    assert plan.total == resident + 32 * slots * SLOT_4BIT <= budget
    # 8-bit experts at the same budget: 3 slots of 181,665,792 bytes per layer
    assert plan_memory(ARGS, spec_for_bits(8), 4096, budget).slots_per_layer == 3


def test_math_attention_reservation_costs_slots_at_long_context():
    fused = plan_memory(ARGS, spec_for_bits(4), 32768, 24 * GiB)
    math = plan_memory(ARGS, spec_for_bits(4), 32768, 24 * GiB, fused_attention=False)
    # 512 x 32768 fp32 scores and probabilities for 32 heads: 4 GiB more
    assert math.workspace - fused.workspace == 4 * GiB + 2 * 32 * 32768 * 128 * 4 + 32 * 512 * 128 * 4
    assert math.slots_per_layer < fused.slots_per_layer


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
