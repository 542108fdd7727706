"""model.py against transformers' MixtralForCausalLM on tiny checkpoints (fp32, CPU)."""

from __future__ import annotations

import pytest
import torch
from tiny import TINY_CONFIG, write_checkpoint

from mixtral_cli.generate import Completion, GenerationConfig, SamplingConfig, Session
from mixtral_cli.model import attention_mask
from mixtral_cli.runtime import RuntimeOptions, load_engine

RTOL = 1e-4


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def prompt(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 32000, (n,), generator=torch.Generator().manual_seed(seed))


def test_prefill_logits_match_reference(engine_fp32, hf_tiny):
    ids = prompt(40)
    with torch.no_grad():
        ref = hf_tiny(ids[None]).logits[0]
    engine_fp32.model.setup_cache(256)
    ours = engine_fp32.model(ids, 0)
    assert ours.shape == ref.shape
    assert rel_err(ours, ref) < RTOL


def test_decode_through_kv_cache_matches_reference(engine_fp32, hf_tiny):
    ids = prompt(30, seed=2)
    with torch.no_grad():
        ref = hf_tiny(ids[None]).logits[0]
    m = engine_fp32.model
    m.setup_cache(256)
    # a multi-token prefill, then one token at a time, then a multi-token chunk at an offset
    steps = [m(ids[:7], 0)] + [m(ids[i:i + 1], i) for i in range(7, 20)] + [m(ids[20:], 20)]
    ours = torch.cat(steps)
    assert rel_err(ours, ref) < RTOL


def test_greedy_generation_identical_to_reference(engine_fp32, hf_tiny):
    ids = prompt(12, seed=3)
    with torch.no_grad():
        ref = hf_tiny.generate(ids[None], max_new_tokens=40, min_new_tokens=40, do_sample=False,
                               pad_token_id=0)[0, len(ids):].tolist()
    engine_fp32.model.setup_cache(256)
    cfg = GenerationConfig(max_tokens=40, sampling=SamplingConfig(temperature=0))
    completion = Completion(Session(engine_fp32.model), engine_fp32.tokenizer, ids.tolist(), cfg)
    ours = list(completion.tokens())
    if 2 in ref:  # the reference was forced past EOS; ours stops there
        ref = ref[: ref.index(2) + 1]
    assert len(ours) >= 32 or ours[-1] == 2
    assert ours == ref


def test_new_config_spelling_loads_identically(tmp_path, engine_fp32):
    other = write_checkpoint(tmp_path / "new", new_spelling=True, shards=2)
    eng = load_engine(other, RuntimeOptions(device="cpu", dtype="float32", ctx_size=64))
    assert eng.args.rope_theta == TINY_CONFIG["rope_theta"]
    ids = prompt(9)
    engine_fp32.model.setup_cache(256)
    assert torch.equal(eng.model(ids, 0), engine_fp32.model(ids, 0))


def test_sliding_window_matches_reference(tmp_path):
    from transformers import MixtralForCausalLM

    cfg = dict(TINY_CONFIG, sliding_window=8, num_hidden_layers=2)
    d = write_checkpoint(tmp_path / "sw", cfg, shards=1)
    hf = MixtralForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="eager").eval()
    ids = prompt(24, seed=5)
    with torch.no_grad():
        ref = hf(ids[None]).logits[0]
    eng = load_engine(d, RuntimeOptions(device="cpu", dtype="float32", ctx_size=64))
    steps = [eng.model(ids[:10], 0)] + [eng.model(ids[i:i + 1], i) for i in range(10, 24)]
    assert rel_err(torch.cat(steps), ref) < RTOL
    eng.model.setup_cache(64)
    # without the window the logits must differ: the test can tell the two apart
    no_window = attention_mask(0, 24, None, "cpu")
    assert not torch.equal(no_window, attention_mask(0, 24, 8, "cpu"))


def test_bfloat16_is_close_to_reference(tiny_ckpt, hf_tiny):
    eng = load_engine(tiny_ckpt, RuntimeOptions(device="cpu", dtype="bfloat16", ctx_size=64))
    assert eng.model.lm_head.weight.dtype == torch.bfloat16
    ids = prompt(16, seed=6)
    with torch.no_grad():
        ref = hf_tiny(ids[None]).logits[0]
    assert rel_err(eng.model(ids, 0), ref) < 0.05


def test_prompt_longer_than_cache_is_refused(engine_fp32):
    engine_fp32.model.setup_cache(16)
    with pytest.raises(ValueError):
        engine_fp32.model(prompt(20), 0)
    engine_fp32.model.setup_cache(256)
