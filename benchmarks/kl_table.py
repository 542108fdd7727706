"""KL divergence, top-1 agreement and perplexity ratio of every quantization worth using, with what
each costs per decoded token: the table that chooses `mixtral quantize`'s defaults.

    python benchmarks/kl_table.py --model /tmp/mem-mixtral [--text memorised=PATH --text held-out=PATH]
                                  [--ctx 256] [--configs 8.8.8,4.4.8,...] [--reps 2]
                                  [--mini-configs 16.16.16,4.4.4,...] [--mini-reps 2]

A configuration is `E.A.O`: the bits of the experts, of attention (q/k/v/o) and of the output layer
(`lm_head`), each 16 (bfloat16), 8 (int8) or 4 (nf4); experts are 8 or 4 (`mixtral quantize` needs
one of them). For the trained model MODEL (`train_small_mixtral.py`; random weights make
quantization look harmless) it runs, each as its own `python -m mixtral_cli` process:

1. `quantize MODEL --bits E --attn-bits A --output-bits O --out MODEL-qE.A.O` per configuration
   (kept with `--no-quantize` when it exists);
2. `perplexity TEXT -m MODEL-qE.A.O --kl-base MODEL --ctx CTX --json --device cpu --dtype bfloat16`
   per text and configuration (the CPU path a user runs: native kernels, bf16 activations), and once
   with MODEL against itself, whose KL must be 0;
3. `run PROMPT -m M --raw --json --temp 0 -n 64 --device cpu --dtype bfloat16`, `--reps` times per
   checkpoint, interleaved: the median decode tokens/s (at this size dispatch dominates a step);
4. with `--mini-configs`, `bench --preset mini --bits E --attn-bits A --output-bits O --device cpu`
   interleaved `--mini-reps` times: decode and prefill tokens/s where weight reads matter (random
   weights: speed only, no quality).

Bytes per decoded token come from `mixtral_cli.engine.plan.bytes_per_token` (the planner's count,
tested against hand computation) for the trained model, `mini` and the real 8x7B. Prints a Markdown
report and writes every raw number to `--json-out`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
from pathlib import Path

from quant_quality import cli, last_json, machine, machine_line

from mixtral_cli.bench.synthetic import PRESETS
from mixtral_cli.checkpoints.config import ModelArgs, load_config
from mixtral_cli.checkpoints.layout import Quantization, bits_flag
from mixtral_cli.engine.plan import bytes_per_token

BASE = "16.16.16"
CONFIGS = ("8.16.16", "8.8.16", "8.8.8", "8.8.4", "8.4.8", "8.4.4",
           "4.16.16", "4.16.8", "4.8.16", "4.8.8", "4.8.4", "4.4.16", "4.4.8", "4.4.4")
MINI_CONFIGS = ("16.16.16", "8.16.16", "8.8.8", "4.16.16", "4.4.8", "4.4.4")
PROMPT = "Return a new list containing"
# Quality goals on memorised text (ppl ratio to bf16), from the issue that added every-layer quantization.
GOALS = {"8.8.8": 1.002, "4.4.4": 1.0068}


def parse_config(c: str) -> tuple[int, int, int]:
    e, a, o = (int(x) for x in c.split("."))
    if e not in (4, 8, 16) or a not in (4, 8, 16) or o not in (4, 8, 16):
        raise SystemExit(f"bad configuration {c!r}: want E.A.O with each of 4, 8, 16")
    return e, a, o


def token_bytes(args: ModelArgs, config: str, context: float) -> int:
    """The planner's bytes per decoded token for `config` (bf16 dense weights and KV cache)."""
    e, a, o = parse_config(config)
    quant = Quantization(experts=bits_flag(e), attention=bits_flag(a), output=bits_flag(o))
    return bytes_per_token(args, quant, 2, context)


def checkpoint(model: Path, config: str) -> Path:
    return model if config == BASE else model.with_name(f"{model.name}-q{config}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=Path("/tmp/mem-mixtral"))
    ap.add_argument("--text", action="append", default=None, metavar="NAME=PATH",
                    help="text to score [default: memorised=<data>/train.txt and held-out=<data>/valid.txt]")
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--no-quantize", action="store_true", help="reuse existing MODEL-qE.A.O directories")
    ap.add_argument("--reps", type=int, default=2, help="decode-speed runs per checkpoint (interleaved); 0: none")
    ap.add_argument("--mini-configs", default="", help=f"bench --preset mini for these (e.g. {','.join(MINI_CONFIGS)})")
    ap.add_argument("--mini-reps", type=int, default=2)
    ap.add_argument("--json-out", type=Path, default=Path("/tmp/kl-table.json"))
    a = ap.parse_args()

    model = a.model.resolve()
    data = model.with_name(model.name + "-data")
    texts = dict(t.split("=", 1) for t in a.text) if a.text else {"memorised": str(data / "train.txt"),
                                                                  "held-out": str(data / "valid.txt")}
    configs = [BASE] + [c for c in a.configs.split(",") if c and c != BASE]
    for c in configs:
        parse_config(c)
    commands: list[str] = []
    res: dict = {"machine": machine(), "model": str(model), "texts": texts, "ctx": a.ctx,
                 "date": datetime.date.today().isoformat(), "quantize_seconds": {}}

    for c in configs[1:]:
        out = checkpoint(model, c)
        if a.no_quantize and out.is_dir():
            continue
        e, at, o = parse_config(c)
        _, dt = cli("quantize", str(model), "--bits", str(e), "--attn-bits", str(at), "--output-bits", str(o),
                    "--out", str(out), "--force", log=commands)
        res["quantize_seconds"][c] = round(dt, 1)
        print(f"quantized {c} in {dt:.1f} s", file=sys.stderr, flush=True)
    res["sizes_bytes"] = {c: sum(f.stat().st_size for f in checkpoint(model, c).glob("*.safetensors")) for c in configs}

    quality: dict = {}
    for name, path in texts.items():
        for c in configs:
            out, dt = cli("perplexity", path, "-m", str(checkpoint(model, c)), "--kl-base", str(model),
                          "--ctx", str(a.ctx), "--json", "--device", "cpu", "--dtype", "bfloat16", log=commands)
            r = last_json(out) | {"seconds": round(dt, 1)}
            quality.setdefault(name, {})[c] = r
            print(f"{name:10s} {c:9s} KL {r['kl_divergence']:.6f} top-1 {r['top1_agreement']:.4f} "
                  f"ratio {r['ppl_ratio']:.5f} ({dt:.0f} s)", file=sys.stderr, flush=True)
    res["quality"] = quality

    trained, _ = load_config(model)
    shapes = {"trained": trained, "mini": ModelArgs(**PRESETS["mini"]), "8x7b": ModelArgs(**PRESETS["8x7b"])}
    res["bytes_per_token"] = {c: {k: token_bytes(args, c, a.ctx / 2) for k, args in shapes.items()} for c in configs}

    speed: dict = {c: [] for c in configs}
    for _ in range(a.reps):
        for c in configs:
            out, _ = cli("run", PROMPT, "-m", str(checkpoint(model, c)), "--raw", "--json", "--temp", "0", "-n", "64",
                         "--device", "cpu", "--dtype", "bfloat16", log=commands)
            speed[c].append(last_json(out)["decode_tokens_per_s"])
    res["decode_tokens_per_s"] = {c: v for c, v in speed.items() if v}

    mini_configs = [c for c in a.mini_configs.split(",") if c]
    mini: dict = {c: [] for c in mini_configs}
    for _ in range(a.mini_reps if mini_configs else 0):
        for c in mini_configs:
            e, at, o = parse_config(c)
            out, _ = cli("bench", "--preset", "mini", "--bits", str(e), "--attn-bits", str(at), "--output-bits", str(o),
                         "--device", "cpu", "--prompt-tokens", "128", "--gen-tokens", "32", "--json", log=commands)
            r = last_json(out)
            mini[c].append({k: r[k] for k in ("decode_tokens_per_s", "prefill_tokens_per_s", "peak_rss_bytes")})
    res["mini"] = mini
    res["commands"] = commands
    a.json_out.write_text(json.dumps(res, indent=2))
    print(report(res))


def report(res: dict) -> str:
    lines = [f"{machine_line(res['machine'])} Date {res['date']}, ctx {res['ctx']}.", ""]
    for name, rows in res["quality"].items():
        base = rows[BASE]
        lines += [f"**{name}** ({res['texts'][name]}: {base['tokens_scored']} tokens in {base['windows']} windows; "
                  f"bf16 perplexity {base['base_perplexity']:.4f}):", "",
                  "| experts.attention.output | KL (nats) | KL median | KL p99 | top-1 | ppl ratio | MB/token 8x7B | "
                  "MB/token trained | decode tok/s (trained) | goal |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for c, r in rows.items():
            goal = GOALS.get(c)
            verdict = "" if goal is None else f"<= {goal}: {'met' if r['ppl_ratio'] <= goal else '**missed**'}"
            tps = res["decode_tokens_per_s"].get(c)
            lines.append(
                f"| {c} | {r['kl_divergence']:.6f} ± {r['kl_divergence_uncertainty']:.6f} | {r['kl_divergence_median']:.2e} | "
                f"{r['kl_divergence_p99']:.4f} | {r['top1_agreement']:.4f} | {r['ppl_ratio']:.5f} ± "
                f"{r['ppl_ratio_uncertainty']:.5f} | {res['bytes_per_token'][c]['8x7b'] / 1e6:.0f} | "
                f"{res['bytes_per_token'][c]['trained'] / 1e6:.1f} | "
                f"{'-' if not tps else f'{statistics.median(tps):.1f}'} | {verdict} |")
        lines.append("")
    if res["mini"]:
        lines += ["`mini` (random weights; speed only), `bench --preset mini --device cpu --prompt-tokens 128 "
                  "--gen-tokens 32`, medians:", "",
                  "| experts.attention.output | MB/token | decode tok/s (runs) | prefill tok/s | peak RSS GiB |",
                  "|---|---|---|---|---|"]
        for c, runs in res["mini"].items():
            dec = [r["decode_tokens_per_s"] for r in runs]
            lines.append(f"| {c} | {token_bytes(ModelArgs(**PRESETS['mini']), c, 64) / 1e6:.0f} | "
                         f"{statistics.median(dec):.1f} ({', '.join(f'{x:.1f}' for x in dec)}) | "
                         f"{statistics.median(r['prefill_tokens_per_s'] for r in runs):.0f} | "
                         f"{max(r['peak_rss_bytes'] for r in runs) / 2**30:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
