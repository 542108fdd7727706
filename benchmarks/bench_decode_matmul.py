"""One decode token (M=1) through the dense matrices of the `mini` and 8x7B presets, per layout.

    python benchmarks/bench_decode_matmul.py [--reps N] [--threads T]

`F.linear(x, w)` with the stored [out, in] weight is what the engine runs for 16-bit weights.
Compared, interleaved on the same machine: the same weight in float32, and the bf16 weight
pre-transposed to a contiguous [in, out] (`x @ wt`). Medians in ms and the implied read GB/s.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

SHAPES = {"mini w1/w3": (3584, 1024), "mini w2": (1024, 3584), "mini lm_head": (32000, 1024),
          "8x7b w1/w3": (14336, 4096), "8x7b w2": (4096, 14336)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--threads", type=int, default=None, help="torch threads [default: one per core]")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    print(f"{torch.get_num_threads()} threads; median of {a.reps}, interleaved")
    for name, (o, i) in SHAPES.items():
        w = (torch.randn(o, i) / i**0.5).bfloat16()
        x = torch.randn(1, i).bfloat16()
        fns = {
            "bf16 F.linear [out,in]": ((lambda x=x, w=w: F.linear(x, w)), 2),
            "bf16 x @ wt [in,out]": ((lambda x=x, wt=w.t().contiguous(): x @ wt), 2),
            "fp32 F.linear [out,in]": ((lambda wf=w.float(), xf=x.float(): F.linear(xf, wf)), 4),
        }
        times: dict[str, list[float]] = {k: [] for k in fns}
        for fn, _ in fns.values():
            fn()
        for _ in range(a.reps):
            for k, (fn, _) in fns.items():
                t = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t)
        for k, (_, itemsize) in fns.items():
            m = statistics.median(times[k])
            print(f"  {name:13s} {k:24s} {m * 1e3:8.2f} ms  {o * i * itemsize / m / 1e9:6.1f} GB/s")


if __name__ == "__main__":
    main()
