"""model.py against transformers' MixtralForCausalLM on tiny checkpoints (fp32, CPU)."""

from __future__ import annotations

import pytest
import torch
from tiny import TINY_CONFIG, write_checkpoint

from mixtral_cli.engine.evaluate import perplexity, window_logprobs
from mixtral_cli.engine.generate import Completion, Session, chunks
from mixtral_cli.engine.loader import RuntimeOptions, load_engine
from mixtral_cli.engine.model import attention_mask
from mixtral_cli.kernels import dispatch, native
from mixtral_cli.settings import GenerationConfig, SamplingConfig

RTOL = 1e-4


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def prompt(n: int, seed: int = 1, vocab_size: int = 32000) -> torch.Tensor:
    return torch.randint(3, vocab_size, (n,), generator=torch.Generator().manual_seed(seed))


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


@pytest.mark.parametrize("ckpt", ["tiny_ckpt", "tiny_v3_ckpt"])
def test_greedy_generation_identical_to_reference(request, ckpt):
    """With the v1 tokenizer, and with v3 at Mixtral-8x22B's vocabulary of 32768 (its control ids
    in the chat prompt, random ids up to the last row)."""
    from transformers import MixtralForCausalLM

    path = request.getfixturevalue(ckpt)
    hf = MixtralForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    engine = load_engine(path, RuntimeOptions(device="cpu", dtype="float32", ctx_size=256))
    tok = engine.tokenizer
    ids = torch.tensor([*tok.encode_chat([{"role": "user", "content": "Hi"}]),
                        *prompt(12, seed=3, vocab_size=tok.vocab_size).tolist(), tok.vocab_size - 1])
    with torch.no_grad():
        ref = hf.generate(ids[None], max_new_tokens=40, min_new_tokens=40, do_sample=False,
                          pad_token_id=0)[0, len(ids):].tolist()
    cfg = GenerationConfig(max_tokens=40, sampling=SamplingConfig(temperature=0))
    completion = Completion(Session(engine.model), tok, ids.tolist(), cfg)
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
    # the window cuts: its mask is not plain causal, so the test can tell the two apart
    assert attention_mask(0, 24, None, "cpu") is None
    assert not torch.equal(torch.ones(24, 24, dtype=torch.bool).tril(), attention_mask(0, 24, 8, "cpu"))
    # chunked prefill honours the window too
    chunked = torch.cat([eng.model(ids[a:b], a) for a, b in chunks(0, 24, 5)])
    assert rel_err(chunked, ref) < RTOL


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


# -- chunked prefill -----------------------------------------------------------------------------
# Chunked and one-pass prefill compute the same function; in float32 they differ only by summation
# order (matmuls over fewer rows, attention over a masked chunk instead of a causal square), so
# their logits agree to CHUNK_RTOL of the largest logit.
CHUNK_RTOL = 1e-5


def test_later_chunk_mask_is_aligned_bottom_right():
    # queries at positions 5, 6, 7 over keys 0..7: query i sees keys 0..5+i
    m = attention_mask(5, 3, None, "cpu")
    assert m.shape == (3, 8)
    assert m.tolist() == [[j <= 5 + i for j in range(8)] for i in range(3)]
    # is_causal would align the same [3, 8] mask top-left: query 0 would see key 0 only
    assert not torch.equal(m, torch.ones(3, 8, dtype=torch.bool).tril())
    assert attention_mask(0, 7, None, "cpu") is None and attention_mask(9, 1, None, "cpu") is None


@pytest.mark.parametrize("chunk", [1, 4, 7, 40])
def test_chunked_prefill_matches_one_pass(engine_fp32, chunk):
    ids = prompt(40, seed=7)
    m = engine_fp32.model
    m.setup_cache(256)
    one_pass = m(ids, 0)
    chunked = torch.cat([m(ids[a:b], a) for a, b in chunks(0, 40, chunk)])
    assert chunked.shape == one_pass.shape
    assert rel_err(chunked, one_pass) < CHUNK_RTOL
    # the session's prefill (what generation, chat and bench use) ends on the same last-position logits
    session = Session(m, chunk=chunk)
    logits, computed = session.prefill(ids.tolist())
    assert computed == 40 and session.cached == ids.tolist()
    assert rel_err(logits, one_pass[-1]) < CHUNK_RTOL
    # a follow-up turn prefills only the new tokens, chunked too, after the cached prefix
    more = prompt(11, seed=8)
    logits, computed = session.prefill(ids.tolist() + more.tolist())
    assert computed == 11 and session.cached == ids.tolist() + more.tolist()
    whole = m(torch.cat([ids, more]), 0)[-1]
    assert rel_err(logits, whole) < CHUNK_RTOL


def test_chunked_prefill_on_offloaded_experts_matches_one_pass(tiny_ckpt):
    eng = load_engine(tiny_ckpt, RuntimeOptions(device="cpu", dtype="float32", ctx_size=64, experts_in_gpu=2))
    ids = prompt(30, seed=9)
    one_pass = eng.model(ids, 0)
    chunked = torch.cat([eng.model(ids[a:b], a) for a, b in chunks(0, 30, 8)])
    assert rel_err(chunked, one_pass) < CHUNK_RTOL


def test_chunked_perplexity_matches_one_pass(engine_fp32):
    ids = prompt(45, seed=10)
    m = engine_fp32.model
    m.setup_cache(256)
    logits = m(ids, 0)
    direct = float(torch.nn.functional.cross_entropy(logits[:-1], ids[1:], reduction="sum"))
    for chunk in (512, 16, 5):
        logp = torch.cat(list(window_logprobs(m, ids.tolist(), chunk)))  # [44, V]
        nll = -float(logp.gather(1, ids[1:, None]).sum())
        assert logp.shape[0] == 44 and abs(nll - direct) <= 1e-5 * abs(direct)
    whole = perplexity(m, ids.tolist(), ctx=20, chunk=512)
    small = perplexity(m, ids.tolist(), ctx=20, chunk=6)
    assert whole.windows == small.windows == 3 and whole.tokens_scored == small.tokens_scored == 42
    assert abs(whole.perplexity - small.perplexity) <= 1e-5 * whole.perplexity


def test_attention_gets_4d_inputs_and_a_mask_only_for_later_chunks(engine_fp32, monkeypatch):
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, is_causal=False, **kw):
        calls.append((q.dim(), k.dim(), tuple(q.shape), attn_mask is not None, is_causal))
        return sdpa(q, k, v, attn_mask=attn_mask, is_causal=is_causal, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    m = engine_fp32.model
    m.setup_cache(256)
    ids = prompt(12)
    m(ids[:8], 0)  # first chunk: causal, no mask
    m(ids[8:11], 8)  # later chunk: explicit mask
    m(ids[11:], 11)  # decode step: the native one-token kernel on the CPU, else SDPA with neither
    n, H, Hd = m.args.num_hidden_layers, m.args.num_attention_heads, m.args.head_dim
    decode = [] if dispatch.attention_path(m.caches[0].k) == "native_attention" else [(4, 4, (1, H, 1, Hd), False, False)] * n
    assert calls == ([(4, 4, (1, H, 8, Hd), False, True)] * n + [(4, 4, (1, H, 3, Hd), True, False)] * n + decode)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_decode_attention_paths_agree_with_a_cutting_window(tmp_path, dtype, monkeypatch):
    """Decode steps through the native one-token attention and through SDPA give the same logits, past
    a sliding window too (the native kernel attends to the window's contiguous range)."""
    cfg = dict(TINY_CONFIG, sliding_window=6, num_hidden_layers=2)
    d = write_checkpoint(tmp_path / "sw", cfg, shards=1)
    eng = load_engine(d, RuntimeOptions(device="cpu", dtype=dtype, ctx_size=64))
    ids = prompt(20, seed=8)

    def decode_all() -> torch.Tensor:
        eng.model(ids[:4], 0)
        return torch.cat([eng.model(ids[i:i + 1], i) for i in range(4, 20)])

    native_path = decode_all()
    assert dispatch.attention_path(eng.model.caches[0].k) == ("native_attention" if native.available() else "sdpa")
    monkeypatch.setattr(dispatch, "attention_path", lambda keys: "sdpa")
    sdpa_path = decode_all()
    assert rel_err(native_path, sdpa_path) < (1e-5 if dtype == "float32" else 2e-2)
