"""Peak RSS of a long prompt against a short one, on the CPU (`mini` preset, bf16).

    python benchmarks/long_prompt_memory.py [--tokens 3500] [--short 16] [--reps 2] [--src DIR]

Each measurement is its own process: build the synthetic `mini` model (8 layers, hidden 1024,
16 heads, 8 experts), reset the peak RSS (Linux `/proc/self/clear_refs`), prefill a prompt of
random token ids with `Session.prefill` (what `run`, `chat` and `bench` use), and report how far
the RSS rose above where it started (the prefill's own peak), and the process's peak RSS. `--src` runs
the code of another checkout (e.g. `git archive <commit> | tar -x -C DIR`), to compare versions.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, resource, sys, time, torch
from mixtral_cli.bench.synthetic import SyntheticCheckpoint, preset_args
from mixtral_cli.checkpoints.layout import Quantization
from mixtral_cli.engine.generate import Session
from mixtral_cli.engine.loader import RuntimeOptions, build_engine
n, threads = int(sys.argv[1]), int(sys.argv[2])
torch.set_num_threads(threads)
eng = build_engine(SyntheticCheckpoint(preset_args("mini"), Quantization()), None,
                   RuntimeOptions(device="cpu", dtype="bfloat16", ctx_size=4096))
ids = torch.randint(3, 32000, (n,), generator=torch.Generator().manual_seed(0)).tolist()
loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

with open("/proc/self/clear_refs", "w") as f:  # Linux: "5" resets the peak RSS (VmHWM) to the current RSS
    f.write("5")
rss0 = status("VmRSS")
t0 = time.perf_counter()
Session(eng.model).prefill(ids)
dt = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"tokens": n, "peak_rss": peak, "peak_rss_after_load": loaded, "prefill_s": dt,
                  "rss_before_prefill": rss0, "prefill_peak_rss": status("VmHWM")}))
"""


def run(src: Path, tokens: int, threads: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(src)}
    out = subprocess.run([sys.executable, "-c", CHILD, str(tokens), str(threads)], capture_output=True, text=True,
                         env=env, cwd=src, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=3500)
    ap.add_argument("--short", type=int, default=16)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--src", type=Path, default=ROOT)
    a = ap.parse_args()
    rows = {"short": [], "long": []}
    for _ in range(a.reps):  # interleaved, so that machine load hits both alike
        rows["short"].append(run(a.src, a.short, a.threads))
        rows["long"].append(run(a.src, a.tokens, a.threads))
    short = statistics.median(r["peak_rss"] for r in rows["short"])
    long = statistics.median(r["peak_rss"] for r in rows["long"])
    # what each prefill added to the RSS it started from, at its peak (the peak is reset after loading)
    added = {k: statistics.median(r["prefill_peak_rss"] - r["rss_before_prefill"] for r in v) for k, v in rows.items()}
    result = {"src": str(a.src), "short_tokens": a.short, "long_tokens": a.tokens,
              "peak_rss_short": short, "peak_rss_long": long, "prompt_cost": long - short,
              "prefill_added_short": added["short"], "prefill_added_long": added["long"],
              "prefill_s_long": statistics.median(r["prefill_s"] for r in rows["long"]), "runs": rows}
    print(json.dumps(result, indent=1))
    print(f"process peak RSS: {short / 1e9:.2f} GB with {a.short} tokens, {long / 1e9:.2f} GB with {a.tokens}; "
          f"prefill peak over the RSS before it: {added['short'] / 1e6:.0f} MB and {added['long'] / 1e6:.0f} MB",
          file=sys.stderr)


if __name__ == "__main__":
    main()
