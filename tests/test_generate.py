"""Stop conditions, the checks a Completion makes, and KV-cache prefix reuse (the sampler has
test_sampling.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mixtral_cli.checkpoints.reader import Checkpoint
from mixtral_cli.engine.generate import Completion, ContextOverflow, Session
from mixtral_cli.settings import GenerationConfig, InvalidSetting, SamplingConfig

pytest_plugins = ["pytester"]


# -- the loop on the tiny model ----------------------------------------------------------------
def complete(engine, prompt, **kw) -> Completion:
    kw.setdefault("sampling", SamplingConfig(temperature=0))
    return Completion(Session(engine.model), engine.tokenizer, prompt, GenerationConfig(**kw))


PROMPT = [1, 22557, 28725, 910, 460, 368, 28804]


# engine_fp32 is shared: conftest puts back its cache size and lm_head after each test (checked below).
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
    too_long = list(range(3, 3 + len(PROMPT) + 3))
    with pytest.raises(ContextOverflow) as e:
        complete(engine_fp32, too_long)
    assert (e.value.prompt_tokens, e.value.ctx) == (len(too_long), len(PROMPT) + 3)
    assert e.value.message == f"the prompt is {len(too_long)} tokens but the context holds {len(PROMPT) + 3}"
    assert e.value.hint == "shorten the prompt or raise -c/--ctx-size"


def test_completion_validates_its_settings(engine_fp32):
    with pytest.raises(InvalidSetting, match="top-p must be in"):
        complete(engine_fp32, PROMPT, sampling=SamplingConfig(top_p=0))
    with pytest.raises(InvalidSetting, match="max-tokens must be at least 1"):
        complete(engine_fp32, PROMPT, max_tokens=0)


def test_completion_tells_the_sampler_where_the_prompt_ends(engine_fp32):
    """The presence penalty counts generated tokens only: a token of the prompt is not penalised
    until it is generated."""
    c = complete(engine_fp32, PROMPT, sampling=SamplingConfig(temperature=0, presence_penalty=2.0))
    logits = torch.zeros(engine_fp32.model.lm_head.weight.shape[0])
    logits[PROMPT[1]], logits[5] = 1.0, 0.5
    assert c.sampler(logits, PROMPT) == PROMPT[1]
    assert c.sampler(logits, PROMPT + [PROMPT[1]]) == 5  # 1 - 2 < 0.5


def test_eos_stops_generation(engine_fp32):
    # make EOS the most likely next token: give its lm_head row a scaled copy of the greedy token's row
    head = engine_fp32.model.lm_head.weight
    head[2] = head[int(complete(engine_fp32, PROMPT, max_tokens=1).tokens().__next__())] * 4
    c = complete(engine_fp32, PROMPT, max_tokens=10)
    text = "".join(c)
    assert c.token_ids[-1] == 2
    assert c.finish_reason == "stop" and "</s>" not in text


CHANGES_THE_ENGINE = """
import pytest
import torch


@pytest.mark.parametrize("fails", [False, True])
def test_changes_the_engine(engine_fp32, fails):
    with torch.no_grad():
        engine_fp32.model.lm_head.weight.zero_()
    engine_fp32.model.setup_cache(8)
    assert not fails
"""


class EngineAfterEachTest:
    """A plugin for the inner session: the engine each test used, as it is once that test's teardown
    (where conftest puts it back) is over."""

    def __init__(self) -> None:
        self.after: dict[str, tuple[torch.Tensor, int]] = {}

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_teardown(self, item):
        engine = item.funcargs["engine_fp32"]
        yield
        self.after[item.name] = (engine.model.lm_head.weight.detach().clone(), engine.model.max_len)


def test_conftest_puts_the_shared_engine_back(pytester, tiny_ckpt):
    """What a test changes in `engine_fp32` (lm_head, the cache size) is put back after it, whether it
    passes or fails, in a session of its own with this repository's conftest."""
    here = Path(__file__).parent
    pytester.makeconftest((here / "conftest.py").read_text())
    pytester.makepyfile(tiny=(here / "tiny.py").read_text(), test_inner=CHANGES_THE_ENGINE)
    watch = EngineAfterEachTest()
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", plugins=[watch])
    result.assert_outcomes(passed=1, failed=1)
    stored = Checkpoint(tiny_ckpt).tensor("lm_head.weight").float()  # tiny.py writes the same weights each time
    assert sorted(watch.after) == ["test_changes_the_engine[False]", "test_changes_the_engine[True]"]
    for lm_head, max_len in watch.after.values():
        assert torch.equal(lm_head, stored) and max_len == 256


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
