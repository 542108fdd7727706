"""Decode speed of mixtral-cli against transformers and llama.cpp on one real-shape Mixtral slice.

    python benchmarks/cpu_engines.py prepare --dir DIR [--layers 2] [--llama-src SRC] [--configs E.A.O,...]
    python benchmarks/cpu_engines.py run --dir DIR [--engines a,b,...] [--rounds 3] [--tokens 32]
                                        [--threads 2] [--busy] [--llama-python PY]

`prepare` writes a Mixtral with the real 8x7B shapes (hidden 4096, FFN 14336, 32/8 heads, vocab
32000) but only `--layers` layers, random bf16 weights, in the Hub layout with the real v1
tokenizer; then our 4-bit and 8-bit checkpoints (`mixtral quantize`) and, when llama.cpp's
converter is found (`--llama-src`, the `vendor/llama.cpp` of a llama-cpp-python source tree),
GGUF files in f16, q8_0 and q4_0. `--configs 4.4.4,...` adds our checkpoints with other bits per
group (experts.attention.output); engine `ours-4.4.4` runs one. `ours-4` and `ours-8` are
`mixtral quantize --bits 4|8` with its default attention and output bits.

`run` runs every engine once per round, rounds interleaved, each in a fresh process (so page
cache and allocator state are comparable), and prints the median decode tokens/s per engine and
the peak RSS. `--busy` starts one competing CPU-bound process for the whole run. The CPU flags
(`lscpu | grep -o 'avx[^ ]*'`) head the output, for the benchmark record.

llama.cpp runs through llama-cpp-python (`pip install --no-cache-dir llama-cpp-python` builds it
for the CPU it is built on) in the interpreter given by `--llama-python`. To hold it to AVX2 on an
AVX-512 machine, build it with `CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON
-DGGML_F16C=ON -DGGML_AVX512=OFF"` and run ours with `ATEN_CPU_CAPABILITY=avx2` (torch's kernels
and our native ones then take their AVX2 paths).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ENGINES = ("ours-bf16", "ours-fp32", "ours-8", "ours-4", "hf-bf16", "hf-fp32", "llama-f16", "llama-q8_0",
           "llama-q4_0")
PROMPT = [1] + list(range(1000, 1031))  # 32 tokens


def cpu_flags() -> str:
    out = subprocess.run("lscpu | grep -o 'avx[^ ]*' | sort -u | tr '\\n' ' '", shell=True, capture_output=True,
                         text=True).stdout
    return out.strip() or "(no avx flags)"


# -- prepare -----------------------------------------------------------------------------------
def prepare(d: Path, layers: int, llama_src: Path | None, configs: list[str]) -> None:
    import torch
    from safetensors.torch import save_file

    from mixtral_cli.bench.synthetic import PRESETS, SyntheticCheckpoint
    from mixtral_cli.checkpoints.config import ModelArgs
    from mixtral_cli.checkpoints.layout import (
        EXPERT_PROJS,
        Quantization,
        expert_prefix,
        layer_prefix,
        shared_shapes,
    )

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from tiny import TINY_CONFIG, V1_TOKENIZER

    hf = d / "hf"
    hf.mkdir(parents=True, exist_ok=True)
    args = ModelArgs(**(PRESETS["8x7b"] | {"num_hidden_layers": layers}))
    ck = SyntheticCheckpoint(args, Quantization(), seed=1)
    shards: list[dict[str, torch.Tensor]] = [{}]
    for name in shared_shapes(args):
        if not name.startswith("model.layers."):
            shards[0][name] = ck.tensor(name).contiguous()
    for L in range(layers):
        sd = {n: ck.tensor(n).contiguous() for n in shared_shapes(args) if n.startswith(layer_prefix(L) + ".")}
        for e in range(args.num_local_experts):
            for p in EXPERT_PROJS:
                sd[f"{expert_prefix(L, e, p)}.weight"] = ck.expert_weight(L, e, p).contiguous()
        shards.append(sd)
    index = {}
    for i, sd in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(sd, str(hf / fname), metadata={"format": "pt"})
        index |= dict.fromkeys(sd, fname)
    (hf / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    cfg = TINY_CONFIG | {k: getattr(args, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                        "num_attention_heads", "num_key_value_heads")}
    cfg["max_position_embeddings"] = 32768
    (hf / "config.json").write_text(json.dumps(cfg, indent=1))
    (hf / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    shutil.copy(V1_TOKENIZER, hf / "tokenizer.model")
    print(f"wrote {hf}", flush=True)
    for config in ("4", "8", *configs):
        out = d / f"q{config}"
        if not out.exists():
            bits = config.split(".")
            groups = ["--attn-bits", bits[1], "--output-bits", bits[2]] if len(bits) == 3 else []
            subprocess.run([sys.executable, "-m", "mixtral_cli", "quantize", str(hf), "--bits", bits[0], *groups,
                            "--out", str(out)], check=True)
    if llama_src is None:
        return
    env = dict(os.environ, PYTHONPATH=str(llama_src / "gguf-py"))
    for outtype in ("f16", "q8_0"):
        out = d / f"model-{outtype}.gguf"
        if not out.exists():
            subprocess.run([sys.executable, str(llama_src / "convert_hf_to_gguf.py"), str(hf), "--outtype", outtype,
                            "--outfile", str(out)], check=True, env=env)


def quantize_q4_0(d: Path) -> None:
    """Run in the llama-cpp-python interpreter: f16 GGUF -> q4_0 with llama.cpp's own quantizer."""
    import llama_cpp

    out = d / "model-q4_0.gguf"
    if out.exists():
        return
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
    params.nthread = os.cpu_count() or 2
    rc = llama_cpp.llama_model_quantize(str(d / "model-f16.gguf").encode(), str(out).encode(), params)
    if rc != 0:
        raise SystemExit(f"llama_model_quantize failed: {rc}")


# -- one engine, one process ---------------------------------------------------------------------
def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def one_ours(d: Path, engine: str, tokens: int, threads: int) -> dict:
    import torch

    from mixtral_cli.engine.generate import Session
    from mixtral_cli.engine.loader import RuntimeOptions, load_engine

    bits = engine.split("-", 1)[1]
    model_dir = d / ("hf" if bits in ("bf16", "fp32") else f"q{bits}")
    dtype = "float32" if bits == "fp32" else "bfloat16" if bits == "bf16" else "auto"
    t = time.perf_counter()
    eng = load_engine(model_dir, RuntimeOptions(device="cpu", dtype=dtype, ctx_size=512, threads=threads))
    load_s = time.perf_counter() - t
    s = Session(eng.model)
    t = time.perf_counter()
    logits, _ = s.prefill(PROMPT)
    prefill_s = time.perf_counter() - t
    tok = int(torch.argmax(logits))
    for _ in range(3):
        tok = int(torch.argmax(s.step(tok)))
    t = time.perf_counter()
    for _ in range(tokens):
        tok = int(torch.argmax(s.step(tok)))
    return {"load_s": load_s, "prefill_tok_s": len(PROMPT) / prefill_s, "decode_tok_s": tokens / (time.perf_counter() - t)}


def one_hf(d: Path, engine: str, tokens: int, threads: int) -> dict:
    import torch
    from transformers import MixtralForCausalLM

    torch.set_num_threads(threads)
    dtype = torch.float32 if engine.endswith("fp32") else torch.bfloat16
    t = time.perf_counter()
    model = MixtralForCausalLM.from_pretrained(d / "hf", dtype=dtype).eval()
    load_s = time.perf_counter() - t
    with torch.inference_mode():
        t = time.perf_counter()
        out = model(torch.tensor([PROMPT]), use_cache=True)
        prefill_s = time.perf_counter() - t
        past, tok = out.past_key_values, int(out.logits[0, -1].argmax())
        for i in range(3 + tokens):
            if i == 3:
                t = time.perf_counter()
            out = model(torch.tensor([[tok]]), past_key_values=past, use_cache=True)
            past, tok = out.past_key_values, int(out.logits[0, -1].argmax())
    return {"load_s": load_s, "prefill_tok_s": len(PROMPT) / prefill_s, "decode_tok_s": tokens / (time.perf_counter() - t)}


def one_llama(d: Path, engine: str, tokens: int, threads: int) -> dict:
    import llama_cpp

    t = time.perf_counter()
    llm = llama_cpp.Llama(str(d / f"model-{engine.split('-')[1]}.gguf"), n_ctx=512, n_threads=threads,
                          n_threads_batch=threads, verbose=False)
    load_s = time.perf_counter() - t
    t = time.perf_counter()
    llm.eval(PROMPT)
    prefill_s = time.perf_counter() - t
    tok = int(llm.scores[llm.n_tokens - 1].argmax())
    for i in range(3 + tokens):
        if i == 3:
            t = time.perf_counter()
        llm.eval([tok])
        tok = int(llm.scores[llm.n_tokens - 1].argmax())
    return {"load_s": load_s, "prefill_tok_s": len(PROMPT) / prefill_s, "decode_tok_s": tokens / (time.perf_counter() - t)}


def one(d: Path, engine: str, tokens: int, threads: int) -> None:
    if engine.startswith("ours"):
        from mixtral_cli.system.threads_env import configure_cpu_threads_env

        configure_cpu_threads_env(threads)  # as the CLI does, before torch loads
    fn = one_ours if engine.startswith("ours") else one_hf if engine.startswith("hf") else one_llama
    res = fn(d, engine, tokens, threads)
    print(json.dumps(res | {"engine": engine, "peak_rss": peak_rss()}))


# -- the interleaved run -----------------------------------------------------------------------------
def run(d: Path, engines: list[str], rounds: int, tokens: int, threads: int, busy: bool, llama_py: str) -> None:
    print(f"CPU flags: {cpu_flags()}; {os.cpu_count()} cores; {threads} threads; {tokens} decode tokens; "
          f"{rounds} rounds, interleaved{'; one competing CPU-bound process' if busy else ''}", flush=True)
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
    results: dict[str, list[dict]] = {e: [] for e in engines}
    try:
        for r in range(rounds):
            for e in engines:
                py = llama_py if e.startswith("llama") else sys.executable
                res = subprocess.run([py, __file__, "one", "--dir", str(d), "--engine", e, "--tokens", str(tokens),
                                      "--threads", str(threads)], capture_output=True, text=True)
                if res.returncode != 0:
                    print(f"  {e}: failed: {res.stderr.strip().splitlines()[-1:]}", flush=True)
                    continue
                row = json.loads(res.stdout.strip().splitlines()[-1])
                results[e].append(row)
                print(f"  round {r + 1} {e:11s} decode {row['decode_tok_s']:6.2f} tok/s  prefill "
                      f"{row['prefill_tok_s']:6.1f} tok/s  peak RSS {row['peak_rss'] / 2**30:.2f} GiB", flush=True)
    finally:
        if hog:
            hog.kill()
    print("\nengine       median decode tok/s   (runs)        median prefill tok/s   peak RSS GiB")
    for e, rows in results.items():
        if rows:
            dec = [r["decode_tok_s"] for r in rows]
            print(f"{e:12s} {statistics.median(dec):8.2f}   ({', '.join(f'{x:.2f}' for x in dec)})   "
                  f"{statistics.median(r['prefill_tok_s'] for r in rows):8.1f}   "
                  f"{max(r['peak_rss'] for r in rows) / 2**30:.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("cmd", choices=["prepare", "quantize-q4_0", "run", "one"])
    p.add_argument("--dir", type=Path, required=True)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--llama-src", type=Path, default=None)
    p.add_argument("--configs", default="", help="more of ours to quantize, as E.A.O bits (experts, attention, output)")
    p.add_argument("--engines", default=",".join(ENGINES))
    p.add_argument("--engine")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    p.add_argument("--busy", action="store_true")
    p.add_argument("--llama-python", default=sys.executable)
    a = p.parse_args()
    if a.cmd == "prepare":
        prepare(a.dir, a.layers, a.llama_src, [c for c in a.configs.split(",") if c])
    elif a.cmd == "quantize-q4_0":
        quantize_q4_0(a.dir)
    elif a.cmd == "one":
        one(a.dir, a.engine, a.tokens, a.threads)
    else:
        run(a.dir, [e for e in a.engines.split(",") if e], a.rounds, a.tokens, a.threads, a.busy, a.llama_python)


if __name__ == "__main__":
    main()
