"""Does the native CPU kernels' int8 activation quantization cost perplexity?

    python benchmarks/native_quality.py --model /tmp/small-mixtral --valid /tmp/small-mixtral-data/valid.txt
                                        [--ctx 512] [--max-tokens 40000]

Takes a trained checkpoint (`train_small_mixtral.py`) and held-out text, quantizes the experts in
memory to 8 and 4 bits, and scores the text (`mixtral perplexity` semantics) three ways:

- unquantized, float32;
- quantized, every expert product exact (dequantize + matmul: the path above
  `kernels.dispatch.native_max_tokens()` tokens per call);
- quantized, every expert product through the native kernels (activations quantized to int8 per
  block: the path decode takes, and prefill too on CPUs without AVX512-BF16), by setting
  `kernels.dispatch.NATIVE_MAX_TOKENS` for this process.

Prints the perplexities and the ratios against the unquantized model. Goals (as for the
quantization itself): at most 1.002 for 8-bit and 1.01 for 4-bit.
"""

from __future__ import annotations

import argparse
import subprocess
from pathlib import Path

import torch

from mixtral_cli.bench.synthetic import QuantizingCheckpoint
from mixtral_cli.checkpoints.reader import Checkpoint
from mixtral_cli.checkpoints.tokenizer import Tokenizer
from mixtral_cli.engine.evaluate import perplexity
from mixtral_cli.engine.loader import RuntimeOptions, build_engine
from mixtral_cli.kernels import dispatch, native
from mixtral_cli.kernels.formats import spec_for_bits

GOALS = {8: 1.002, 4: 1.01}


def score(ckpt, tok: Tokenizer, ids: list[int], ctx: int, native_everywhere: bool) -> float:
    dispatch.NATIVE_MAX_TOKENS = 10**9 if native_everywhere else 0
    eng = build_engine(ckpt, tok, RuntimeOptions(device="cpu", dtype="float32", ctx_size=ctx))
    return perplexity(eng.model, ids, ctx).perplexity


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--valid", type=Path, required=True)
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--max-tokens", type=int, default=40000)
    a = p.parse_args()
    flags = subprocess.run("lscpu | grep -o 'avx[^ ]*' | sort -u | tr '\\n' ' '", shell=True, capture_output=True,
                           text=True).stdout.strip()
    print(f"CPU flags: {flags}; native kernels: {native.isas()}; {torch.get_num_threads()} threads")
    tok = Tokenizer.from_file(a.model / "tokenizer.model")
    ids = ([tok.bos_id] + tok.encode(a.valid.read_text()))[: a.max_tokens]
    base = Checkpoint(a.model)
    ref = score(base, tok, ids, a.ctx, native_everywhere=False)
    print(f"{len(ids)} tokens, ctx {a.ctx}\n\n| model | path | perplexity | ratio | goal |\n|---|---|---|---|---|")
    print(f"| unquantized fp32 | - | {ref:.3f} | 1 | |")
    for bits in (8, 4):
        q = QuantizingCheckpoint(base, spec_for_bits(bits))
        for native_everywhere, name in ((False, "exact (dequantize)"), (True, "native kernels")):
            ppl = score(q, tok, ids, a.ctx, native_everywhere)
            ratio = ppl / ref
            print(f"| {bits}-bit | {name} | {ppl:.3f} | {ratio:.5f} | <= {GOALS[bits]} "
                  f"{'met' if ratio <= GOALS[bits] else 'MISSED'} |", flush=True)


if __name__ == "__main__":
    main()
