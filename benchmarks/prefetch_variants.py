"""Compare speculative-prefetch variants on a trained model's real routing (CPU simulation).

    python benchmarks/prefetch_variants.py [--model /tmp/small-mixtral] [--text FILE] [--tokens 400]

The expert cache runs with CPU "device" slots, so copies are instant and nothing is timed: what is
compared is what each variant asks the copy engine to do per decoded token, teacher-forced over
held-out text (one decode step per token, the KV cache growing as in generation):

- `misses`: demand copies (a needed expert not on the device);
- `prefetches`, `accuracy` (prefetched experts then used / prefetched), `wasted` (bytes of
  prefetched experts evicted or never used, per token);
- `early`: of the experts a layer needed, the share already on the device because a hint arrived
  at least one layer before (`lead>=2`: at least two layers before, i.e. with two layers of compute
  to hide the copy behind; with one `.tolist()` sync per layer, a copy issued one layer ahead can
  only overlap that one layer's expert compute).

Variants: no prefetch; depth 1 (layer L hints layer L+1 with L+1's router on L's hidden state, the
default); depth 2 (L also hints L+2 with L+2's router); depth 3. "The previous token's routing" is
not a variant for this cache: the experts a layer used for the previous token are its two most
recently used, so they are on the device already whenever K >= top-k.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mixtral_cli.engine.experts import ExpertCache  # noqa: E402
from mixtral_cli.engine.loader import RuntimeOptions, load_engine  # noqa: E402


class Tracker:
    """Wraps an ExpertCache: which layer is running, and when each prefetched expert was hinted."""

    def __init__(self, cache: ExpertCache) -> None:
        self.cache = cache
        self.layer = -1
        self.hinted_at: dict[tuple[int, int], int] = {}  # (layer, expert) -> layer that issued the hint
        self.needed = self.early = self.lead2 = 0
        run, prefetch = cache.run, cache.prefetch

        def tracked_run(layer, ids, uses):
            self.layer = layer
            for eid in ids:
                self.needed += 1
                issued = self.hinted_at.pop((layer, eid), None)
                if issued is not None and eid in cache.layers[layer].lru:
                    self.early += 1
                    self.lead2 += layer - issued >= 2
            for key in [k for k in self.hinted_at if k[0] == layer]:  # unused hints expire here
                del self.hinted_at[key]
            return run(layer, ids, uses)

        def tracked_prefetch(layer, ids):
            before = set(cache.layers[layer].lru) if layer < len(cache.layers) else set()
            prefetch(layer, ids)
            if layer < len(cache.layers):
                for eid in ids:
                    if eid in cache.layers[layer].lru and (eid not in before or (layer, eid) in self.hinted_at):
                        self.hinted_at.setdefault((layer, eid), self.layer)

        cache.run, cache.prefetch = tracked_run, tracked_prefetch


def measure(model_dir: Path, ids: list[int], slots: int, depth: int) -> dict:
    eng = load_engine(model_dir, RuntimeOptions(device="cpu", dtype="float32", ctx_size=len(ids) + 1,
                                                experts_in_gpu=slots, prefetch=depth > 0,
                                                cpu_experts="never"))  # every miss is a copy, as on a GPU
    eng.model.prefetch_depth = max(depth, 1)
    cache = eng.experts
    tracker = Tracker(cache)
    m = eng.model
    m(torch.tensor(ids[:1]), 0)  # first token: cold cache, not counted
    cache.reset_stats()
    tracker.needed = tracker.early = tracker.lead2 = 0
    for i in range(1, len(ids)):
        m(torch.tensor(ids[i:i + 1]), i)
    s = cache.stats
    n = len(ids) - 1
    nb = cache.store.layout.nbytes
    return {
        "slots": slots, "depth": depth,
        "misses_per_token": s.misses / n,
        "prefetches_per_token": s.prefetches / n,
        "accuracy": s.prefetch_accuracy,
        "wasted_bytes_per_token": (s.prefetches - s.prefetch_hits) * nb / n,
        "copied_bytes_per_token": s.bytes_to_device / n,
        "hit_rate": s.hit_rate,
        "early": tracker.early / tracker.needed,
        "lead2": tracker.lead2 / tracker.needed,
        "expert_bytes": nb,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=Path("/tmp/small-mixtral"))
    ap.add_argument("--text", type=Path, default=None, help="[default: <model>-data/valid.txt]")
    ap.add_argument("--tokens", type=int, default=400)
    ap.add_argument("--slots", type=int, nargs="+", default=[2, 3, 4, 6])
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    text = (a.text or Path(f"{a.model}-data") / "valid.txt").read_text()
    from mixtral_cli.checkpoints.tokenizer import Tokenizer

    ids = Tokenizer.from_file(a.model / "tokenizer.model").encode(text, bos=True)[: a.tokens]
    rows = []
    print(f"{'K':>2} {'depth':>5} {'miss/tok':>9} {'pref/tok':>9} {'accuracy':>9} {'wasted/tok':>11} {'copied/tok':>11} "
          f"{'early':>6} {'lead>=2':>7}")
    for k in a.slots:
        for depth in (0, 1, 2, 3):
            r = measure(a.model, ids, k, depth)
            rows.append(r)
            acc = "-" if r["accuracy"] is None else f"{r['accuracy']:.1%}"
            print(f"{k:>2} {depth:>5} {r['misses_per_token']:>9.2f} {r['prefetches_per_token']:>9.2f} {acc:>9} "
                  f"{r['wasted_bytes_per_token'] / r['expert_bytes']:>9.2f} x {r['copied_bytes_per_token'] / r['expert_bytes']:>9.2f} x "
                  f"{r['early']:>6.1%} {r['lead2']:>7.1%}", flush=True)
    if a.json:
        a.json.write_text(json.dumps({"model": str(a.model), "tokens": len(ids), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
