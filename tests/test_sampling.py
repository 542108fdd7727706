"""The sampler chain: each processor, their order, the draw, and the settings it takes."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from mixtral_cli.engine.sampling import (
    Sampler,
    keep_min_p,
    keep_top_k,
    keep_top_p,
    penalize_repeats,
    processors,
    run_chain,
)
from mixtral_cli.settings import InvalidSetting, SamplingConfig

# only the penalties: no filter, temperature 1 (the chain's last step divides by it)
PENALTIES_ONLY = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)


def test_top_k_keeps_k_best():
    logits = torch.tensor([1.0, 5.0, 3.0, 4.0, 2.0])
    assert torch.isfinite(keep_top_k(logits, 2)).tolist() == [False, True, False, True, False]


def test_top_p_keeps_smallest_nucleus():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()

    def kept(p: float) -> list[bool]:
        return torch.isfinite(keep_top_p(logits, p)).tolist()

    assert kept(0.8) == [True, True, False, False]  # 0.5 + 0.3 reaches 0.8
    assert kept(0.81) == [True, True, True, False]
    assert sum(kept(0.01)) == 1  # never empty


def test_min_p_is_relative_to_the_best():
    logits = torch.tensor([0.6, 0.3, 0.06, 0.04]).log()
    assert torch.isfinite(keep_min_p(logits, 0.09)).tolist() == [True, True, True, False]  # below 0.054
    assert torch.isfinite(keep_min_p(logits, 0.11)).tolist() == [True, True, False, False]  # below 0.066


def test_repeat_penalty_follows_llama_cpp():
    logits = torch.tensor([2.0, -2.0, 1.0])
    assert penalize_repeats(logits, [0, 1, 1], 2.0).tolist() == [1.0, -4.0, 1.0]
    assert penalize_repeats(logits, [0], 1.0) is logits


def test_presence_and_frequency_penalties_follow_openai_over_the_generated_tokens():
    cfg = SamplingConfig(**PENALTIES_ONLY, presence_penalty=0.5, frequency_penalty=0.25)
    chain = processors(cfg, prompt_len=2)
    logits = torch.tensor([1.0, 5.0, 4.5, 0.0])
    # history: prompt [1, 1] (not counted), generated [1, 1, 3]:
    # token 1: 5 - 2 x 0.25 - 0.5 = 4.0; token 3: 0 - 1 x 0.25 - 0.5 = -0.75
    assert run_chain(chain, logits, [1, 1, 1, 1, 3]).tolist() == [1.0, 4.0, 4.5, -0.75]
    assert run_chain(chain, logits, [1, 1]).tolist() == logits.tolist()  # nothing generated yet
    greedy = Sampler(replace(cfg, temperature=0), prompt_len=2)
    assert greedy(logits, [1, 1, 1, 1, 3]) == 2
    assert greedy(logits, [1, 1]) == 1


def test_repeat_penalty_comes_before_presence_and_frequency():
    cfg = SamplingConfig(**PENALTIES_ONLY, repeat_penalty=2.0, presence_penalty=1.0, frequency_penalty=0.5)
    # prompt [0], generated [1, 1]. Repeat (last 64 tokens, prompt included): 2 / 2 = 1, -1 x 2 = -2;
    # then token 1, generated twice: -2 - 2 x 0.5 - 1 = -4 (the other order would give (-1 - 2) x 2 = -6)
    out = run_chain(processors(cfg, prompt_len=1), torch.tensor([2.0, -1.0, 3.0]), [0, 1, 1])
    assert out.tolist() == [1.0, -4.0, 3.0]


def test_steps_that_are_off_are_left_out():
    assert processors(SamplingConfig(temperature=0), prompt_len=0) == []  # greedy, no penalties
    assert len(processors(SamplingConfig(**PENALTIES_ONLY), prompt_len=0)) == 1  # the temperature
    assert len(processors(SamplingConfig(), prompt_len=0)) == 4  # defaults: top-k, top-p, min-p, temperature


def test_greedy_and_seeded_sampling():
    logits = torch.randn(32000, generator=torch.Generator().manual_seed(0))
    assert Sampler(SamplingConfig(temperature=0))(logits, []) == int(logits.argmax())
    a = Sampler(SamplingConfig(temperature=1.5, top_k=0, top_p=1.0, min_p=0, seed=3))
    b = Sampler(SamplingConfig(temperature=1.5, top_k=0, top_p=1.0, min_p=0, seed=3))
    seq_a = [a(logits, []) for _ in range(20)]
    assert seq_a == [b(logits, []) for _ in range(20)]
    assert len(set(seq_a)) > 1  # it really samples


def test_sampling_respects_the_filters():
    logits = torch.tensor([3.0, 2.9, 0.0, -1.0])
    s = Sampler(SamplingConfig(temperature=5.0, top_k=2, top_p=1.0, min_p=0.0, seed=0))
    assert {s(logits, []) for _ in range(50)} == {0, 1}


def test_the_chain_takes_its_settings_when_it_is_made():
    cfg = SamplingConfig(temperature=0, frequency_penalty=2.0)
    sample = Sampler(cfg)
    cfg.frequency_penalty = 0.0
    assert sample(torch.tensor([0.0, 1.0]), [1, 1]) == 0  # 1 - 2 x 2 = -3: still penalised


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(min_p=1.0),
                                 dict(top_k=-1), dict(repeat_penalty=0), dict(presence_penalty=2.5),
                                 dict(frequency_penalty=-3), dict(presence_penalty=math.nan)])
def test_bad_sampling_settings(bad):
    with pytest.raises(InvalidSetting) as e:
        SamplingConfig(**bad).validate()
    assert e.value.field == next(iter(bad))


def test_penalty_range_message():
    with pytest.raises(InvalidSetting) as e:
        SamplingConfig(presence_penalty=3.0).validate()
    assert (e.value.message, e.value.problem) == ("presence-penalty must be in [-2, 2], got 3",
                                                  "must be in [-2, 2], got 3")


def test_logit_bias_and_the_mask_come_before_the_chain():
    from mixtral_cli.engine.sampling import restrict

    logits = torch.tensor([0.0, 1.0, 2.0, 3.0])
    out = restrict(logits, {0: 5.0, 3: -100.0}, None)
    assert out.tolist() == [5.0, 1.0, 2.0, -97.0]
    masked = restrict(logits, {}, torch.tensor([True, True, False, False]))
    assert masked.tolist() == [0.0, 1.0, float("-inf"), float("-inf")]
    greedy = Sampler(SamplingConfig(temperature=0, logit_bias={1: 10.0}))
    assert greedy(logits, []) == 1
    # top_k=1 after the mask keeps the best *allowed* token, never a forbidden one
    sample = Sampler(SamplingConfig(temperature=1.0, top_k=1, seed=0))
    assert all(sample(logits, [], torch.tensor([True, True, False, False])) == 1 for _ in range(20))


def test_logit_bias_is_validated():
    with pytest.raises(InvalidSetting, match="logit-bias"):
        SamplingConfig(logit_bias={3: 101.0}).validate()
    with pytest.raises(InvalidSetting, match="logit-bias"):
        SamplingConfig(logit_bias={-1: 1.0}).validate()
