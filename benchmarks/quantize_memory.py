"""Peak memory of `mixtral quantize` does not grow with the model: 1 shard vs 4 shards of one size.

    python benchmarks/quantize_memory.py [--hidden 1024] [--ffn 4864] [--bits 4] [--keep DIR]

Builds two synthetic Hub-layout checkpoints whose shards all have about the same size (one layer
per shard, ~250 MB with the defaults): one with 1 layer / 1 shard, one with 4 layers / 4 shards
(4x the bytes). Runs `python -m mixtral_cli quantize` on each as a child process and reads the
child's peak resident set from `os.wait4`. This script never imports torch itself and builds the
checkpoints in child processes too: on Linux a child's `ru_maxrss` can start from the parent's
high-water mark, so the parent stays small. A baseline child (`import torch` plus the quantize
module, no work) shows the fixed cost of the interpreter and libraries.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def make_checkpoint(out: Path, layers: int, hidden: int, ffn: int, vocab: int, experts: int) -> None:
    """Runs in a child: one layer per shard (embeddings, norm and lm_head go to the first)."""
    import torch
    from safetensors.torch import save_file

    out.mkdir(parents=True)
    heads, kv_heads = max(1, hidden // 128), max(1, hidden // 512)
    hd = hidden // heads
    cfg = {
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": hidden,
        "intermediate_size": ffn, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "num_local_experts": experts, "num_experts_per_tok": 2,
        "vocab_size": vocab, "max_position_embeddings": 1024, "rope_theta": 1e6, "rms_norm_eps": 1e-5,
        "sliding_window": None, "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
        "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    }
    g = torch.Generator().manual_seed(0)

    def rnd(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    weight_map: dict[str, str] = {}
    total = 0
    for L in range(layers):
        p = f"model.layers.{L}"
        sd = {
            f"{p}.input_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
            f"{p}.post_attention_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
            f"{p}.self_attn.q_proj.weight": rnd(heads * hd, hidden),
            f"{p}.self_attn.k_proj.weight": rnd(kv_heads * hd, hidden),
            f"{p}.self_attn.v_proj.weight": rnd(kv_heads * hd, hidden),
            f"{p}.self_attn.o_proj.weight": rnd(hidden, heads * hd),
            f"{p}.block_sparse_moe.gate.weight": rnd(experts, hidden),
        }
        for e in range(experts):
            ep = f"{p}.block_sparse_moe.experts.{e}"
            sd |= {f"{ep}.w1.weight": rnd(ffn, hidden), f"{ep}.w3.weight": rnd(ffn, hidden),
                   f"{ep}.w2.weight": rnd(hidden, ffn)}
        if L == 0:
            sd |= {"model.embed_tokens.weight": rnd(vocab, hidden), "lm_head.weight": rnd(vocab, hidden),
                   "model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16)}
        name = f"model-{L + 1:05d}-of-{layers:05d}.safetensors"
        save_file(sd, str(out / name), metadata={"format": "pt"})
        weight_map |= {k: name for k in sd}
        total += sum(t.numel() * t.element_size() for t in sd.values())
        del sd
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                   "weight_map": weight_map}))
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    try:
        import mistral_common

        tok = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
        (out / "tokenizer.model").write_bytes(tok.read_bytes())
    except (ImportError, OSError):
        (out / "tokenizer.model").write_bytes(b"placeholder: quantize only copies this file")


def child_peak(cmd: list[str]) -> tuple[int, float, str]:
    """Peak RSS in bytes, wall seconds and stderr tail of one child process."""
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    out, err = proc.stdout.read(), proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err.decode()[-2000:]}{out.decode()[-500:]}")
    return usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024), wall, err.decode()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--ffn", type=int, default=4864)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--bits", type=int, default=4, choices=(4, 8))
    ap.add_argument("--keep", type=Path, help="build in this directory and keep it [default: a temp dir]")
    ap.add_argument("--make", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--layers", type=int, default=1, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.make:
        make_checkpoint(a.make, a.layers, a.hidden, a.ffn, a.vocab, a.experts)
        return

    with tempfile.TemporaryDirectory(prefix="qmem-", dir=a.keep) as tmp:
        root = Path(tmp)
        py = sys.executable
        base, _, _ = child_peak([py, "-c", "import torch, mixtral_cli.quantize, mixtral_cli.cli"])
        print(f"baseline (import torch + mixtral_cli): peak RSS {base / 2**20:.0f} MiB")
        results = {}
        for shards in (1, 4):
            src = root / f"src{shards}"
            t = time.perf_counter()
            child_peak([py, __file__, "--make", str(src), "--layers", str(shards), "--hidden", str(a.hidden),
                        "--ffn", str(a.ffn), "--experts", str(a.experts), "--vocab", str(a.vocab)])
            sizes = [f.stat().st_size for f in sorted(src.glob("*.safetensors"))]
            built = time.perf_counter() - t
            peak, wall, _ = child_peak([py, "-m", "mixtral_cli", "quantize", str(src), "--bits", str(a.bits),
                                        "--out", str(root / f"q{shards}"), "--shard-size", "250MB"])
            outs = sorted((root / f"q{shards}").glob("*.safetensors"))
            results[shards] = peak
            print(f"{shards} shard(s) of {', '.join(f'{s / 1e6:.0f}' for s in sizes)} MB "
                  f"(total {sum(sizes) / 1e6:.0f} MB, built in {built:.0f} s): quantize --bits {a.bits} "
                  f"peak RSS {peak / 2**20:.0f} MiB (+{(peak - base) / 2**20:.0f} MiB over baseline), "
                  f"{wall:.1f} s, {sum(sourced / 1e6 for sourced in sizes) / wall:.0f} MB/s, "
                  f"{len(outs)} output shard(s) {sum(f.stat().st_size for f in outs) / 1e6:.0f} MB")
            for d in (src, root / f"q{shards}"):
                subprocess.run(["rm", "-rf", str(d)], check=True)
        ratio = results[4] / results[1]
        print(f"peak RSS ratio 4 shards / 1 shard: {ratio:.3f} ({'within' if abs(ratio - 1) <= 0.10 else 'NOT within'} 10%)")


if __name__ == "__main__":
    main()
