"""Sampler, stop conditions and KV-cache prefix reuse."""

from __future__ import annotations

import pytest
import torch

from mixtral_cli.engine.generate import (
    Completion,
    GenerationConfig,
    SamplingConfig,
    Session,
    apply_repeat_penalty,
    filter_logits,
    make_sampler,
)
from mixtral_cli.errors import UserError

NEG = float("-inf")


def test_top_k_keeps_k_best():
    logits = torch.tensor([1.0, 5.0, 3.0, 4.0, 2.0])
    out = filter_logits(logits, top_k=2, top_p=1.0, min_p=0.0)
    assert torch.isfinite(out).tolist() == [False, True, False, True, False]


def test_top_p_keeps_smallest_nucleus():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()
    keep = torch.isfinite(filter_logits(logits, top_k=0, top_p=0.8, min_p=0.0)).tolist()
    assert keep == [True, True, False, False]  # 0.5 + 0.3 reaches 0.8
    keep = torch.isfinite(filter_logits(logits, top_k=0, top_p=0.81, min_p=0.0)).tolist()
    assert keep == [True, True, True, False]
    assert torch.isfinite(filter_logits(logits, 0, 0.01, 0.0)).sum() == 1  # never empty


def test_min_p_is_relative_to_the_best():
    probs = torch.tensor([0.6, 0.3, 0.06, 0.04])
    keep = torch.isfinite(filter_logits(probs.log(), 0, 1.0, min_p=0.09)).tolist()
    assert keep == [True, True, True, False]  # threshold 0.054
    keep = torch.isfinite(filter_logits(probs.log(), 0, 1.0, min_p=0.11)).tolist()
    assert keep == [True, True, False, False]  # threshold 0.066


def test_repeat_penalty_follows_llama_cpp():
    logits = torch.tensor([2.0, -2.0, 1.0])
    out = apply_repeat_penalty(logits, [0, 1, 1], 2.0)
    assert out.tolist() == [1.0, -4.0, 1.0]
    assert apply_repeat_penalty(logits, [0], 1.0) is logits


def test_greedy_and_seeded_sampling():
    logits = torch.randn(32000, generator=torch.Generator().manual_seed(0))
    assert make_sampler(SamplingConfig(temperature=0))(logits, []) == int(logits.argmax())
    a = make_sampler(SamplingConfig(temperature=1.5, top_k=0, top_p=1.0, min_p=0, seed=3))
    b = make_sampler(SamplingConfig(temperature=1.5, top_k=0, top_p=1.0, min_p=0, seed=3))
    seq_a = [a(logits, []) for _ in range(20)]
    assert seq_a == [b(logits, []) for _ in range(20)]
    assert len(set(seq_a)) > 1  # it really samples


def test_sampling_respects_the_filters():
    logits = torch.tensor([3.0, 2.9, 0.0, -1.0])
    s = make_sampler(SamplingConfig(temperature=5.0, top_k=2, top_p=1.0, min_p=0.0, seed=0))
    assert {s(logits, []) for _ in range(50)} == {0, 1}


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(min_p=1.0),
                                 dict(top_k=-1), dict(repeat_penalty=0)])
def test_bad_sampling_settings(bad):
    with pytest.raises(UserError):
        make_sampler(SamplingConfig(**bad))


# -- the loop on the tiny model ----------------------------------------------------------------
def complete(engine, prompt, **kw) -> Completion:
    kw.setdefault("sampling", SamplingConfig(temperature=0))
    return Completion(Session(engine.model), engine.tokenizer, prompt, GenerationConfig(**kw))


PROMPT = [1, 22557, 28725, 910, 460, 368, 28804]


# engine_fp32 is shared: conftest puts back its cache size and lm_head after each test.
def test_stop_string_cuts_the_text(engine_fp32):
    full = complete(engine_fp32, PROMPT, max_tokens=30)
    text = "".join(full)
    assert len(text) > 12
    stop = text[5:9]
    cut = complete(engine_fp32, PROMPT, max_tokens=30, stop=[stop])
    got = "".join(cut)
    assert got == text[: text.index(stop)]
    assert cut.finish_reason == "stop" and len(cut.token_ids) < 30
    assert full.finish_reason == "length" and len(full.token_ids) == 30 and 2 not in full.token_ids


def test_max_tokens_and_context_limit(engine_fp32):
    c = complete(engine_fp32, PROMPT, max_tokens=5)
    list(c)
    assert len(c.token_ids) == 5 and c.finish_reason == "length"
    engine_fp32.model.setup_cache(len(PROMPT) + 3)
    c = complete(engine_fp32, PROMPT, max_tokens=50)
    list(c)
    assert len(c.token_ids) <= 3 and c.finish_reason == "length"
    with pytest.raises(UserError, match="context"):
        complete(engine_fp32, list(range(3, 3 + len(PROMPT) + 3)))


def test_eos_stops_generation(engine_fp32):
    # make EOS the most likely next token: give its lm_head row a scaled copy of the greedy token's row
    head = engine_fp32.model.lm_head.weight
    head[2] = head[int(complete(engine_fp32, PROMPT, max_tokens=1).tokens().__next__())] * 4
    c = complete(engine_fp32, PROMPT, max_tokens=10)
    text = "".join(c)
    assert c.token_ids[-1] == 2
    assert c.finish_reason == "stop" and "</s>" not in text


def test_shared_engine_state_is_put_back(engine_fp32, tiny_ckpt):
    """The test above changed lm_head (and others shrink the cache): the next test sees the original."""
    from mixtral_cli.checkpoints.reader import Checkpoint

    stored = Checkpoint(tiny_ckpt).tensor("lm_head.weight").float()
    assert torch.equal(engine_fp32.model.lm_head.weight, stored)
    c = complete(engine_fp32, PROMPT, max_tokens=10)
    list(c)
    assert 2 not in c.token_ids and c.finish_reason == "length"


def test_session_reuses_the_cached_prefix(engine_fp32):
    session = Session(engine_fp32.model)
    first = Completion(session, engine_fp32.tokenizer, PROMPT, GenerationConfig(max_tokens=6, sampling=SamplingConfig(temperature=0)))
    list(first)
    follow = PROMPT + first.token_ids + [733, 16289, 28793]
    second = Completion(session, engine_fp32.tokenizer, follow, GenerationConfig(max_tokens=6, sampling=SamplingConfig(temperature=0)))
    reused = list(second.tokens())
    assert second.stats.prefill_tokens == 3 + 1  # the new ids plus the last generated one, never fed back
    fresh = Completion(Session(engine_fp32.model), engine_fp32.tokenizer, follow,
                       GenerationConfig(max_tokens=6, sampling=SamplingConfig(temperature=0)))
    assert list(fresh.tokens()) == reused
