"""The settings that commands fill from their options, each with its defaults and its one validator.

`SamplingConfig` and `GenerationConfig` say how to generate; `RuntimeOptions` says where and how the
model runs; `ServeOptions` what the server does besides. Settings are validated where they enter:
the command line before any weight loads, chat's `/set`, the server for each request; and once more
by the library entry points (`Completion` for generation settings, `build_engine` for runtime ones),
for callers that skip those. The command line's option defaults are read from here, and
`mixtral --help` must not load torch, so this module does not import it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .errors import UserError

if TYPE_CHECKING:
    from .checkpoints.config import ModelArgs
    from .engine.grammar import Grammar

DEVICES = ("auto", "cpu", "cuda")
DTYPE_NAMES = ("float32", "bfloat16", "float16")  # the compute dtypes one can ask for by name
CPU_EXPERT_MODES = ("auto", "never", "always")
DEFAULT_CTX = 4096  # context length when none is given (or the model's, if shorter)
SEED_RANGE = (-2**63, 2**64 - 1)  # what torch.Generator.manual_seed takes


class InvalidSetting(UserError):
    """A generation setting out of range. `field` is the dataclass field (OpenAI's request parameters
    have the same names) and `problem` says what is wrong without naming it, so the server can name
    the request parameter instead."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field.replace('_', '-')} {problem}")
        self.field, self.problem = field, problem


def _require(ok: bool, field: str, rule: str, value: object) -> None:
    if not ok:
        raise InvalidSetting(field, f"must be {rule}, got {value}")


def _one_of(value: str, choices: tuple[str, ...], what: str) -> None:
    if value not in choices:
        raise UserError(f"unknown {what} '{value}'", hint=f"use {', '.join(choices[:-1])} or {choices[-1]}")


@dataclass
class SamplingConfig:
    """Sampler settings; defaults follow llama.cpp. temperature 0 means greedy."""

    temperature: float = 0.8
    top_k: int = 40  # 0: off
    top_p: float = 0.95  # 1: off
    min_p: float = 0.05  # 0: off
    repeat_penalty: float = 1.0  # 1: off
    repeat_last_n: int = 64
    presence_penalty: float = 0.0  # OpenAI's, over the generated tokens; 0: off
    frequency_penalty: float = 0.0  # OpenAI's, per occurrence in the generated tokens; 0: off
    seed: int | None = None  # None: a fresh random seed
    logit_bias: dict[int, float] = field(default_factory=dict)  # OpenAI's: token id -> added to its logit

    def validate(self) -> None:
        for name in ("temperature", "top_p", "min_p", "repeat_penalty"):
            _require(math.isfinite(getattr(self, name)), name, "a finite number", getattr(self, name))
        _require(self.temperature >= 0, "temperature", ">= 0", self.temperature)
        _require(self.top_k >= 0, "top_k", ">= 0", self.top_k)
        _require(0 < self.top_p <= 1, "top_p", "in (0, 1]", self.top_p)
        _require(0 <= self.min_p < 1, "min_p", "in [0, 1)", self.min_p)
        _require(self.repeat_penalty > 0, "repeat_penalty", "> 0", self.repeat_penalty)
        _require(self.repeat_last_n >= 0, "repeat_last_n", ">= 0", self.repeat_last_n)
        for name in ("presence_penalty", "frequency_penalty"):  # OpenAI's range (not finite fails it too)
            value = getattr(self, name)
            _require(-2 <= value <= 2, name, "in [-2, 2]", f"{value:g}")
        for token, bias in self.logit_bias.items():
            _require(isinstance(token, int) and token >= 0, "logit_bias", "keyed by token ids", token)
            _require(math.isfinite(bias) and -100 <= bias <= 100, "logit_bias", "in [-100, 100]", f"{bias:g}")
        low, high = SEED_RANGE
        _require(self.seed is None or low <= self.seed <= high, "seed", "a 64-bit integer", self.seed)


@dataclass
class GenerationConfig:
    max_tokens: int | None = 512  # None: up to the end of the context (the server's default)
    stop: list[str] = field(default_factory=list)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    grammar: Grammar | None = None  # what the output must match (a checked `engine.grammar.Grammar`)

    def validate(self) -> None:
        _require(self.max_tokens is None or self.max_tokens >= 1, "max_tokens", "at least 1", self.max_tokens)
        self.sampling.validate()


@dataclass
class RuntimeOptions:
    device: str = "auto"  # one of DEVICES
    dtype: str = "auto"  # auto or one of DTYPE_NAMES
    ctx_size: int | None = None  # None: min(model context, DEFAULT_CTX)
    experts_in_gpu: int | None = None  # None: the planner's answer on CUDA, else all experts
    prefetch: bool = True
    gpu_mem: int | None = None  # bytes; None: the GPU's free memory
    threads: int | None = None  # CPU threads for torch; None: torch's default (one per core)
    cpu_experts: str = "auto"  # decode misses computed on the CPU: auto (cost model), never, always

    def validate(self) -> None:
        """What can be checked without the model; `validate_for_model` checks the rest once its config is read."""
        _one_of(self.device, DEVICES, "device")
        _one_of(self.dtype, ("auto", *DTYPE_NAMES), "dtype")
        _one_of(self.cpu_experts, CPU_EXPERT_MODES, "--cpu-experts")
        if self.ctx_size is not None and self.ctx_size < 2:
            raise UserError(f"-c/--ctx-size must be at least 2, got {self.ctx_size}")
        if self.experts_in_gpu is not None and self.experts_in_gpu < 1:
            raise UserError(f"--experts-in-gpu must be at least 1, got {self.experts_in_gpu}")
        if self.gpu_mem is not None and self.gpu_mem < 1:
            raise UserError(f"--gpu-mem must be more than 0 bytes, got {self.gpu_mem}",
                            hint="pass --device cpu to run without the GPU")
        if self.threads is not None and self.threads < 1:
            raise UserError(f"-t/--threads must be at least 1, got {self.threads}")

    def validate_for_model(self, args: ModelArgs) -> None:
        """The limits the model sets: its positions and its experts."""
        self.validate()
        positions = args.max_position_embeddings
        if self.ctx_size is not None and self.ctx_size > positions:
            raise UserError(f"context size {self.ctx_size} exceeds the model's {positions} positions",
                            hint=f"pass -c/--ctx-size of at most {positions}")
        top_k, experts = args.num_experts_per_tok, args.num_local_experts
        if self.experts_in_gpu is not None and not top_k <= self.experts_in_gpu <= experts:
            raise UserError(f"--experts-in-gpu must be between {top_k} and {experts}, got {self.experts_in_gpu}")

    def context_size(self, args: ModelArgs) -> int:
        """The KV cache length: `ctx_size`, else the model's context up to DEFAULT_CTX."""
        return self.ctx_size or min(args.max_position_embeddings, DEFAULT_CTX)


@dataclass
class ServeOptions:
    """`mixtral serve`'s own settings (the model it loads is `RuntimeOptions`' business)."""

    model_name: str  # what /v1/models and every response call the model
    gen: GenerationConfig  # defaults for fields a request leaves out; max_tokens None: the rest of the context
    system: str | None = None  # system prompt for conversations that bring none
    host: str = "127.0.0.1"
    port: int = 8080
    api_key: str | None = None
    max_queue: int = 8  # requests that may wait while one generates; more get 503
    send_timeout: float = 30.0  # seconds a stream may wait for its reader before it is cut
    cors_origins: list[str] = field(default_factory=list)  # browser origins allowed by CORS ("*": any); none: no CORS

    def validate(self) -> None:
        """The server's own settings. `gen` is validated where it is built (the command line's
        options) and, merged with each request's fields, per request; the port is checked where the
        socket is opened (`server.process.listen`)."""
        if self.max_queue < 0:
            raise UserError(f"--max-queue must be at least 0, got {self.max_queue}")
        if not self.send_timeout > 0:
            raise UserError(f"--send-timeout must be positive, got {self.send_timeout}")
        for origin in self.cors_origins:
            _check_origin(origin)


def _check_origin(origin: str) -> None:
    """A --cors-origin: '*', 'null' (what a browser sends from a file:// page) or scheme://host[:port],
    as a browser's Origin header spells it (no path, no trailing slash)."""
    if origin in ("*", "null"):
        return
    scheme, sep, rest = origin.partition("://")
    hint = "pass scheme://host[:port], e.g. http://localhost:3000, or '*' for any origin"
    if not sep or not scheme or not scheme.replace("+", "").replace("-", "").replace(".", "").isalnum() \
            or not rest or any(c in rest for c in " /?#@") or rest.startswith(":") or rest.endswith(":"):
        if sep and rest.endswith("/") and "/" not in rest[:-1]:
            hint = f"drop the trailing slash: {origin[:-1]}"
        raise UserError(f"--cors-origin {origin!r} is not an origin", hint=hint)
