"""Train a small Mixtral on English text for a few minutes, on the CPU, and save it in the Hub layout.

    python benchmarks/train_small_mixtral.py [--out /tmp/small-mixtral] [--minutes 8]

Random weights make quantization look harmless (every weight matrix is Gaussian noise, and the
logits barely depend on it), so the quantization quality benchmark (`quant_quality.py`) needs a
model that has actually learned something. This script builds such a model:

* corpus: the docstrings of Python's standard library (natural-language heavy, available offline),
  one document per docstring. Whole source files are split between training and validation, so
  the validation text (`valid.txt`) is held out at the file level, not just the paragraph level.
* tokenizer: the real Mixtral v1 SentencePiece model shipped with mistral-common (vocab 32000).
* model: `transformers.MixtralForCausalLM` (8 experts, top-2, with the load-balancing loss so that
  every expert is trained), trained with AdamW for a time budget (CPU time by default) at sequence length 512.
* output: `config.json`, `tokenizer.model`, bf16 safetensors shards and
  `model.safetensors.index.json` with the Hub tensor names (`block_sparse_moe.experts.E.w1` ...),
  the layout `mixtral` reads; transformers 5 keeps the experts fused (`mlp.experts.gate_up_proj`
  [E, 2I, D], `down_proj` [E, D, I]) and they are split back here. The saved checkpoint is loaded
  with `mixtral_cli.engine.loader.load_engine` and its fp32 logits are compared with the trained model's.

Writes `<out>/` (the checkpoint), `<data>/train.txt`, `<data>/valid.txt` and `<out>/training.json`
(configuration, steps, tokens, losses, time).
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import platform
import random
import shutil
import sys
import time
import zlib
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

STDLIB = Path(os.path.dirname(os.__file__))
SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__", "lib2to3"}


def v1_tokenizer_path() -> Path:
    import mistral_common

    return Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"


# -- corpus ------------------------------------------------------------------------------------------
def docstrings(path: Path) -> list[str]:
    """Module, class and function docstrings of one source file, cleaned by `inspect.cleandoc`."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc and len(doc) >= 40:
                out.append(doc.strip())
    return out


def build_corpus(root: Path, data_dir: Path, valid_every: int) -> tuple[Path, Path, dict]:
    """train.txt / valid.txt: docstrings separated by blank lines; a file goes to validation when
    crc32(relative path) % valid_every == 0."""
    files = sorted(p for p in root.rglob("*.py") if not SKIP_DIRS & set(p.relative_to(root).parts))
    train, valid, nvalid = [], [], 0
    for p in files:
        docs = docstrings(p)
        if not docs:
            continue
        if zlib.crc32(str(p.relative_to(root)).encode()) % valid_every == 0:
            valid += docs
            nvalid += 1
        else:
            train += docs
    data_dir.mkdir(parents=True, exist_ok=True)
    tr, va = data_dir / "train.txt", data_dir / "valid.txt"
    tr.write_text("\n\n".join(train) + "\n", encoding="utf-8")
    va.write_text("\n\n".join(valid) + "\n", encoding="utf-8")
    info = {"source": f"docstrings of {root}", "files": len(files), "valid_files": nvalid,
            "train_docs": len(train), "valid_docs": len(valid),
            "train_chars": tr.stat().st_size, "valid_chars": va.stat().st_size}
    return tr, va, info


def token_stream(tok, text: str) -> torch.Tensor:
    """Every document as [BOS] + encode(doc), concatenated."""
    ids: list[int] = []
    for doc in text.split("\n\n"):
        if doc.strip():
            ids += tok.encode(doc, bos=True)
    return torch.tensor(ids, dtype=torch.long)


# -- model -------------------------------------------------------------------------------------------
def hf_config(a: argparse.Namespace):
    from transformers import MixtralConfig

    return MixtralConfig(
        vocab_size=32000, hidden_size=a.hidden, intermediate_size=a.intermediate,
        num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.kv_heads,
        num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=2048,
        rope_theta=1e6, rms_norm_eps=1e-5, sliding_window=None, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, output_router_logits=True,
        router_aux_loss_coef=a.aux_loss, initializer_range=0.02,
    )


def hub_config(a: argparse.Namespace) -> dict:
    """config.json in the spelling of the released Mixtral checkpoint."""
    return {
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
        "hidden_size": a.hidden, "intermediate_size": a.intermediate, "num_hidden_layers": a.layers,
        "num_attention_heads": a.heads, "num_key_value_heads": a.kv_heads,
        "num_local_experts": 8, "num_experts_per_tok": 2, "vocab_size": 32000,
        "max_position_embeddings": 2048, "rope_theta": 1e6, "rms_norm_eps": 1e-5,
        "sliding_window": None, "hidden_act": "silu", "tie_word_embeddings": False,
        "bos_token_id": 1, "eos_token_id": 2, "router_aux_loss_coef": a.aux_loss,
        "output_router_logits": False, "initializer_range": 0.02, "attention_dropout": 0.0,
        "torch_dtype": "bfloat16",
    }


def to_hub_names(sd: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """transformers 5 names (fused experts, `mlp.`) -> Hub names (`block_sparse_moe.experts.E.wN`)."""
    out: dict[str, torch.Tensor] = {}
    for name, t in sd.items():
        if ".mlp.experts." in name:
            continue
        out[name.replace(".mlp.gate.", ".block_sparse_moe.gate.")] = t
    for L in range(num_layers):
        gate_up = sd[f"model.layers.{L}.mlp.experts.gate_up_proj"]  # [E, 2I, D]: gate rows, then up rows
        down = sd[f"model.layers.{L}.mlp.experts.down_proj"]  # [E, D, I]
        inter = gate_up.shape[1] // 2
        for e in range(gate_up.shape[0]):
            p = f"model.layers.{L}.block_sparse_moe.experts.{e}"
            out[f"{p}.w1.weight"] = gate_up[e, :inter]
            out[f"{p}.w3.weight"] = gate_up[e, inter:]
            out[f"{p}.w2.weight"] = down[e]
    return out


def save_hub(model, a: argparse.Namespace, out: Path, shards: int) -> int:
    from safetensors.torch import save_file

    sd = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    sd = {k: v.clone().contiguous() for k, v in to_hub_names(sd, a.layers).items()}
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("model-*.safetensors"):
        old.unlink()
    names = list(sd)
    total = sum(t.numel() * t.element_size() for t in sd.values())
    target, weight_map, i, chunk, size = total / shards, {}, 0, {}, 0

    def flush(chunk: dict, i: int) -> None:
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file(chunk, str(out / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in chunk})

    for n in names:
        chunk[n] = sd[n]
        size += sd[n].numel() * sd[n].element_size()
        if size >= target * (i + 1) and i < shards - 1:
            flush(chunk, i)
            i, chunk = i + 1, {}
    flush(chunk, i)
    if i != shards - 1:  # too few tensors to fill every shard
        raise RuntimeError(f"wrote {i + 1} shards instead of {shards}")
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (out / "config.json").write_text(json.dumps(hub_config(a), indent=2))
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    shutil.copyfile(v1_tokenizer_path(), out / "tokenizer.model")
    return total


def verify(model, out: Path, valid: torch.Tensor) -> float:
    """Max |logit difference| / max |logit| between `mixtral`'s loader and the trained model with its
    weights rounded to bf16 (as saved), both in fp32, on 256 validation tokens."""
    from mixtral_cli.engine.loader import RuntimeOptions, load_engine

    ref = type(model)(model.config)
    ref.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in model.state_dict().items()})
    ref.eval()
    ids = valid[:256]
    with torch.no_grad():
        want = ref(ids[None]).logits[0].float()
    engine = load_engine(out, RuntimeOptions(device="cpu", dtype="float32", ctx_size=512))
    got = engine.model(ids, 0).float()
    return float((got - want).abs().max() / want.abs().max())


@torch.no_grad()
def evaluate(model, ids: torch.Tensor, ctx: int, amp: bool, max_windows: int | None = None) -> float:
    """Mean next-token NLL over consecutive independent windows of `ctx` tokens (as `mixtral perplexity`)."""
    model.eval()
    total, n = 0.0, 0
    starts = list(range(0, len(ids) - 1, ctx))[:max_windows]
    for s in starts:
        w = ids[s:s + ctx]
        if len(w) < 2:
            continue
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            logits = model(w[None]).logits[0].float()
        total += float(torch.nn.functional.cross_entropy(logits[:-1], w[1:], reduction="sum"))
        n += len(w) - 1
    model.train()
    return total / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/small-mixtral"), help="checkpoint directory")
    ap.add_argument("--data", type=Path, default=None, help="corpus directory [default: <out>-data]")
    ap.add_argument("--corpus-root", type=Path, default=STDLIB, help="tree of .py files to take docstrings from")
    ap.add_argument("--valid-every", type=int, default=16, help="1 file in N (by crc32 of its path) is held out")
    ap.add_argument("--minutes", type=float, default=8.0, help="training budget")
    ap.add_argument("--clock", choices=["cpu", "wall"], default="cpu",
                    help="cpu: the budget is process CPU time / threads, so a busy shared machine slows the "
                         "run down but does not shorten the training; wall: wall-clock time")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--intermediate", type=int, default=768)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=20, help="warm-up steps")
    ap.add_argument("--aux-loss", type=float, default=0.02, help="router load-balancing loss coefficient")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                    help="bf16: autocast matmuls to bfloat16 (about 4x slower than fp32 in training here)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--shards", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-steps", type=int, default=None, help="stop after N steps (for timing runs)")
    a = ap.parse_args()

    if a.hidden % 128 or a.intermediate % 128:
        ap.error("--hidden and --intermediate must be multiples of 128 (the quantization blocks)")
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    random.seed(a.seed)
    data = a.data or a.out.with_name(a.out.name + "-data")

    from transformers import MixtralForCausalLM

    from mixtral_cli.checkpoints.tokenizer import Tokenizer

    t0 = time.perf_counter()
    tr_path, va_path, corpus = build_corpus(a.corpus_root, data, a.valid_every)
    tok = Tokenizer.from_file(v1_tokenizer_path())
    train = token_stream(tok, tr_path.read_text(encoding="utf-8"))
    valid = torch.tensor(tok.encode(va_path.read_text(encoding="utf-8"), bos=True), dtype=torch.long)
    corpus |= {"train_tokens": len(train), "valid_tokens": len(valid)}
    print(f"corpus: {json.dumps(corpus)} ({time.perf_counter() - t0:.1f} s)", flush=True)

    model = MixtralForCausalLM(hf_config(a))
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    other = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
                            lr=a.lr, betas=(0.9, 0.95), eps=1e-8)
    amp = a.precision == "bf16"
    budget = a.minutes * 60
    print(f"model: {n_params / 1e6:.1f}M parameters, {torch.get_num_threads()} threads, {a.precision}, "
          f"batch {a.batch} x {a.seq}, budget {a.minutes} min ({a.clock} clock)", flush=True)

    g = torch.Generator().manual_seed(a.seed)
    threads = torch.get_num_threads()

    def clock() -> float:
        return time.process_time() / threads if a.clock == "cpu" else time.perf_counter()

    step, tokens, losses, start, wall0 = 0, 0, [], clock(), time.perf_counter()
    while True:
        elapsed = clock() - start
        if elapsed >= budget or (a.max_steps and step >= a.max_steps):
            break
        frac = elapsed / budget
        lr = a.lr * min(1.0, (step + 1) / a.warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(0, len(train) - a.seq - 1, (a.batch,), generator=g)
        x = torch.stack([train[i:i + a.seq] for i in idx])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            out = model(input_ids=x, labels=x)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        tokens += x.numel()
        lm_loss = float(out.loss.detach()) - a.aux_loss * float(out.aux_loss.detach())
        losses.append(lm_loss)
        if step % 10 == 0 or step == 1:
            recent = sum(losses[-10:]) / len(losses[-10:])
            rate = tokens / max(time.perf_counter() - wall0, 1e-9)
            print(f"step {step:5d}  {elapsed:6.0f} s  lr {lr:.2e}  loss {recent:.3f}  "
                  f"aux {float(out.aux_loss.detach()):.3f}  {rate:6.0f} tok/s (wall)", flush=True)
    train_time, train_wall = clock() - start, time.perf_counter() - wall0
    model.eval()

    final_train = sum(losses[-20:]) / len(losses[-20:])
    valid_loss = evaluate(model, valid, 512, amp=False)
    print(f"trained {step} steps, {tokens} tokens in {train_time:.0f} s ({a.clock} clock; {train_wall:.0f} s wall); "
          f"train loss (last 20 steps) {final_train:.3f}; valid loss {valid_loss:.3f} (ppl {math.exp(valid_loss):.2f}, fp32, 512-token windows)",
          flush=True)

    total = save_hub(model, a, a.out, a.shards)
    err = verify(model, a.out, valid)
    print(f"saved {a.out} ({total / 2**20:.1f} MiB bf16); mixtral loader vs transformers, fp32 logits: "
          f"max rel. diff {err:.2e}", flush=True)
    if err > 1e-3:
        raise SystemExit("the saved checkpoint does not reproduce the trained model")

    report = {
        "config": hub_config(a), "parameters": n_params, "precision": a.precision, "threads": torch.get_num_threads(),
        "batch": a.batch, "seq": a.seq, "lr": a.lr, "warmup": a.warmup, "seed": a.seed, "steps": step,
        "tokens": tokens, "clock": a.clock, "train_seconds": round(train_time, 1),
        "train_wall_seconds": round(train_wall, 1), "train_loss_last20": round(final_train, 4),
        "valid_loss": round(valid_loss, 4), "valid_ppl": round(math.exp(valid_loss), 3),
        "loader_max_rel_diff": err, "corpus": corpus, "train_txt": str(tr_path), "valid_txt": str(va_path),
        "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
    }
    (a.out / "training.json").write_text(json.dumps(report, indent=2))
    keys = ("steps", "tokens", "train_seconds", "train_wall_seconds", "train_loss_last20", "valid_loss", "valid_ppl")
    print(json.dumps({k: report[k] for k in keys}))


if __name__ == "__main__":
    main()
