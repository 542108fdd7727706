"""The parameter counts, the byte accounting, the decode bound and the memory planner on the real
Mixtral-8x7B shapes (and a toy config), against numbers worked out by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mixtral_cli.checkpoints.config import ModelArgs
from mixtral_cli.checkpoints.layout import Quantization, packed_expert_bytes
from mixtral_cli.engine.plan import (
    all_experts_bytes,
    attention_bytes,
    bytes_per_token,
    copy_wait_s,
    decode_bound,
    expert_bytes,
    model_bytes,
    output_bytes,
    plan_memory,
    require_fit,
    shared_bytes,
    workspace,
)
from mixtral_cli.errors import UserError
from mixtral_cli.kernels.formats import spec_for_bits

DENSE = Quantization()


def experts(bits: int) -> Quantization:
    """Only the experts quantized (format version 1's layout)."""
    return Quantization(experts=spec_for_bits(bits))

ARGS = ModelArgs.from_dict(json.loads((Path(__file__).parent / "data" / "mixtral-8x7b-instruct-v0.1.config.json").read_text()))
GiB = 2**30


# -- parameter counts ----------------------------------------------------------------------------
def test_mixtral_8x7b_parameter_counts_by_hand():
    # per layer: q and o 4096 x 4096, k and v 1024 x 4096 (8 KV heads of 128) = 41,943,040; router 8 x 4096 =
    # 32,768; two norms 8,192 -> 41,984,000 shared per layer
    assert ARGS.attention_params == 41_943_040 and ARGS.router_params == 32_768 and ARGS.norm_params == 8_192
    assert ARGS.layer_shared_params == 41_984_000
    assert ARGS.ffn_params == 3 * 4096 * 14336 == 176_160_768  # one expert
    # embed_tokens and lm_head 32000 x 4096 = 131,072,000 each, final norm 4,096
    assert ARGS.lm_head_params == 131_072_000 and ARGS.embedding_params == 262_148_096
    # 262,148,096 + 32 x 41,984,000
    assert ARGS.params_shared == 1_605_636_096
    assert ARGS.params_experts == 32 * 8 * 176_160_768 == 45_097_156_608
    # DESIGN.md: 46.70B total, 12.88B active (1,605,636,096 + 32 x 2 x 176,160,768)
    assert ARGS.params_total == 46_702_792_704 and ARGS.params_active == 12_879_925_248
    # a decoded token reads lm_head, its embedding row, the final norm and 32 layers' shared parts:
    # 131,072,000 + 4,096 + 4,096 + 1,343,488,000
    assert ARGS.params_shared_per_token == 1_474_568_192


def test_tied_embeddings_are_counted_once():
    tied = ModelArgs(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                     num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2, vocab_size=10,
                     tie_word_embeddings=True)
    assert tied.embedding_params == 10 * 8 + 8  # one 10 x 8 table (embed_tokens = lm_head) + final norm
    assert tied.params_shared_per_token == 8 + 240 + 8 + 80  # row, the layer, final norm, lm_head


# -- bytes -----------------------------------------------------------------------------------------
def test_expert_bytes_by_hand():
    # one 14336 x 4096 matrix: 58,720,256 weights
    # nf4: 4-bit codes 29,360,128 + one 8-bit scale per 64 weights 917,504 + one fp32 per 256 scales 14,336
    # + one fp32 offset 4 = 30,291,972
    assert expert_bytes(ARGS, spec_for_bits(4)) == 3 * 30_291_972 == 90_875_916
    # int8, block 128: 58,720,256 codes + 458,752 fp32 scales (1,835,008 bytes) = 60,555,264
    assert expert_bytes(ARGS, spec_for_bits(8)) == 3 * 60_555_264 == 181_665_792
    assert expert_bytes(ARGS, None) == 3 * 58_720_256 * 2 == 352_321_536


def test_model_bytes_by_hand():
    # the shared weights stay bf16: 2 x 1,605,636,096
    assert shared_bytes(ARGS, DENSE) == 3_211_272_192
    # 32 layers x 8 experts = 256 experts
    assert all_experts_bytes(ARGS, spec_for_bits(4)) == 256 * 90_875_916 == 23_264_234_496
    assert model_bytes(ARGS, experts(4)) == 3_211_272_192 + 23_264_234_496 == 26_475_506_688
    assert model_bytes(ARGS, experts(8)) == 3_211_272_192 + 256 * 181_665_792 == 49_717_714_944
    assert model_bytes(ARGS, DENSE) == 2 * 46_702_792_704  # bf16 everywhere


def test_bytes_per_token_by_hand():
    a = ModelArgs(hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2, vocab_size=10)
    # head_dim 4; q: 8x8, k: 4x8, v: 4x8, o: 8x8 -> 64 + 32 + 32 + 64 = 192 attention params
    # router 4x8 = 32, two norms 16 -> 240 params per layer; one expert 3 x 8 x 16 = 384 params
    # bf16: per layer 2 x 240 + 2 experts x 768 bytes = 2016; KV over 10 positions: 2 x 1 x 4 x 10 x 2 = 160
    # head: embedding row 8 + final norm 8 + lm_head 80 = 96 params = 192 bytes
    assert bytes_per_token(a, DENSE, 2, 10) == 192 + 2 * (2016 + 160)
    # int8, group 8: one 8x16 or 16x8 matrix = 128 int8 + 16 float32 scales = 192 bytes; expert 576
    spec = spec_for_bits(8, group_size=8)
    assert bytes_per_token(a, Quantization(experts=spec), 2, 0) == 192 + 2 * (480 + 2 * 576)
    # a mean context of 2.5 positions: KV 2 x 1 x 4 x 2.5 x 2 = 40 bytes per layer
    assert bytes_per_token(a, DENSE, 2, 2.5) == 192 + 2 * (2016 + 40)
    # 8x7B, 4-bit experts, empty context: 2 x 1,474,568,192 shared bytes + 64 experts x 90,875,916
    assert bytes_per_token(ARGS, experts(4), 2, 0) == 2_949_136_384 + 5_816_058_624
    # everything int8 in groups of 8: attention 192 int8 + 24 float32 scales = 288 bytes a layer; the
    # 10x8 lm_head 80 + 10 x 4 = 120 bytes; embedding row, final norm 32; router and norms 2 x 48 a layer
    everything = Quantization(experts=spec, attention=spec, output=spec)
    assert bytes_per_token(a, everything, 2, 0) == 32 + 120 + 2 * (288 + 96 + 2 * 576)


def test_quantized_attention_and_output_bytes_by_hand():
    # nf4 q and o (4096 x 4096): 8,388,608 code bytes + 262,144 block scales + 1,024 x 4 nested absmax
    # + 4 offset; k and v (1024 x 4096): 2,097,152 + 65,536 + 256 x 4 + 4
    q, kv = 8_388_608 + 262_144 + 4_096 + 4, 2_097_152 + 65_536 + 1_024 + 4
    assert attention_bytes(ARGS, spec_for_bits(4)) == 2 * q + 2 * kv == 21_637_136
    assert attention_bytes(ARGS, None) == 4096 * 10240 * 2
    # int8 lm_head 32000 x 4096: one byte a weight and a float32 scale per 128
    assert output_bytes(ARGS, spec_for_bits(8)) == 131_072_000 + 1_024_000 * 4
    assert shared_bytes(ARGS, Quantization(attention=spec_for_bits(4))) == 3_211_272_192 - 32 * (83_886_080 - 21_637_136)


def test_4bit_attention_plans_16_more_expert_slots_on_8x7b():
    """24 GiB, 4096 tokens: 16-bit attention (2.5 GiB resident) leaves 6 slots a layer, 4-bit (0.64 GiB) 7."""
    bf16 = plan_memory(ARGS, experts(4), 4096, 24 * GiB)
    nf4 = plan_memory(ARGS, Quantization(experts=spec_for_bits(4), attention=spec_for_bits(4)), 4096, 24 * GiB)
    assert bf16.attention - nf4.attention == 32 * (83_886_080 - 21_637_136)
    assert (bf16.slots_per_layer, nf4.slots_per_layer) == (6, 7)
    assert nf4.experts_on_device - bf16.experts_on_device == 32 >= 16


def test_quantized_output_reserves_its_dequantized_matrix():
    """Above a few tokens a quantized matmul may dequantize its whole matrix: the output layer's
    32000 x 4096 (bf16) is then the largest, above an expert's 14336 x 4096."""
    out8 = Quantization(experts=spec_for_bits(4), output=spec_for_bits(8))
    assert workspace(ARGS, out8, 4096).dequantized_matrix == 32000 * 4096 * 2


def test_decode_bound_by_hand():
    # 1 GB per token at 20 GB/s: 50 ms -> 20 tok/s
    assert decode_bound(1e9, 20e9) == pytest.approx(20.0)
    # plus 0.5 misses x 100 MB at 25 GB/s = 2 ms -> 1 / 0.052
    assert copy_wait_s(0.5, 100e6, 25e9) == pytest.approx(0.002)
    assert decode_bound(1e9, 20e9, 0.002) == pytest.approx(1 / 0.052)
    # DESIGN.md section 6: 64 expert uses of 94 MB at h = 0 over 25 GB/s (0.24 s), resident reads free -> ~4.2 tok/s
    assert copy_wait_s(64, 94e6, 25e9) == pytest.approx(0.24064)
    assert decode_bound(1.0, float("inf"), 0.24064) == pytest.approx(4.2, rel=0.02)


MiB = 2**20
SLOT_4BIT = 90_876_096  # one nf4 expert with each of its 12 tensors 64-byte aligned (see below)


def test_packed_expert_bytes_by_hand():
    # nf4 per matrix: codes 29,360,128 + scales 917,504 + second-level absmax 14,336 are multiples of
    # 64; the 4-byte offset takes 64. Three matrices.
    assert packed_expert_bytes(ARGS, spec_for_bits(4)) == 3 * (29_360_128 + 917_504 + 14_336 + 64) == SLOT_4BIT
    # int8: 58,720,256 codes + 1,835,008 float32 scales, both aligned already
    assert packed_expert_bytes(ARGS, spec_for_bits(8)) == 3 * (58_720_256 + 1_835_008) == 181_665_792
    assert packed_expert_bytes(ARGS, None) == 352_321_536  # bf16 matrices are aligned already


def test_workspace_of_one_512_token_chunk_by_hand():
    # bf16, chunk 512 over a 4096-token context
    ws = workspace(ARGS, experts(4), 4096)
    assert ws.activations == 8 * 4 * MiB  # 8 tensors of [512, 4096] bf16, 4 MiB each
    assert ws.expert_intermediates == 3 * 14 * MiB  # 3 tensors of [512, 14336] bf16
    assert ws.attention == 2 * MiB + 4 * MiB  # the [512, 4096] mask as bool, then as bf16
    # one [14336, 4096] bf16 matrix (112 MiB) + 917,504 fp32 block absmax twice (7 MiB)
    assert ws.dequantized_matrix == 112 * MiB + 7 * MiB
    assert ws.logits == 16 * 32000 * (2 + 4 + 4)  # 16 rows: bf16 logits, fp32 copy, fp32 log-probs
    assert ws.total == 199 * MiB + 5_120_000
    # int8 dequantizes one matrix in one pass to bf16: 112 MiB, no absmax
    assert workspace(ARGS, experts(8), 4096).dequantized_matrix == 112 * MiB
    assert workspace(ARGS, DENSE, 4096).dequantized_matrix == 0
    # without a fused kernel for masked GQA, the math path's scores of the chunk against the whole
    # context: fp32 scores + probabilities 2 x 32 x 512 x 4096 x 4 (512 MiB), K and V expanded to 32
    # heads in fp32 2 x 32 x 4096 x 128 x 4 (128 MiB), q in fp32 32 x 512 x 128 x 4 (8 MiB)
    math = workspace(ARGS, experts(4), 4096, fused_attention=False)
    assert math.attention == 6 * MiB + 512 * MiB + 128 * MiB + 8 * MiB
    # a context shorter than a chunk is one chunk of its own length
    short = workspace(ARGS, DENSE, 100)
    assert short.activations == 8 * 100 * 4096 * 2 and short.attention == 100 * 100 * 3


def test_plan_8x7b_4bit_24gib_4096_ctx_by_hand():
    budget = 24 * GiB
    plan = plan_memory(ARGS, experts(4), 4096, budget)
    assert plan.embeddings == (2 * 32000 * 4096 + 4096) * 2 == 524_296_192
    assert plan.attention == 32 * 4096 * (2 * 4096 + 2 * 1024) * 2 == 2_684_354_560
    assert plan.norms_and_routers == 32 * (2 * 4096 + 8 * 4096) * 2 == 2_621_440
    assert plan.kv_cache == 2 * 32 * 8 * 128 * 4096 * 2 == 512 * 2**20
    assert plan.workspace == 199 * MiB + 5_120_000 == 213_786_624
    assert plan.cuda_context == 512 * MiB and plan.allocator_slack == 1_288_490_188  # 5% of 24 GiB, rounded down
    assert plan.expert_bytes == SLOT_4BIT and plan.prefill_chunk == 512
    # 524,296,192 + 2,684,354,560 + 2,621,440 + 536,870,912 + 213,786,624 + 536,870,912 + 1,288,490,188
    assert plan.resident == 5_787_290_828
    # (25,769,803,776 - 5,787,290,828) // (32 x 90,876,096) = 19,982,512,948 // 2,908,035,072 = 6
    assert plan.slots_per_layer == 6 and plan.experts_on_device == 192
    assert plan.offloaded and plan.fits
    assert plan.total == 5_787_290_828 + 192 * SLOT_4BIT == 23_235_501_260
    # offloaded: every expert sits in the pinned host store, 256 x 90,876,096 bytes
    assert plan.host_pinned == 23_264_280_576
    # 8-bit experts at the same budget: 3 slots of 181,665,792 bytes per layer
    assert plan_memory(ARGS, experts(8), 4096, budget).slots_per_layer == 3


def test_math_attention_reservation_costs_slots_at_long_context():
    fused = plan_memory(ARGS, experts(4), 32768, 24 * GiB)
    math = plan_memory(ARGS, experts(4), 32768, 24 * GiB, fused_attention=False)
    # 512 x 32768 fp32 scores and probabilities for 32 heads: 4 GiB more
    assert math.workspace - fused.workspace == 4 * GiB + 2 * 32 * 32768 * 128 * 4 + 32 * 512 * 128 * 4
    assert math.slots_per_layer < fused.slots_per_layer


def test_everything_fits_on_a_big_card():
    plan = plan_memory(ARGS, experts(4), 4096, 80 * GiB)
    assert plan.slots_per_layer == 8 and not plan.offloaded and plan.host_pinned == 0


def test_too_small_budget_names_the_minimum():
    plan = plan_memory(ARGS, experts(4), 4096, 6 * GiB)
    assert not plan.fits
    with pytest.raises(UserError) as err:
        require_fit(plan, 2, 4096)
    # resident without slack 4,498,800,640 + 32 x 2 slots x 90,876,096 = 10,314,870,784, over 95% (5% slack), + 1
    assert plan.minimum_budget == 10_857_758_721
    assert "10.11 GiB" in err.value.hint
    # the minimum is enough, and just below it is not
    assert plan_memory(ARGS, experts(4), 4096, plan.minimum_budget).slots_per_layer == 2
    assert not plan_memory(ARGS, experts(4), 4096, plan.minimum_budget - 2**20).fits


def test_longer_context_costs_slots():
    short = plan_memory(ARGS, experts(4), 4096, 24 * GiB)
    long = plan_memory(ARGS, experts(4), 32768, 24 * GiB)
    assert long.kv_cache == 8 * short.kv_cache
    assert long.slots_per_layer < short.slots_per_layer
