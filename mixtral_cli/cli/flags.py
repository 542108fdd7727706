"""The options several commands share, declared once, and the decorator that gives them to a command.

Each `SharedOption` is a typer option that fills one field of a settings object (`SamplingConfig`,
`GenerationConfig`, `RuntimeOptions`); its default is that field's default. A command decorated with
`@shared_options(...)` takes the settings (`gen: GenerationConfig`, `runtime: RuntimeOptions`) as
parameters instead of the options, and gets them built and validated before anything loads.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import typer
from typer.models import OptionInfo

from ..settings import (
    CPU_EXPERT_MODES,
    DEFAULT_CTX,
    DEVICES,
    DTYPE_NAMES,
    GenerationConfig,
    RuntimeOptions,
    SamplingConfig,
)
from ..sizes import parse_size

Command = TypeVar("Command", bound=Callable[..., Any])
FIELD_DEFAULT: Any = object()  # a SharedOption's default is its field's

# -c/--ctx-size (llama.cpp's spelling) and --ctx name the same thing in every command.
CTX_NAMES = ("-c", "--ctx-size", "--ctx")


def default_of(settings: type, name: str) -> Any:
    """The default of field `name` of the dataclass `settings`."""
    spec = next(f for f in dataclasses.fields(settings) if f.name == name)
    return spec.default_factory() if spec.default is dataclasses.MISSING else spec.default


def _same(value: Any) -> Any:
    return value


@dataclasses.dataclass(frozen=True)
class SharedOption:
    """A command-line option that sets `settings.field`."""

    settings: type  # SamplingConfig, GenerationConfig or RuntimeOptions
    field: str
    value_type: Any  # what typer parses the value as
    option: OptionInfo  # flags, metavar, help
    name: str = ""  # the parameter's name, where it is not the field's
    parse: Callable[[Any], Any] = _same  # the option's value -> the field's value
    default: Any = FIELD_DEFAULT

    @property
    def parameter_name(self) -> str:
        return self.name or self.field

    def parameter(self) -> inspect.Parameter:
        default = default_of(self.settings, self.field) if self.default is FIELD_DEFAULT else self.default
        return inspect.Parameter(self.parameter_name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default,
                                 annotation=Annotated[self.value_type, self.option])


def _size(text: str | None) -> int | None:
    return None if text is None else parse_size(text)


MAX_TOKENS = SharedOption(GenerationConfig, "max_tokens", int, typer.Option(
    "-n", "--max-tokens", metavar="N", help="Maximum tokens to generate."))
# serve's -n: with none, a chat request that sets no max_tokens may run to the end of the context
SERVE_MAX_TOKENS = SharedOption(GenerationConfig, "max_tokens", int | None, typer.Option(
    "-n", "--max-tokens", metavar="N",
    help="max_tokens of chat requests that set none (default: the rest of the context; /v1/completions: 16, as OpenAI)."),
    default=None)
TEMPERATURE = SharedOption(SamplingConfig, "temperature", float, typer.Option(
    "--temperature", "--temp", metavar="T", help="Sampling temperature; 0 = greedy."))
TOP_P = SharedOption(SamplingConfig, "top_p", float, typer.Option(
    "--top-p", metavar="P", help="Nucleus sampling mass; 1 = off."))
TOP_K = SharedOption(SamplingConfig, "top_k", int, typer.Option(
    "--top-k", metavar="K", help="Keep the K most likely tokens; 0 = off."))
MIN_P = SharedOption(SamplingConfig, "min_p", float, typer.Option(
    "--min-p", metavar="P", help="Drop tokens below min-p x the top probability; 0 = off."))
REPEAT_PENALTY = SharedOption(SamplingConfig, "repeat_penalty", float, typer.Option(
    "--repeat-penalty", metavar="X",
    help=f"Penalty for the last {default_of(SamplingConfig, 'repeat_last_n')} tokens; 1 = off."))
SEED = SharedOption(SamplingConfig, "seed", int | None, typer.Option(
    "-s", "--seed", metavar="N", help="Random seed (same seed, same output)  [default: random]"))
CTX_SIZE = SharedOption(RuntimeOptions, "ctx_size", int | None, typer.Option(
    *CTX_NAMES, metavar="N", help=f"Context length in tokens (KV cache size)  [default: min(model max, {DEFAULT_CTX})]"))
STOP = SharedOption(GenerationConfig, "stop", list[str] | None, typer.Option(
    "--stop", metavar="TEXT", help="Stop when this string appears (repeatable)  [default: none]"),
    parse=lambda stops: list(stops or ()), default=None)
DEVICE = SharedOption(RuntimeOptions, "device", str, typer.Option(
    "--device", metavar="|".join(DEVICES), help="Where to run."))
DTYPE = SharedOption(RuntimeOptions, "dtype", str, typer.Option(
    "--dtype", metavar="|".join(("auto", *DTYPE_NAMES)),
    help="Compute dtype of unquantized parts (auto: bfloat16, float16 on GPUs without bf16)."))
GPU_MEM = SharedOption(RuntimeOptions, "gpu_mem", str | None, typer.Option(
    "--gpu-mem", metavar="SIZE", help="GPU memory budget for this process, e.g. 24GiB  [default: the GPU's free memory]"),
    parse=_size)
EXPERTS_IN_GPU = SharedOption(RuntimeOptions, "experts_in_gpu", int | None, typer.Option(
    "--experts-in-gpu", metavar="K", help="Expert slots per layer (overrides the planner; CPU too)  [default: from the plan]"))
NO_PREFETCH = SharedOption(RuntimeOptions, "prefetch", bool, typer.Option(
    "--no-prefetch", help="Turn off speculative expert prefetch."),
    name="no_prefetch", parse=lambda off: not off, default=not default_of(RuntimeOptions, "prefetch"))
CPU_EXPERTS = SharedOption(RuntimeOptions, "cpu_experts", str, typer.Option(
    "--cpu-experts", metavar="|".join(CPU_EXPERT_MODES),
    help="With offloaded experts, compute a decode miss on the CPU instead of copying it: auto decides per miss "
         "from costs measured at load."))
THREADS = SharedOption(RuntimeOptions, "threads", int | None, typer.Option(
    "-t", "--threads", metavar="N", help="CPU threads for torch and the native kernels; fewer can be faster on a busy machine  [default: one per core]"))

SAMPLING = (TEMPERATURE, TOP_P, TOP_K, MIN_P, REPEAT_PENALTY, SEED)
RUNTIME = (DEVICE, DTYPE, GPU_MEM, EXPERTS_IN_GPU, NO_PREFETCH, CPU_EXPERTS, THREADS)


def generation_and_runtime(max_tokens: SharedOption = MAX_TOKENS) -> tuple[SharedOption, ...]:
    """The options of `run`, `chat` and `serve`, in their --help order (the server has its own -n)."""
    return (max_tokens, *SAMPLING, CTX_SIZE, STOP, *RUNTIME)


def _build(settings: type, values: list[tuple[SharedOption, Any]]) -> GenerationConfig | RuntimeOptions:
    def fields(of: type) -> dict[str, Any]:
        return {o.field: o.parse(v) for o, v in values if o.settings is of}

    if settings is GenerationConfig:
        return GenerationConfig(sampling=SamplingConfig(**fields(SamplingConfig)), **fields(GenerationConfig))
    return RuntimeOptions(**fields(RuntimeOptions))


def shared_options(*options: SharedOption, before: str = "yes") -> Callable[[Command], Command]:
    """Give `options` to a command whose first parameters are the settings they fill (`gen:
    GenerationConfig`, `runtime: RuntimeOptions`): `--help` lists them just before the command's
    parameter `before` (-y/--yes, the last option of every command that loads a model), and the
    command is called with the settings built from them and validated.

    typer reads a command's parameters from `inspect.signature`, so the wrapper's `__signature__` is
    the command's own parameters with the options in place of the settings parameters."""

    def decorate(command: Command) -> Command:
        params = list(inspect.signature(command, eval_str=True).parameters.values())
        settings = {p.name: p.annotation for p in params if p.annotation in (GenerationConfig, RuntimeOptions)}
        filled = {GenerationConfig: (GenerationConfig, SamplingConfig), RuntimeOptions: (RuntimeOptions,)}
        if any(not any(o.settings in filled[s] for s in settings.values()) for o in options):
            raise TypeError(f"{command.__name__} takes no settings object for some of its shared options")
        own = [p for p in params if p.name not in settings]
        at = next((i for i, p in enumerate(own) if p.name == before), len(own))
        signature = inspect.Signature([*own[:at], *(o.parameter() for o in options), *own[at:]])

        @functools.wraps(command)
        def wrapper(**kwargs: Any) -> Any:
            values = [(o, kwargs.pop(o.parameter_name)) for o in options]
            for name, kind in settings.items():
                kwargs[name] = _build(kind, values)
                kwargs[name].validate()
            return command(**kwargs)

        wrapper.__signature__ = signature  # type: ignore[attr-defined]
        wrapper.__annotations__ = {p.name: p.annotation for p in signature.parameters.values()}
        return wrapper  # type: ignore[return-value]

    return decorate
