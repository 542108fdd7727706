"""Routing traces: what `--trace` records against what the model routes, the file format and its
damage checks, and the numbers `mixtral experts` reports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_cli import assert_user_error, mixtral

from mixtral_cli.engine.generate import Session
from mixtral_cli.engine.routing_stats import routing_stats
from mixtral_cli.engine.trace import Pass, TraceError, TraceHeader, TraceWriter, read_trace, recording

PROMPT = "Hello there my friend"


def hf_routing(hf_model, ids: list[int]) -> list[list[list[int]]]:
    """[T][L][A] the top-k experts transformers' router picks for `ids` in one forward pass."""
    with torch.no_grad():
        logits = hf_model(torch.tensor([ids]), output_router_logits=True).router_logits  # L x [T, E]
    k = hf_model.config.num_experts_per_tok
    per_layer = [torch.topk(torch.softmax(x.float(), dim=-1), k, dim=-1).indices.tolist() for x in logits]
    return [list(per_token) for per_token in zip(*per_layer, strict=True)]


def test_run_trace_is_what_the_router_picks(tiny_ckpt, hf_tiny, tmp_path):
    path = tmp_path / "run.trace"
    proc = mixtral("run", "-m", str(tiny_ckpt), "--raw", "--json", "--temp", "0", "-n", "6", "--device", "cpu",
                   "--dtype", "float32", "--trace", str(path), PROMPT)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    trace = read_trace(path)
    assert trace.header == TraceHeader(str(tiny_ckpt), 3, 8, 2)
    prompt, generated = out["prompt_token_ids"], out["token_ids"]
    assert [(p.phase, p.pos, p.tokens) for p in trace.passes] == (
        [("prefill", 0, prompt)] + [("decode", len(prompt) + i, [t]) for i, t in enumerate(generated[:-1])])
    fed = prompt + generated[:-1]  # the last generated token is never fed back
    assert [e for p in trace.passes for e in p.experts] == hf_routing(hf_tiny, fed)


def test_prefill_chunks_are_passes_and_match_the_router(engine_fp32, tmp_path):
    """A prompt longer than the chunk is several prefill passes; each row equals the router applied to
    the MoE block's input (taken with a forward hook)."""
    model = engine_fp32.model
    seen: dict[int, list] = {}  # layer -> [T][A] per pass, in order

    def hook(block, inputs):
        probs = torch.softmax(block.gate(inputs[0]).float(), dim=-1)  # [T, E]
        seen.setdefault(block.layer, []).append(torch.topk(probs, block.top_k, dim=-1).indices.tolist())

    handles = [layer.block_sparse_moe.register_forward_pre_hook(hook) for layer in model.model.layers]
    path = tmp_path / "chunks.trace"
    try:
        with recording(model, path, "tiny"):
            session = Session(model, chunk=4)
            logits, _ = session.prefill(list(range(100, 110)))
            session.step(int(torch.argmax(logits)))
    finally:
        for h in handles:
            h.remove()
    assert model.trace is None
    trace = read_trace(path)
    assert [(p.phase, p.pos, len(p.tokens)) for p in trace.passes] == [
        ("prefill", 0, 4), ("prefill", 4, 4), ("prefill", 8, 2), ("decode", 10, 1)]
    for n, p in enumerate(trace.passes):
        assert p.experts == [[seen[L][n][t] for L in range(3)] for t in range(len(p.tokens))]


def test_an_interrupted_pass_is_not_written(tmp_path):
    """Ctrl-C mid-pass: the layers recorded so far are dropped when the next pass starts at layer 0."""
    path = tmp_path / "t.trace"
    w = TraceWriter(path, TraceHeader("m", 2, 4, 2))
    w.record(0, [[3, 2]])  # the pass that was interrupted
    w.record(0, [[0, 1], [1, 2]])
    w.record(1, [[2, 3], [3, 0]])
    w.commit("prefill", 0, [7, 8])
    w.close()
    assert read_trace(path).passes == [Pass("prefill", 0, [7, 8], [[[0, 1], [2, 3]], [[1, 2], [3, 0]]])]
    with pytest.raises(RuntimeError, match="layer 1 recorded after 0 layers"):
        TraceWriter(tmp_path / "u.trace", TraceHeader("m", 2, 4, 2)).record(1, [[0, 1]])


def write_lines(path: Path, *objects) -> Path:
    path.write_text("".join(json.dumps(o) + "\n" for o in objects))
    return path


HEADER = {"format": "mixtral-routing-trace", "version": 1, "model": "hand", "num_layers": 2, "num_experts": 4,
          "top_k": 2}
# two sequences: a prompt of 3 and one decode step; then a new one (pos 0) of 1 prompt token and one step
HAND = [
    {"phase": "prefill", "pos": 0, "tokens": [1, 5, 6], "experts": [[[0, 1], [2, 3]], [[1, 2], [2, 3]], [[0, 1], [3, 0]]]},
    {"phase": "decode", "pos": 3, "tokens": [7], "experts": [[[3, 1], [0, 2]]]},
    {"phase": "prefill", "pos": 0, "tokens": [1], "experts": [[[0, 1], [1, 2]]]},
    {"phase": "decode", "pos": 1, "tokens": [9], "experts": [[[0, 2], [1, 3]]]},
]
END = {"end": {"passes": 4, "tokens": 6}}


def test_the_writer_writes_what_docs_format_describes(tmp_path):
    """The writer's file is the documented one line for line, and reads back as written."""
    path = tmp_path / "w.trace"
    w = TraceWriter(path, TraceHeader("hand", 2, 4, 2))
    for p in HAND:
        for L in range(2):
            w.record(L, [per_token[L] for per_token in p["experts"]])
        w.commit(p["phase"], p["pos"], p["tokens"])
    w.close()
    assert [json.loads(line) for line in path.read_text().splitlines()] == [HEADER, *HAND, END]
    trace = read_trace(path)
    assert trace.passes == [Pass(**p) for p in HAND] and trace.tokens == 6


def test_usage_and_reuse_worked_out_by_hand(tmp_path):
    """Layer 0 picks expert 0 four times of 12, 1 five times, 2 twice, 3 once. Pairs: tokens at pos 1,
    2, 3 of the first sequence and pos 1 of the second (the second's pos 0 follows pos 3: no pair).
    Layer 0 shares 1 expert with the previous token in every pair: 4 of 8; layer 1 shares 2, 1, 1, 1:
    5 of 8."""
    path = write_lines(tmp_path / "hand.trace", HEADER, *HAND, END)
    s = routing_stats(read_trace(path))
    assert (s.tokens, s.pairs) == (6, 4)
    assert s.counts == [[4, 5, 2, 1], [2, 2, 4, 4]]
    assert s.shares[0] == [4 / 12, 5 / 12, 2 / 12, 1 / 12]
    assert s.reuse == [0.5, 0.625] and s.mean_reuse == 9 / 16 and s.random_reuse == 0.5
    decode = routing_stats(read_trace(path), "decode")  # each decode token's previous is a prompt token
    assert (decode.tokens, decode.pairs, decode.counts, decode.reuse) == (2, 2, [[1, 1, 1, 1]] * 2, [0.5, 0.5])
    prefill = routing_stats(read_trace(path), "prefill")
    assert (prefill.tokens, prefill.pairs, prefill.reuse) == (4, 2, [0.5, 0.75])

    proc = mixtral("experts", str(path), "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["counts"] == s.counts and data["reuse"] == [0.5, 0.625] and data["pairs"] == 4
    assert json.loads(mixtral("experts", str(path), "--tokens", "prefill", "--json").stdout)["reuse"] == [0.5, 0.75]
    table = mixtral("experts", str(path))
    assert table.returncode == 0, table.stderr
    rows = [line for line in table.stdout.splitlines() if line.strip().startswith(("│", "|"))]
    assert [cell.strip() for cell in rows[0].strip("│| ").split("│")] == ["0", "33.3", "41.7", "16.7", "8.3", "50%"]
    assert "56% over 4 consecutive pairs (50% for random routing)" in " ".join(table.stdout.split())


def _cut(text: str, n: int) -> str:
    return text[:n]


DAMAGE = {
    "no end record": (lambda t: t[:t.rindex('{"end"')], "truncated: 4 whole passes and no end record"),
    "cut mid-line": (lambda t: _cut(t, t.index('{"phase": "decode", "pos": 1') + 20), "truncated: 3 whole passes"),
    "end record cut": (lambda t: t[:-3], "truncated"),
    "header only": (lambda t: t[:t.index("\n") + 1], "truncated: 0 whole passes"),
    "empty": (lambda t: "", "is not a routing trace"),
    "not json": (lambda t: "hello\n", "is not a routing trace"),
    "binary": (lambda t: "\udcff\x00\x01", "is not a routing trace"),
    "other json": (lambda t: '{"format": "mixtral-logits"}\n' + t, "is not a routing trace"),
    "newer version": (lambda t: t.replace('"version": 1', '"version": 2', 1), "version 2 is not supported"),
    "end count wrong": (lambda t: t.replace('"passes": 4', '"passes": 5'), "its end record counts 5 passes"),
    "expert id too big": (lambda t: t.replace("[[3, 1], [0, 2]]", "[[3, 4], [0, 2]]"), "line 3 is damaged"),
    "expert twice": (lambda t: t.replace("[[3, 1], [0, 2]]", "[[1, 1], [0, 2]]"), "2 distinct expert ids below 4"),
    "layer missing": (lambda t: t.replace("[[3, 1], [0, 2]]", "[[3, 1]]"), "all 2 layers"),
    "decode of two": (lambda t: t.replace('"tokens": [7], "experts": [[[3, 1], [0, 2]]]',
                                          '"tokens": [7, 8], "experts": [[[3, 1], [0, 2]], [[3, 1], [0, 2]]]'),
                      "a decode pass computes one token"),
    "garbage line": (lambda t: t.replace('{"phase": "decode", "pos": 3', 'xx{"phase": "decode", "pos": 3'), "line 3"),
    "after the end": (lambda t: t + json.dumps(HAND[0]) + "\n", "text after the end record"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_traces_are_one_line_errors(tmp_path, damage):
    change, needle = DAMAGE[damage]
    good = write_lines(tmp_path / "good.trace", HEADER, *HAND, END).read_text()
    path = tmp_path / "bad.trace"
    path.write_bytes(change(good).encode("utf-8", "surrogateescape"))
    with pytest.raises(TraceError, match=needle.replace("(", r"\(")):
        read_trace(path)
    assert_user_error(mixtral("experts", str(path)), needle)


def test_missing_trace_and_bad_targets(tmp_path, tiny_ckpt):
    assert_user_error(mixtral("experts", str(tmp_path / "nope.trace")), "cannot read the trace", "nope.trace")
    assert_user_error(mixtral("experts", str(write_lines(tmp_path / "h.trace", HEADER, *HAND, END)), "--tokens", "odd"),
                      "--tokens must be all, prefill or decode")
    # refused before the model loads: a directory, or a file in a directory that does not exist
    assert_user_error(mixtral("run", "-m", "acme/not-there", "--trace", str(tmp_path), "hi"), "is a directory")
    assert_user_error(mixtral("run", "-m", str(tiny_ckpt), "--trace", str(tmp_path / "no" / "t"), "hi"),
                      "does not exist")


def test_chat_and_bench_record_their_passes(tiny_ckpt, tmp_path):
    chat = tmp_path / "chat.trace"
    proc = mixtral("chat", "-m", str(tiny_ckpt), "--temp", "0", "-n", "3", "--trace", str(chat), stdin="Hi\nAgain\n")
    assert proc.returncode == 0, proc.stderr
    passes = read_trace(chat).passes
    phases = [p.phase for p in passes]
    assert phases == ["prefill", "decode", "decode", "prefill", "decode", "decode"]
    assert passes[3].pos <= passes[2].pos + 1  # turn 2 prefills from where the cache stops matching
    bench = tmp_path / "bench.trace"
    proc = mixtral("bench", "--preset", "tiny", "--prompt-tokens", "8", "--gen-tokens", "3", "--json",
                   "--trace", str(bench))
    assert proc.returncode == 0, proc.stderr
    trace = read_trace(bench)
    assert trace.header.model == "preset:tiny"
    # one untimed round: the prompt, then the 4 warm-up and 3 measured steps
    assert [(p.phase, p.pos, len(p.tokens)) for p in trace.passes] == (
        [("prefill", 0, 8)] + [("decode", 8 + i, 1) for i in range(7)])
