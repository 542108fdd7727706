"""Model hyper-parameters read from a Hub `config.json` (HF key names)."""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from ..errors import UserError

_DTYPES = {"float32", "bfloat16", "float16"}
# Integer fields that must be at least 1 (``head_dim`` may be 0: derived from the others).
_POSITIVE_INTS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "num_local_experts", "num_experts_per_tok", "vocab_size",
                  "max_position_embeddings")


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}")


@dataclass(frozen=True)
class ModelArgs:
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int = 0  # 0: derived as hidden_size // num_attention_heads
    num_local_experts: int = 8
    num_experts_per_tok: int = 2
    vocab_size: int = 32000
    max_position_embeddings: int = 32768
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-5
    sliding_window: int | None = None
    bos_token_id: int = 1
    eos_token_id: int = 2
    tie_word_embeddings: bool = False
    torch_dtype: str = "bfloat16"

    def __post_init__(self) -> None:
        for name in _POSITIVE_INTS:
            _check_int(name, getattr(self, name), 1)
        _check_int("head_dim", self.head_dim, 0)
        for name in ("bos_token_id", "eos_token_id"):
            _check_int(name, getattr(self, name), 0)
            if getattr(self, name) >= self.vocab_size:
                raise ValueError(f"{name} must be below vocab_size {self.vocab_size}, got {getattr(self, name)}")
        if self.sliding_window is not None:
            _check_int("sliding_window", self.sliding_window, 1)
        for name in ("rope_theta", "rms_norm_eps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        if not self.head_dim:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads "
                                 f"{self.num_attention_heads} (and head_dim is not given)")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        if not 0 < self.num_experts_per_tok <= self.num_local_experts:
            raise ValueError("num_experts_per_tok must be between 1 and num_local_experts")

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> ModelArgs:
        """Build from a Hub config dict, accepting the spellings of old and new transformers."""
        cfg = dict(cfg)
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        if "rope_theta" not in cfg and isinstance(rope, dict) and "rope_theta" in rope:
            cfg["rope_theta"] = rope["rope_theta"]
        if "torch_dtype" not in cfg and "dtype" in cfg:
            cfg["torch_dtype"] = cfg["dtype"]
        if cfg.get("head_dim") is None:
            cfg.pop("head_dim", None)
        names = {f.name for f in fields(cls)}
        args = cls(**{k: v for k, v in cfg.items() if k in names})
        if args.torch_dtype not in _DTYPES:
            object.__setattr__(args, "torch_dtype", "bfloat16")
        return args

    # -- parameter counts (the planner's and bench's byte accounting is built on these) --------
    @property
    def ffn_params(self) -> int:
        """Parameters of one expert (w1, w3: D->I, w2: I->D)."""
        return 3 * self.hidden_size * self.intermediate_size

    @property
    def attention_params(self) -> int:
        """One layer's q, k, v and o projections."""
        q = self.num_attention_heads * self.head_dim
        kv = self.num_key_value_heads * self.head_dim
        return self.hidden_size * (2 * q + 2 * kv)

    @property
    def router_params(self) -> int:
        """One layer's router `gate` (D -> E)."""
        return self.num_local_experts * self.hidden_size

    @property
    def norm_params(self) -> int:
        """One layer's two RMSNorm weights (before attention, before the MoE block)."""
        return 2 * self.hidden_size

    @property
    def layer_shared_params(self) -> int:
        """Per layer, everything but the experts: attention, router gate, two norms."""
        return self.attention_params + self.router_params + self.norm_params

    @property
    def lm_head_params(self) -> int:
        """lm_head (vocab x hidden); embed_tokens has the same shape."""
        return self.vocab_size * self.hidden_size

    @property
    def embedding_params(self) -> int:
        """embed_tokens, lm_head (once when tied) and the final norm."""
        heads = 1 if self.tie_word_embeddings else 2
        return heads * self.lm_head_params + self.hidden_size

    @property
    def params_shared(self) -> int:
        """Everything but the experts: embeddings, lm_head, final norm and every layer's shared parts."""
        return self.embedding_params + self.num_hidden_layers * self.layer_shared_params

    @property
    def params_shared_per_token(self) -> int:
        """What one decoded token reads besides its experts: one row of embed_tokens, every layer's
        shared parts, the final norm and the whole lm_head."""
        row, final_norm = self.hidden_size, self.hidden_size
        return row + self.num_hidden_layers * self.layer_shared_params + final_norm + self.lm_head_params

    @property
    def params_experts(self) -> int:
        return self.num_hidden_layers * self.num_local_experts * self.ffn_params

    @property
    def params_total(self) -> int:
        return self.params_shared + self.params_experts

    @property
    def params_active(self) -> int:
        """Parameters one token uses: the shared ones and its top-k experts in every layer."""
        return self.params_shared + self.num_hidden_layers * self.num_experts_per_tok * self.ffn_params

def check_mixtral(cfg: dict[str, Any], path: Path) -> None:
    archs = cfg.get("architectures") or []
    model_type = cfg.get("model_type")
    if model_type != "mixtral" and "MixtralForCausalLM" not in archs:
        found = model_type or (archs[0] if archs else "unknown")
        raise UserError(
            f"{path} describes a '{found}' model, not Mixtral",
            hint="point -m at a Mixtral checkpoint (model_type 'mixtral')",
        )


def load_config(model_dir: Path) -> tuple[ModelArgs, dict[str, Any]]:
    """Read and validate `config.json`; returns the parsed args and the raw dict."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise UserError(f"no config.json in {model_dir}", hint="pass a Mixtral checkpoint directory")
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON: {e}") from e
    return args_from_config(cfg, path), cfg


def args_from_config(cfg: Any, path: Path) -> ModelArgs:
    """Validate a parsed config (a Mixtral JSON object) and build its ModelArgs."""
    if not isinstance(cfg, dict):
        raise UserError(f"{path} is not a JSON object")
    check_mixtral(cfg, path)
    try:
        return ModelArgs.from_dict(cfg)
    except (TypeError, ValueError) as e:
        raise UserError(f"{path}: {e}") from None
