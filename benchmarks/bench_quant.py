"""Quantization throughput and CPU matmul paths for one Mixtral expert matrix.

    python benchmarks/bench_quant.py [--reps N]

Shared machines are noisy: engines are compared in the same run, interleaved, as ratios.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mixtral_cli.kernels import dequantize, dispatch, native, prepare, quantize, spec_for_bits
from mixtral_cli.kernels.dispatch import available_paths, matmul

EXPERT_MATRICES = 32 * 8 * 3  # Mixtral-8x7B: layers x experts x (w1, w2, w3)


def _time(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def interleaved(fns: dict, reps: int) -> dict[str, float]:
    """Median seconds per call of each fn, running them round-robin ``reps`` times."""
    for fn in fns.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            times[k].append(_time(fn))
    return {k: statistics.median(v) for k, v in times.items()}


def bench_quantize(reps: int) -> None:
    torch.manual_seed(0)
    w = (torch.randn(4096, 14336) * 0.02).to(torch.bfloat16)  # a w2-shaped expert matrix
    fns = {
        "nf4 (ours)": lambda: quantize(w, spec_for_bits(4)),
        "int8 (ours)": lambda: quantize(w, spec_for_bits(8)),
    }
    try:
        import bitsandbytes.functional as bnbf

        fns["nf4 (bitsandbytes quantize_4bit)"] = lambda: bnbf.quantize_4bit(
            w, blocksize=64, quant_type="nf4", compress_statistics=True
        )
    except ImportError:
        pass
    t = interleaved(fns, reps)
    base = t.get("nf4 (bitsandbytes quantize_4bit)")
    print(f"quantize one 4096x14336 bf16 matrix ({torch.get_num_threads()} threads, median of {reps})")
    for k, v in t.items():
        ratio = f"  {base / v:5.1f}x faster than bitsandbytes" if base and "ours" in k else ""
        print(f"  {k:34s} {v * 1e3:8.1f} ms   all {EXPERT_MATRICES} expert matrices: {v * EXPERT_MATRICES:6.1f} s{ratio}")


def bench_matmul(reps: int, tokens: list[int]) -> None:
    torch.manual_seed(0)
    out_f, in_f = 14336, 4096  # w1/w3: 4096 -> 14336
    w = (torch.randn(out_f, in_f) * 0.02).to(torch.bfloat16)
    print(f"\nmatmul through one {out_f}x{in_f} matrix (median of {reps}, interleaved; ratio = path / bf16 dense)")
    print(f"  native kernels: {native.isas() or 'not built'}")
    qts = {s.name: quantize(w, s) for s in (spec_for_bits(4), spec_for_bits(8))}
    preps = {k: prepare(qt) for k, qt in qts.items()}
    t_deq = interleaved({k: (lambda qt=qt: dequantize(qt, torch.bfloat16)) for k, qt in qts.items()}, reps)
    for k, v in t_deq.items():
        print(f"  dequantize {k} -> bf16: {v * 1e3:.1f} ms")
    for n in tokens:
        x = torch.randn(n, in_f, dtype=torch.bfloat16)
        fns = {"bf16 dense": lambda x=x: x @ w.T, "fp32 dense": (lambda x=x.float(), wf=w.float(): x @ wf.T)}
        for name, qt in qts.items():
            for path in available_paths(x, qt, preps[name]):
                for isa in native.isas() if path.startswith("native") else [None]:
                    fns[f"{name} {path}" + (f"[{isa}]" if isa else "")] = (
                        lambda x=x, qt=qt, p=path, pr=preps[name], i=isa: matmul(x, qt, pr, path=p, isa=i))
        if native.available():
            fns["bf16 native_dense"] = lambda x=x: dispatch.dense_matmul(x, w, path="native_dense")
        t = interleaved(fns, reps)
        chosen = {name: dispatch.select_path(x, qt, preps[name]) for name, qt in qts.items()}
        print(f"  {n} token(s), bf16 input; chosen: {chosen}")
        for k, v in t.items():
            print(f"    {k:24s} {v * 1e3:8.2f} ms   {v / t['bf16 dense']:5.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--tokens", type=int, nargs="*", default=[1, 4, 16, 64])
    args = ap.parse_args()
    bench_quantize(args.reps)
    bench_matmul(args.reps * 2, args.tokens)


if __name__ == "__main__":
    main()
