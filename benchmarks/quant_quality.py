"""Quantization quality end to end, through the `mixtral` CLI: perplexity, greedy text, CPU decode speed.

    python benchmarks/quant_quality.py [--model /tmp/small-mixtral] [--valid /tmp/small-mixtral-data/valid.txt]

Takes a trained checkpoint (`train_small_mixtral.py`: random weights make quantization look
harmless) and its held-out text, and runs, each as its own `python -m mixtral_cli` process:

1. `quantize MODEL --bits 8 --out MODEL-q8` and `--bits 4 --out MODEL-q4` (skipped with
   `--no-quantize` when the outputs exist);
2. `perplexity VALID -m M --ctx 512 --json --device cpu --dtype D` for the three checkpoints, with
   D = float32 (quantized experts go through the dequantize path) and D = bfloat16 (the CPU int8 and
   bitsandbytes nf4 kernels); ratios against the unquantized model in the same dtype;
3. `run PROMPT -m M --raw --temp 0 -n 40 --json --device cpu --dtype float32` for a few prompts: the
   greedy continuations side by side, with the number of leading tokens equal to the unquantized;
4. `run PROMPT -m M --raw --json --temp 0 -n 64 --device cpu --dtype bfloat16`, `--reps` times per
   checkpoint, interleaved (bf16, q8, q4, bf16, ...): the median `decode_tokens_per_s`.

Prints a Markdown report and writes every raw number to `--json-out`. Goals: perplexity ratio at
most 1.002 for 8-bit and 1.01 for 4-bit.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

from cpu_engines import cpu_flags

ROOT = Path(__file__).resolve().parent.parent
GOALS = {"q8": 1.002, "q4": 1.01}
PROMPTS = [
    "Return a new list containing",
    "This module provides functions for",
    "If the file does not exist,",
]


def cli(*args: str, log: list | None = None) -> tuple[str, float]:
    """Run `python -m mixtral_cli ARGS`; returns stdout and wall seconds; raises on failure."""
    cmd = [sys.executable, "-m", "mixtral_cli", *args]
    t = time.perf_counter()
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    dt = time.perf_counter() - t
    shown = "mixtral " + shlex.join(args)
    if log is not None:
        log.append(shown)
    if p.returncode != 0:
        raise SystemExit(f"`{shown}` failed with exit code {p.returncode}:\n{p.stderr.strip()}")
    return p.stdout, dt


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def machine() -> dict:
    model = platform.processor() or platform.machine()
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    import torch

    return {"nproc": os.cpu_count(), "cpu": model, "cpu_flags": cpu_flags(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version()}


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=Path("/tmp/small-mixtral"))
    ap.add_argument("--valid", type=Path, default=None, help="held-out text [default: <model>-data/valid.txt]")
    ap.add_argument("--no-quantize", action="store_true", help="reuse existing <model>-q8 and <model>-q4")
    ap.add_argument("--reps", type=int, default=2, help="decode-speed runs per checkpoint (interleaved)")
    ap.add_argument("--prompt", action="append", default=None, help="greedy prompt (repeatable)")
    ap.add_argument("--json-out", type=Path, default=Path("/tmp/quant-quality.json"))
    a = ap.parse_args()

    model = a.model.resolve()
    valid = (a.valid or model.with_name(model.name + "-data") / "valid.txt").resolve()
    prompts = a.prompt or PROMPTS
    ckpts = {"bf16": model, "q8": model.with_name(model.name + "-q8"), "q4": model.with_name(model.name + "-q4")}
    commands: list[str] = []
    res: dict = {"machine": machine(), "model": str(model), "valid": str(valid),
                 "date": datetime.date.today().isoformat(), "quantize_seconds": {}}

    # 1. quantize
    for key, bits in (("q8", 8), ("q4", 4)):
        if a.no_quantize and ckpts[key].is_dir():
            continue
        _, dt = cli("quantize", str(model), "--bits", str(bits), "--out", str(ckpts[key]), "--force", log=commands)
        res["quantize_seconds"][key] = round(dt, 1)
        print(f"quantized {bits}-bit in {dt:.1f} s -> {ckpts[key]}", file=sys.stderr, flush=True)
    res["sizes_bytes"] = {k: sum(f.stat().st_size for f in d.glob("*.safetensors")) for k, d in ckpts.items()}

    # 2. perplexity
    ppl: dict = {}
    for dtype in ("float32", "bfloat16"):
        for key, d in ckpts.items():
            out, dt = cli("perplexity", str(valid), "-m", str(d), "--ctx", "512", "--json", "--device", "cpu",
                          "--dtype", dtype, log=commands)
            r = last_json(out) | {"seconds": round(dt, 1)}
            ppl.setdefault(dtype, {})[key] = r
            print(f"perplexity {dtype:8s} {key}: {r['perplexity']:.4f} ({dt:.0f} s)", file=sys.stderr, flush=True)
        for key in ("q8", "q4"):
            ppl[dtype][key]["ratio"] = ppl[dtype][key]["perplexity"] / ppl[dtype]["bf16"]["perplexity"]
    res["perplexity"] = ppl

    # 3. greedy text
    greedy = []
    for prompt in prompts:
        row = {"prompt": prompt}
        for key, d in ckpts.items():
            out, _ = cli("run", prompt, "-m", str(d), "--raw", "--temp", "0", "-n", "40", "--json",
                         "--device", "cpu", "--dtype", "float32", log=commands)
            r = last_json(out)
            row[key] = {"text": r["text"], "token_ids": r["token_ids"]}
        for key in ("q8", "q4"):
            row[key]["same_prefix_tokens"] = common_prefix(row[key]["token_ids"], row["bf16"]["token_ids"])
        greedy.append(row)
    res["greedy"] = greedy

    # 4. decode speed, interleaved
    speed: dict = {k: [] for k in ckpts}
    speed_text: dict = {}
    for _ in range(a.reps):
        for key, d in ckpts.items():
            out, _ = cli("run", prompts[0], "-m", str(d), "--raw", "--json", "--temp", "0", "-n", "64",
                         "--device", "cpu", "--dtype", "bfloat16", log=commands)
            r = last_json(out)
            speed[key].append(r["decode_tokens_per_s"])
            speed_text[key] = {"completion_tokens": r["completion_tokens"], "token_ids": r["token_ids"],
                               "prefill_tokens_per_s": r["prefill_tokens_per_s"]}
    res["decode_tokens_per_s"] = {k: {"runs": v, "median": statistics.median(v)} for k, v in speed.items()}
    res["bf16_greedy_same_prefix_tokens"] = {
        k: common_prefix(speed_text[k]["token_ids"], speed_text["bf16"]["token_ids"]) for k in ("q8", "q4")}
    res["commands"] = commands
    a.json_out.write_text(json.dumps(res, indent=2))
    print(report(res))


def machine_line(m: dict) -> str:
    """The benchmark record's machine: CPU, cores, threads, torch, Python and the CPU's AVX flags."""
    return (f"Machine: {m['cpu']}, nproc {m['nproc']} ({m['torch_threads']} torch threads), torch {m['torch']}, "
            f"Python {m['python']}; CPU flags: {m['cpu_flags']}.")


def report(res: dict) -> str:
    lines = [machine_line(res["machine"]), ""]
    names = {"bf16": "unquantized (bf16 weights)", "q8": "8-bit experts (int8, group 128)",
             "q4": "4-bit experts (nf4, group 64)"}
    lines += ["| checkpoint | size | ppl (float32) | ratio | ppl (bfloat16) | ratio | goal |",
              "|---|---|---|---|---|---|---|"]
    for key in ("bf16", "q8", "q4"):
        f32, b16 = res["perplexity"]["float32"][key], res["perplexity"]["bfloat16"][key]
        size = res["sizes_bytes"][key] / 2**20
        if key == "bf16":
            lines.append(f"| {names[key]} | {size:.1f} MiB | {f32['perplexity']:.4f} | 1 | {b16['perplexity']:.4f} | 1 | |")
        else:
            goal = GOALS[key]
            ok = "met" if f32["ratio"] <= goal and b16["ratio"] <= goal else "**missed**"
            lines.append(f"| {names[key]} | {size:.1f} MiB | {f32['perplexity']:.4f} | {f32['ratio']:.5f} | "
                         f"{b16['perplexity']:.4f} | {b16['ratio']:.5f} | <= {goal}: {ok} |")
    t = res["perplexity"]["float32"]["bf16"]
    lines += ["", f"{t['tokens_scored']} tokens scored in {t['windows']} windows of 512.", ""]
    lines += ["| checkpoint | decode tok/s (bf16 activations, median) | runs |", "|---|---|---|"]
    for key in ("bf16", "q8", "q4"):
        s = res["decode_tokens_per_s"][key]
        lines.append(f"| {names[key]} | {s['median']:.1f} | {', '.join(f'{x:.1f}' for x in s['runs'])} |")
    lines.append("")
    for row in res["greedy"]:
        lines.append(f"Prompt `{row['prompt']}` (greedy, 40 tokens, float32):")
        lines.append("")
        for key in ("bf16", "q8", "q4"):
            same = "" if key == "bf16" else f" ({row[key]['same_prefix_tokens']} leading tokens equal)"
            lines.append(f"- {key}{same}: {json.dumps(row[key]['text'])}")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
