"""Build tiny Mixtral checkpoints in the Hub layout (random weights, several shards plus an index)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mistral_common
import torch
from safetensors.torch import save_file

from mixtral_cli.bench.synthetic import PRESETS

V1_TOKENIZER = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"

# the synthetic "tiny" preset's shapes (bench --preset tiny), as a Hub config.json
TINY_CONFIG = {
    "architectures": ["MixtralForCausalLM"],
    "model_type": "mixtral",
    **PRESETS["tiny"],
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "torch_dtype": "bfloat16",
}


def tiny_state_dict(cfg: dict, seed: int = 0, std: float = 0.08) -> dict[str, torch.Tensor]:
    """Random weights with every Hub tensor name, in bf16 like the released checkpoint."""
    g = torch.Generator().manual_seed(seed)
    D, I, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    Hd = cfg.get("head_dim") or D // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * Hd, cfg["num_key_value_heads"] * Hd

    def rnd(*shape: int, scale: float = std) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * scale).to(torch.bfloat16)

    def norm(n: int) -> torch.Tensor:
        return (1.0 + 0.1 * torch.randn(n, generator=g)).to(torch.bfloat16)

    sd = {"model.embed_tokens.weight": rnd(V, D, scale=1.0), "model.norm.weight": norm(D), "lm_head.weight": rnd(V, D)}
    for L in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{L}"
        sd |= {
            f"{p}.input_layernorm.weight": norm(D),
            f"{p}.post_attention_layernorm.weight": norm(D),
            f"{p}.self_attn.q_proj.weight": rnd(q, D),
            f"{p}.self_attn.k_proj.weight": rnd(kv, D),
            f"{p}.self_attn.v_proj.weight": rnd(kv, D),
            f"{p}.self_attn.o_proj.weight": rnd(D, q),
            f"{p}.block_sparse_moe.gate.weight": rnd(cfg["num_local_experts"], D, scale=0.5),
        }
        for e in range(cfg["num_local_experts"]):
            ep = f"{p}.block_sparse_moe.experts.{e}"
            sd |= {f"{ep}.w1.weight": rnd(I, D), f"{ep}.w3.weight": rnd(I, D), f"{ep}.w2.weight": rnd(D, I)}
    return sd


def write_checkpoint(
    out: Path, cfg: dict | None = None, *, shards: int = 3, seed: int = 0, new_spelling: bool = False,
    state_dict: dict[str, torch.Tensor] | None = None, tokenizer: Path = V1_TOKENIZER,
) -> Path:
    """Write config.json, `tokenizer` as tokenizer.model, `shards` safetensors shards and the index
    into `out`."""
    cfg = dict(TINY_CONFIG if cfg is None else cfg)
    out.mkdir(parents=True, exist_ok=True)
    sd = state_dict if state_dict is not None else tiny_state_dict(cfg, seed)
    names = list(sd)
    per = -(-len(names) // shards)
    weight_map = {}
    for i in range(shards):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        chunk = {n: sd[n].contiguous() for n in names[i * per:(i + 1) * per]}
        save_file(chunk, str(out / fname), metadata={"format": "pt"})
        weight_map |= {n: fname for n in chunk}
    total = sum(t.numel() * t.element_size() for t in sd.values())
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    if new_spelling:
        cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": cfg.pop("rope_theta")}
        cfg["dtype"] = cfg.pop("torch_dtype")
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    shutil.copyfile(tokenizer, out / "tokenizer.model")
    return out


def long_context_copy(src: Path, out: Path, positions: int = 16384) -> Path:
    """`src` with a longer `max_position_embeddings` (weights linked, not copied): a generation that
    cannot end on its own before a test interrupts it."""
    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.name != "config.json":
            (out / f.name).symlink_to(f.resolve())
    cfg = json.loads((src / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(cfg | {"max_position_embeddings": positions}, indent=2))
    return out
