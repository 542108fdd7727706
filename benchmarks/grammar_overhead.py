"""What a grammar adds to each decoded token, through our own integration (CPU).

    python benchmarks/grammar_overhead.py [--rounds N] [--seeds S] [--max-tokens T] [--skip-mini]
        [--mini-dtype bfloat16|float32] [--json OUT]

Section 8 of docs/benchmarks.md measured the engine (llguidance) alone; this measures the path
`Completion.tokens` takes with `cfg.grammar` set: `Constraint.allowed()` (llguidance's
`compute_logit_bias`, then the bool [V] tensor via `torch.frombuffer`), `Sampler.restrict` (the
`masked_fill` of the forbidden tokens) and `Constraint.advance`. On both real vocabularies (the
SentencePiece files mistral-common ships: v1, 32000 pieces; v3, 32768) and five grammars: the
schemas of tests/test_grammar.py (`small`, `medium`, `non-ascii`), `Grammar.json_object()`
(`object`), and the reply grammar of a chat request with two tools and `tool_choice: "required"`
(`tools`, built by `server.tool_calls.reply_grammar`, as the server does).

1. **per token**: `--seeds` generations per vocabulary and grammar on the tiny test model
   (tests/tiny.py, fp32; the v3 one at vocabulary 32768 with the v3 tokenizer), sampled at
   temperature 0.8 with the default top-k/top-p/min-p, so the tokens are the ones a model picks
   under the mask. `Constraint.allowed`, `Constraint.advance`, `Sampler.restrict` and
   `Session.step` are wrapped with `perf_counter` timers; at each masked step `restrict` is also
   run without the mask on the same fp32 logits (the two in alternating order) and the masked
   result is the one used. `overhead` per token = allowed + (restrict with mask - restrict
   without) + advance: what the grammar adds to a step on the CPU. Median, p99 and max over all
   steps of all generations. Each generation's tokens are then replayed through a fresh matcher
   to time `allowed()`'s two halves apart (`engine`: `compute_logit_bias`; `to_tensor`: the bytes
   to a bool [V] tensor), back to back and so with warm caches.
2. **end to end**: decode tokens/s (`GenerationStats.decode_tokens_per_s`: the steps after the
   first over the decode time, which includes sampling and, with a grammar, the mask) with and
   without the grammar, unpatched code, same prompt and seeds. The run without the grammar is
   capped at the token count the grammar's run gave (measured once, untimed, first), so both arms
   decode the same number of positions. `--rounds` rounds, the order of the two arms alternating
   from round to round (A/B, B/A, ...), medians over the rounds. On the tiny model (where a
   decode step costs about as much as the sampler, the worst case for the ratio) and, unless
   `--skip-mini`, on the synthetic `mini` preset (`mixtral bench --preset mini`'s random weights,
   8 layers at 1024 wide, 1.4 GB of bf16 experts; the bench command has no grammar option), whose
   decode step is a realistic cost on a CPU.

The goal this checks (the constrained-decoding issue): the mask's overhead per token under 1 ms
(2% of a ~50 ms GPU decode step), or overlapped with the forward pass. On CUDA `Completion`
computes it after the next forward pass has been queued and before its logits are read, so there
it runs while the GPU works; on the CPU the forward pass is synchronous and the overhead adds up.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from importlib import resources
from pathlib import Path

import llguidance
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from test_grammar import MEDIUM, NON_ASCII, SMALL  # noqa: E402
from tiny import TINY_CONFIG, write_checkpoint  # noqa: E402

from mixtral_cli.bench.synthetic import SyntheticCheckpoint, preset_args  # noqa: E402
from mixtral_cli.checkpoints.layout import Quantization  # noqa: E402
from mixtral_cli.checkpoints.tokenizer import Tokenizer  # noqa: E402
from mixtral_cli.engine import generate, grammar, sampling  # noqa: E402
from mixtral_cli.engine.generate import Completion, Session  # noqa: E402
from mixtral_cli.engine.grammar import Grammar  # noqa: E402
from mixtral_cli.engine.loader import RuntimeOptions, build_engine, load_engine  # noqa: E402
from mixtral_cli.server.protocol import ChatRequest  # noqa: E402
from mixtral_cli.server.tool_calls import reply_grammar, tool_plan  # noqa: E402
from mixtral_cli.settings import GenerationConfig, SamplingConfig  # noqa: E402

TOKENIZERS = {"v1": "tokenizer.model.v1", "v3": "mistral_instruct_tokenizer_240323.model.v3"}  # tests/conftest.py
VOCAB = {"v1": 32000, "v3": 32768}
MODEL = "lscpu | grep 'Model name'"
AVX = r"""lscpu | grep -o 'avx[^ ]*' | tr '\n' ' '"""
PROMPT = "Describe a person as JSON."
TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "The weather in a city.",
        "parameters": {"type": "object", "additionalProperties": False, "required": ["city"],
                       "properties": {"city": {"type": "string", "maxLength": 40},
                                      "unit": {"enum": ["celsius", "fahrenheit"]}}}}},
    {"type": "function", "function": {
        "name": "search_flights", "description": "Flights between two airports on a date.",
        "parameters": {"type": "object", "additionalProperties": False, "required": ["from", "to", "date"],
                       "properties": {"from": {"type": "string", "pattern": "^[A-Z]{3}$"},
                                      "to": {"type": "string", "pattern": "^[A-Z]{3}$"},
                                      "date": {"type": "string", "pattern": "^2026-[01][0-9]-[0-3][0-9]$"},
                                      "passengers": {"type": "integer", "minimum": 1, "maximum": 9}}}}},
]


def tokenizer_path(name: str) -> Path:
    return Path(str(resources.files("mistral_common") / "data" / TOKENIZERS[name]))


def grammars(tok: Tokenizer) -> dict[str, Grammar]:
    """The five grammars, each checked against `tok` (as the server does before generating)."""
    req = ChatRequest(messages=[{"role": "user", "content": PROMPT}], tools=TOOLS, tool_choice="required")
    out = {"small": Grammar.json_schema(SMALL), "medium": Grammar.json_schema(MEDIUM),
           "non-ascii": Grammar.json_schema(NON_ASCII), "object": Grammar.json_object(),
           "tools": reply_grammar(tool_plan(req), tok, None)}
    for g in out.values():
        g.check(tok)
    return out


def config(g: Grammar | None, seed: int, max_tokens: int) -> GenerationConfig:
    return GenerationConfig(max_tokens=max_tokens, grammar=g, sampling=SamplingConfig(temperature=0.8, seed=seed))


def complete(engine, g: Grammar | None, seed: int, max_tokens: int) -> Completion:
    prompt = engine.tokenizer.encode_instruct([{"role": "user", "content": PROMPT}])
    c = Completion(Session(engine.model), engine.tokenizer, prompt, config(g, seed, max_tokens))
    c.text = "".join(c)
    return c


# -- 1. per token -------------------------------------------------------------------------------------------
class Timers:
    """perf_counter timers around the grammar's steps, installed on the classes while in use."""

    KEYS = ("allowed", "restrict_mask", "restrict_plain", "advance", "step")

    def __init__(self) -> None:
        self.t: dict[str, list[float]] = {k: [] for k in self.KEYS}
        self._saved: list[tuple[type, str, object]] = []
        self._flip = False

    def __enter__(self) -> Timers:
        def timed(cls: type, name: str, key: str) -> None:
            inner = getattr(cls, name)
            self._saved.append((cls, name, inner))

            def wrapper(*args, **kwargs):
                t0 = time.perf_counter()
                out = inner(*args, **kwargs)
                self.t[key].append(time.perf_counter() - t0)
                return out
            setattr(cls, name, wrapper)

        timed(grammar.Constraint, "allowed", "allowed")
        timed(grammar.Constraint, "advance", "advance")
        timed(generate.Session, "step", "step")
        inner = sampling.Sampler.restrict
        self._saved.append((sampling.Sampler, "restrict", inner))

        def restrict(sampler, logits, allowed=None):
            if allowed is None:
                return inner(sampler, logits, allowed)
            self._flip = not self._flip
            runs = [(allowed, "restrict_mask"), (None, "restrict_plain")]
            out = None
            for mask, key in (runs if self._flip else runs[::-1]):
                t0 = time.perf_counter()
                r = inner(sampler, logits, mask)
                self.t[key].append(time.perf_counter() - t0)
                if mask is not None:
                    out = r
            return out
        sampling.Sampler.restrict = restrict
        return self

    def __exit__(self, *exc) -> None:
        for cls, name, inner in reversed(self._saved):
            setattr(cls, name, inner)


def summary(xs: list[float]) -> dict[str, float]:
    """Median, p99 and max in microseconds."""
    s = sorted(xs)
    return {"median": statistics.median(s) * 1e6, "p99": s[min(len(s) - 1, int(0.99 * len(s)))] * 1e6,
            "max": s[-1] * 1e6, "n": len(s)}


def replay(g: Grammar, tok: Tokenizer, ids: list[int], bias: list[float], tensor: list[float]) -> None:
    """`ids` through a fresh matcher, `Constraint.allowed`'s two halves timed apart: llguidance's
    `compute_logit_bias`, and the bytes to a bool [V] tensor."""
    matcher = llguidance.LLMatcher(grammar._cached(tok)[1], g.text, log_level=0, limits=grammar._limits())
    for token in ids:
        t0 = time.perf_counter()
        b = matcher.compute_logit_bias()
        t1 = time.perf_counter()
        torch.frombuffer(bytearray(b), dtype=torch.uint8)[:tok.vocab_size].bool()
        t2 = time.perf_counter()
        bias.append(t1 - t0)
        tensor.append(t2 - t1)
        if token != tok.eos_id:
            matcher.consume_token(token)


def per_token(engine, tok: Tokenizer, gs: dict[str, Grammar], seeds: int, max_tokens: int) -> list[dict]:
    rows = []
    complete(engine, gs["small"], 0, 8)  # warm-up: torch's first calls, the tokenizer tables
    for name, g in gs.items():
        timers, lengths, valid, bias, tensor = Timers(), [], 0, [], []
        with timers:
            for seed in range(seeds):
                start = {k: len(v) for k, v in timers.t.items()}
                c = complete(engine, g, seed, max_tokens)
                lengths.append(len(c.token_ids))
                valid += c.finish_reason == "stop" and c.constraint.complete
                # a step's advance is missing where the token was EOS: count it as 0 there
                n_adv = len(timers.t["advance"]) - start["advance"]
                timers.t["advance"].extend([0.0] * (len(c.token_ids) - n_adv))
                replay(g, tok, c.token_ids, bias, tensor)
        t = timers.t
        over = [a + (m - p) + d for a, m, p, d in zip(t["allowed"], t["restrict_mask"], t["restrict_plain"],
                                                      t["advance"], strict=True)]
        rows.append({"grammar": name, "tokens": sum(lengths), "lengths": lengths, "complete": valid,
                     "allowed": summary(t["allowed"]), "engine": summary(bias), "to_tensor": summary(tensor),
                     "restrict_mask": summary(t["restrict_mask"]),
                     "restrict_plain": summary(t["restrict_plain"]), "advance": summary(t["advance"]),
                     "overhead": summary(over), "over_1ms": sum(x > 1e-3 for x in over),
                     "step": summary(t["step"])})
    return rows


# -- 2. end to end ------------------------------------------------------------------------------------------
def end_to_end(engine, gs: dict[str, Grammar], seeds: int, max_tokens: int, rounds: int) -> list[dict]:
    complete(engine, None, 0, 8)  # warm-up
    lengths = {(name, s): len(complete(engine, g, s, max_tokens).token_ids) for name, g in gs.items()
               for s in range(seeds)}
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in gs}  # (without, with) per round
    for r in range(rounds):
        for name, g in gs.items():
            steps, secs = {"A": 0, "B": 0}, {"A": 0.0, "B": 0.0}
            for s in range(seeds):
                for arm in ("AB" if r % 2 == 0 else "BA"):
                    c = complete(engine, g if arm == "B" else None, s, lengths[name, s])
                    steps[arm] += max(c.stats.completion_tokens - 1, 0)
                    secs[arm] += c.stats.decode_s
            runs[name].append((steps["A"] / secs["A"], steps["B"] / secs["B"]))
    rows = []
    for name, rs in runs.items():
        slow = [100 * (1 - b / a) for a, b in rs]
        rows.append({"grammar": name, "tokens": sum(v for (n, _), v in lengths.items() if n == name),
                     "without": statistics.median(a for a, _ in rs), "with": statistics.median(b for _, b in rs),
                     "slowdown_pct": statistics.median(slow), "slowdown_min": min(slow), "slowdown_max": max(slow)})
    return rows


# -- engines and report -------------------------------------------------------------------------------------
def tiny_engine(vocab: str, where: Path):
    cfg = TINY_CONFIG | {"vocab_size": VOCAB[vocab]}
    path = write_checkpoint(where / f"tiny-{vocab}", cfg, tokenizer=tokenizer_path(vocab))
    return load_engine(path, RuntimeOptions(device="cpu", dtype="float32"))


def mini_engine(vocab: str, dtype: str):
    args = replace(preset_args("mini"), vocab_size=VOCAB[vocab])
    return build_engine(SyntheticCheckpoint(args, Quantization()), Tokenizer.from_file(tokenizer_path(vocab)),
                        RuntimeOptions(device="cpu", dtype=dtype, ctx_size=1024))


def machine() -> str:
    def sh(cmd: str) -> str:
        return subprocess.run(cmd, shell=True, capture_output=True, text=True).stdout.strip()
    from importlib.metadata import version
    model, load = " ".join(sh(MODEL).split()), open("/proc/loadavg").read().split()[:3]
    return (f"{time.strftime('%Y-%m-%d')}, {model}, {sh('nproc')} cores, "
            f"{torch.get_num_threads()} torch threads; {sh(AVX)}; Python {platform.python_version()}, "
            f"torch {torch.__version__}, llguidance {version('llguidance')}; "
            f"load average {' '.join(load)}")


def print_per_token(vocab: str, rows: list[dict]) -> None:
    print(f"\nper token, {vocab} ({VOCAB[vocab]}), tiny model: us median / p99 / max")
    print("| vocab | grammar | steps | complete | allowed() | (engine / to tensor, replayed) | restrict, mask "
          "| restrict, no mask | advance() | **overhead** | > 1 ms | forward step (tiny) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")

    def f(s: dict) -> str:
        return f"{s['median']:.1f} / {s['p99']:.0f} / {s['max']:.0f}"
    for r in rows:
        print(f"| {vocab} | {r['grammar']} | {r['tokens']} | {r['complete']}/{len(r['lengths'])} | {f(r['allowed'])} "
              f"| {r['engine']['median']:.1f} / {r['to_tensor']['median']:.1f} | {f(r['restrict_mask'])} | {f(r['restrict_plain'])} | {f(r['advance'])} | **{f(r['overhead'])}** "
              f"| {r['over_1ms']} | {r['step']['median']:.0f} |")


def print_end_to_end(model: str, vocab: str, rows: list[dict]) -> None:
    print(f"\nend to end, {model}, {vocab}: decode tokens/s (median of rounds)")
    print("| model | vocab | grammar | tokens per round | tok/s without | tok/s with | slowdown % (min..max) "
          "| step ms without |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {model} | {vocab} | {r['grammar']} | {r['tokens']} | {r['without']:.1f} | {r['with']:.1f} "
              f"| {r['slowdown_pct']:.1f} ({r['slowdown_min']:.1f}..{r['slowdown_max']:.1f}) "
              f"| {1e3 / r['without']:.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=4, help="end-to-end rounds, A/B order alternating")
    ap.add_argument("--seeds", type=int, default=5, help="generations per vocabulary and grammar")
    ap.add_argument("--max-tokens", type=int, default=200)
    ap.add_argument("--mini-seeds", type=int, default=2, help="generations per grammar on mini, per round")
    ap.add_argument("--skip-mini", action="store_true")
    ap.add_argument("--mini-dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--json", type=Path, help="also write every figure here")
    a = ap.parse_args()
    print(f"machine: {machine()}", flush=True)
    result: dict = {"machine": machine(), "args": vars(a) | {"json": str(a.json)}, "per_token": {}, "end_to_end": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for vocab in ("v1", "v3"):
            engine = tiny_engine(vocab, Path(tmp))
            gs = grammars(engine.tokenizer)
            rows = per_token(engine, engine.tokenizer, gs, a.seeds, a.max_tokens)
            result["per_token"][vocab] = rows
            print_per_token(vocab, rows)
            rows = end_to_end(engine, gs, a.seeds, a.max_tokens, a.rounds)
            result["end_to_end"][f"tiny-{vocab}"] = rows
            print_end_to_end("tiny", vocab, rows)
            sys.stdout.flush()
    if not a.skip_mini:
        for vocab in ("v1", "v3"):
            t0 = time.perf_counter()
            engine = mini_engine(vocab, a.mini_dtype)
            print(f"\nmini ({a.mini_dtype}, vocabulary {VOCAB[vocab]}) built in {time.perf_counter() - t0:.0f} s",
                  flush=True)
            rows = end_to_end(engine, grammars(engine.tokenizer), a.mini_seeds, a.max_tokens, a.rounds)
            result["end_to_end"][f"mini-{vocab}"] = rows
            print_end_to_end(f"mini ({a.mini_dtype})", vocab, rows)
            del engine
            sys.stdout.flush()
    if a.json:
        a.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
