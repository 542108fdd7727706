"""`perplexity --kl-base` and `--save-logits`: the divergence against a hand computation, a model against
itself, the logits file's round trip, and bad input as one line."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from tiny import TINY_CONFIG, write_checkpoint

from mixtral_cli.checkpoints.quantize import quantize_checkpoint
from mixtral_cli.engine.evaluate import divergence, perplexity, scored_rows, window_logprobs, windows
from mixtral_cli.engine.loader import RuntimeOptions, load_engine
from mixtral_cli.engine.logits_file import LogitsReader, LogitsWriter, decode_rows, encode_rows

TEXT = "The quick brown fox jumps over the lazy dog, and then it runs away. " * 8
OPTS = RuntimeOptions(device="cpu", dtype="float32", ctx_size=32, prefetch=False)


def mixtral(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "mixtral_cli", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def assert_one_line(proc: subprocess.CompletedProcess, needle: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], proc.stderr


@pytest.fixture(scope="module")
def q4(tmp_path_factory, tiny_ckpt):
    """4-bit experts and attention; the output layer dense, so that its logits do not depend on how
    many rows one call takes (the native int8 kernel quantizes its activations, the dequantize path
    for more rows does not)."""
    return quantize_checkpoint(tiny_ckpt, tmp_path_factory.mktemp("kl") / "q4", 4, output_bits=16)


def ids_of(n: int, seed: int = 3) -> list[int]:
    return torch.randint(3, 32000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_divergence_matches_a_hand_computation(tiny_ckpt, q4):
    """Every window run in one forward pass, KL(p || q) = sum p (log p - log q) in float64 by hand."""
    base, model = load_engine(tiny_ckpt, OPTS), load_engine(q4, OPTS)
    ids, ctx = ids_of(45), 20
    kls, diffs, agree = [], [], 0
    for w in windows(ids, ctx):
        t = torch.tensor(w)
        logp = torch.log_softmax(base.model(t, 0).double(), -1)[:-1]
        logq = torch.log_softmax(model.model(t, 0).double(), -1)[:-1]
        kls += (logp.exp() * (logp - logq)).sum(-1).tolist()
        nxt = t[1:, None]
        diffs += (logp.gather(1, nxt) - logq.gather(1, nxt))[:, 0].tolist()
        agree += int((logp.argmax(-1) == logq.argmax(-1)).sum())
    got = divergence(model.model, ids, ctx, lambda w: window_logprobs(base.model, w))
    n = len(kls)
    assert got.tokens_scored == n == 42 and got.windows == 3
    mean = sum(kls) / n
    assert mean > 1e-5 and got.kl_divergence == pytest.approx(mean, rel=1e-4)
    assert got.kl_divergence_median == pytest.approx(sorted(kls)[n // 2 - 1:n // 2 + 1][0], rel=1e-3)
    assert got.kl_divergence_p99 <= max(kls) * (1 + 1e-4) and got.kl_divergence_p99 >= sorted(kls)[-2] * (1 - 1e-4)
    assert got.top1_agreement == agree / n
    assert got.ppl_ratio == pytest.approx(math.exp(sum(diffs) / n), rel=1e-5)
    sd = math.sqrt(sum((d - sum(diffs) / n) ** 2 for d in diffs) / (n - 1))
    assert got.ppl_ratio_uncertainty == pytest.approx(got.ppl_ratio * sd / math.sqrt(n), rel=1e-4)


def test_a_model_against_itself_and_against_its_own_logits_file(tiny_ckpt, tmp_path):
    eng = load_engine(tiny_ckpt, OPTS)
    ids, ctx = ids_of(70, seed=4), 32
    same = divergence(eng.model, ids, ctx, lambda w: window_logprobs(eng.model, w))
    assert abs(same.kl_divergence) < 1e-12 and same.top1_agreement == 1.0 and same.ppl_ratio == pytest.approx(1.0)
    path = tmp_path / "base.logits"
    with LogitsWriter(path, eng.args.vocab_size, ctx, ids, scored_rows(ids, ctx)) as w:
        ppl = perplexity(eng.model, ids, ctx, keep=w.add)
    reader = LogitsReader(path)
    assert reader.ids == ids and reader.ctx == ctx and reader.rows == 67
    from mixtral_cli.cli.scoring import file_base

    res = divergence(eng.model, ids, ctx, file_base(reader, eng, ctx, ids))
    assert 0 <= res.kl_divergence < 1e-6 and res.top1_agreement == 1.0
    assert res.base_perplexity == pytest.approx(ppl.perplexity, rel=1e-5)


def test_logits_codes_round_trip_within_half_a_step():
    logp = torch.log_softmax(torch.randn(3, 500, generator=torch.Generator().manual_seed(1)) * 4, -1)
    bounds, codes = encode_rows(logp)
    assert codes.dtype == torch.int16 and bounds.shape == (3, 2)
    back = decode_rows(bounds, codes)
    step = (bounds[:, 1] - bounds[:, 0]).double()[:, None] / 65535
    shift = (back - logp.double()).mean(-1, keepdim=True)  # the renormalisation moves every entry alike
    assert bool(((back - logp.double() - shift).abs() <= step).all())  # half a step, and the shift's own error


def test_cli_kl_base_model_and_file(tiny_ckpt, q4, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    logits = tmp_path / "base.logits"
    saved = mixtral("perplexity", str(text), "-m", str(tiny_ckpt), "--ctx", "16", "--save-logits", str(logits), "--json")
    assert saved.returncode == 0, saved.stderr
    assert logits.is_file() and not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    via_model = mixtral("perplexity", str(text), "-m", str(q4), "--ctx", "16", "--kl-base", str(tiny_ckpt), "--json")
    via_file = mixtral("perplexity", str(text), "-m", str(q4), "--ctx", "16", "--kl-base", str(logits), "--json")
    a, b = json.loads(via_model.stdout), json.loads(via_file.stdout)
    assert a["kl_divergence"] > 0 and b["kl_divergence"] == pytest.approx(a["kl_divergence"], rel=1e-2, abs=1e-6)
    assert a["top1_agreement"] == b["top1_agreement"]
    assert set(a) >= {"kl_divergence", "kl_divergence_median", "kl_divergence_p99", "top1_agreement", "ppl_ratio",
                      "ppl_ratio_uncertainty", "perplexity", "base_perplexity"}

    # bad input: one line, exit 2
    assert_one_line(mixtral("perplexity", str(text), "-m", str(q4), "--ctx", "8", "--kl-base", str(logits)),
                    "--ctx 16")
    other = tmp_path / "other.txt"
    other.write_text(TEXT[::-1])
    assert_one_line(mixtral("perplexity", str(other), "-m", str(q4), "--ctx", "16", "--kl-base", str(logits)),
                    "other text")
    big_vocab = write_checkpoint(tmp_path / "v33k", dict(TINY_CONFIG, vocab_size=32768), shards=1)
    assert_one_line(mixtral("perplexity", str(text), "-m", str(big_vocab), "--ctx", "16", "--kl-base", str(tiny_ckpt)),
                    "vocabulary")
    assert_one_line(mixtral("perplexity", str(text), "-m", str(big_vocab), "--ctx", "16", "--kl-base", str(logits)),
                    "32000 tokens")
    cut = tmp_path / "cut.logits"
    cut.write_bytes(logits.read_bytes()[:-10])
    assert_one_line(mixtral("perplexity", str(text), "-m", str(q4), "--ctx", "16", "--kl-base", str(cut)), "truncated")
    assert_one_line(mixtral("perplexity", str(text), "-m", str(q4), "--kl-base", str(logits), "--save-logits",
                            str(tmp_path / "x")), "separate runs")
