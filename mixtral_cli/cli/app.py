"""The `mixtral` command: one small function per verb; parsing and printing only."""

from __future__ import annotations

import difflib
import os
import re
import sys
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer

from .. import __version__
from ..checkpoints.hub import DEFAULT_REPO
from ..errors import UserError
from ..settings import GenerationConfig, RuntimeOptions, ServeOptions
from . import ui
from .flags import (
    CTX_NAMES,
    DEVICE,
    DTYPE,
    EXPERTS_IN_GPU,
    GPU_MEM,
    RUNTIME,
    SERVE_MAX_TOKENS,
    THREADS,
    default_of,
    generation_and_runtime,
    shared_options,
)

# Only the standard library, typer and rich load at import time: torch and the model code load inside
# the commands that need them (see `_needs_torch`), so `mixtral --help` answers at once.
app = typer.Typer(
    name="mixtral",
    help="Run Mixtral-8x7B on one consumer GPU (or slowly on a CPU): download, quantize, chat.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)

INTERRUPTED = 130  # exit code after Ctrl-C, as shells report SIGINT
DEFAULT_MODEL_HELP = f"[default: $MIXTRAL_MODEL, else {DEFAULT_REPO}]"

# -- shared options (Annotated aliases keep each command's signature short) -------------------
ModelOpt = Annotated[str | None, typer.Option("-m", "--model", metavar="MODEL", help=f"Local directory or Hub repo id {DEFAULT_MODEL_HELP}.")]
YesOpt = Annotated[bool, typer.Option("--yes", "-y", help="Download the model first if it is not in the cache.")]
SystemOpt = Annotated[str | None, typer.Option("--system", metavar="TEXT", help="System prompt (before the first user message with a v1 tokenizer, the last with v3, as mistral-common puts it)  [default: none]")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")]
TraceOpt = Annotated[Path | None, typer.Option("--trace", metavar="FILE", help="Record the experts every layer routes each computed token to, prefill and decode, into FILE (read it with 'mixtral experts FILE' or 'mixtral info --trace FILE').")]
# Each quantization group's bits: quantize's defaults are int8 (quant_config.DEFAULT_GROUP_BITS); info and bench take the checkpoint's.
QuantizeAttnBits = Annotated[int | None, typer.Option("--attn-bits", metavar="4|8|16", help="Attention (q/k/v/o) weight bits; 16 keeps bfloat16  [default: 8]")]
QuantizeOutputBits = Annotated[int | None, typer.Option("--output-bits", metavar="4|8|16", help="Output layer (lm_head) weight bits; 16 keeps bfloat16  [default: 8]")]
AttnBitsOpt = Annotated[int | None, typer.Option("--attn-bits", metavar="4|8|16", help="Attention (q/k/v/o) weight bits  [default: 16 for presets, the checkpoint's for a model]")]
OutputBitsOpt = Annotated[int | None, typer.Option("--output-bits", metavar="4|8|16", help="Output layer (lm_head) weight bits  [default: 16 for presets, the checkpoint's for a model]")]


def _needs_torch(threads: int | None = None) -> None:
    """First call of every command that loads torch: the thread environment only counts before it loads."""
    from ..system import threads_env

    threads_env.configure_cpu_threads_env(threads)


def _version(value: bool) -> None:
    if value:
        ui.print_plain(f"mixtral-cli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors, and debug log lines.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    """`--debug` is read by `main`, which decides how errors are shown; here it sets how much of the log
    (``mixtral_cli.*`` loggers: warnings, or every level) reaches stderr."""
    ui.setup_logging(debug)


def _resolve(model: str | None, yes: bool) -> Path:
    """The model's directory; with --yes a missing repo is downloaded first, with a progress display."""
    from ..checkpoints.hub import ModelNotDownloaded, resolve_model

    try:
        return resolve_model(model)
    except ModelNotDownloaded as missing:
        if not yes:
            raise
        from ..checkpoints.download import download as fetch

        with ui.DownloadProgress() as progress:
            return fetch(missing.repo_id, progress=progress)


def _load(model: str | None, opts, yes: bool = False, grammar=None):
    """The engine; with `grammar`, that grammar is checked against the model's tokenizer first,
    before any weight loads (and the engine keeps that tokenizer, whose vocabulary table the
    grammar engine has then built)."""
    from ..engine.loader import load_engine

    path = _resolve(model, yes)
    tok = None
    if grammar is not None:
        from .structured import check_with_tokenizer

        tok = check_with_tokenizer(grammar, path)
    with ui.load_progress() as update:
        if tok is None:
            return load_engine(path, opts, on_progress=update)
        from ..checkpoints.reader import Checkpoint
        from ..engine.loader import build_engine

        return build_engine(Checkpoint(path), tok, opts, on_progress=update)


def _traced(engine, trace: Path | None, model: str | None):
    """The block records the engine's routing into `trace` (None: nothing), under the model's name as
    the command got it."""
    from ..engine.trace import recording

    return recording(engine.model, trace, model or os.environ.get("MIXTRAL_MODEL") or DEFAULT_REPO)


def _check_trace(trace: Path | None) -> None:
    """A --trace path that cannot be written is refused before a model loads."""
    if trace is not None:
        from ..engine.trace import check_target

        check_target(trace)


@app.command()
def download(
    repo_id: Annotated[str, typer.Argument(metavar="REPO_ID", help="Hub repo id.")] = DEFAULT_REPO,
    revision: Annotated[str | None, typer.Option("--revision", metavar="REV", help="Branch, tag or commit sha; the download is pinned to the commit it names  [default: main]")] = None,
    local_dir: Annotated[Path | None, typer.Option("--local-dir", metavar="DIR", help="Put the files here instead of the Hugging Face cache.")] = None,
    token: Annotated[str | None, typer.Option("--token", metavar="TOKEN", help="Hugging Face token  [default: $HF_TOKEN, else the saved login]")] = None,
) -> None:
    """Fetch the safetensors weights, config and tokenizer (never the .pt pickles), sha256-verified; a rerun keeps completed files."""
    from ..checkpoints.download import download as fetch

    with ui.DownloadProgress() as progress:
        path = fetch(repo_id, revision=revision, local_dir=local_dir, token=token, progress=progress)
    ui.print_plain(str(path))


app.command("pull", help="Alias of download.")(download)


@app.command()
@shared_options(*generation_and_runtime())
def run(
    gen: GenerationConfig,
    runtime: RuntimeOptions,
    prompt: Annotated[str | None, typer.Argument(metavar="PROMPT", help="The prompt; '-' or omitted with piped input reads stdin.")] = None,
    model: ModelOpt = None,
    raw: Annotated[bool, typer.Option("--raw", help="No chat template: ids are [BOS] + encode(prompt).")] = False,
    json_out: JsonOpt = False,
    json_schema: Annotated[str | None, typer.Option("--json-schema", metavar="SCHEMA", help="The output is a JSON document valid under this JSON Schema: inline JSON (starting with '{') or a JSON file's path  [default: none]")] = None,
    json_object: Annotated[bool, typer.Option("--json-object", help="The output is a JSON object (any).")] = False,
    grammar: Annotated[str | None, typer.Option("--grammar", metavar="FILE", help="The output matches this grammar file: llama.cpp's GBNF, or llguidance's Lark (a file with a 'start:' rule)  [default: none]")] = None,
    system: SystemOpt = None,
    trace: TraceOpt = None,
    yes: YesOpt = False,
) -> None:
    """One-shot completion: stream the answer to PROMPT on stdout."""
    if prompt is None or prompt == "-":
        if prompt is None and sys.stdin.isatty():
            raise UserError("no prompt given", hint="pass a prompt argument, or '-' to read it from stdin")
        prompt = sys.stdin.read()
    if not prompt.strip():
        raise UserError("the prompt is empty", hint="pass a prompt argument, or pipe the prompt text into 'mixtral run -'")
    if raw and system:
        raise UserError("--system needs the chat template", hint="drop --raw or --system")
    from .structured import build, from_options

    spec = from_options(json_schema, json_object, grammar)  # read (files too) before torch loads
    _check_trace(trace)
    _needs_torch(runtime.threads)
    from .actions import run_once

    if spec is not None:
        gen.grammar = build(spec)  # refused from its text alone, before the model is looked up
    engine = _load(model, runtime, yes, grammar=gen.grammar)
    with _traced(engine, trace, model):
        run_once(engine, prompt, gen, raw=raw, system=system, json_out=json_out)


@app.command()
@shared_options(DEVICE, DTYPE, GPU_MEM, EXPERTS_IN_GPU, THREADS)  # no --no-prefetch, no --cpu-experts
def perplexity(
    runtime: RuntimeOptions,
    file: Annotated[Path, typer.Argument(metavar="FILE", help="UTF-8 text file to score.")],
    model: ModelOpt = None,
    ctx: Annotated[int, typer.Option(*CTX_NAMES, metavar="N", help="Window length in tokens.")] = 512,
    kl_base: Annotated[str | None, typer.Option("--kl-base", metavar="BASE", help="Also report the KL divergence from BASE: a model (directory or Hub repo id, run beside MODEL) or a file from --save-logits.")] = None,
    save_logits: Annotated[Path | None, typer.Option("--save-logits", metavar="OUT", help="Write the model's next-token distributions to OUT, for a later --kl-base OUT (64 KB a position at vocabulary 32000).")] = None,
    json_out: JsonOpt = False,
    yes: YesOpt = False,
) -> None:
    """Perplexity of FILE in independent windows of --ctx tokens; with --kl-base, the KL divergence from a base."""
    runtime = replace(runtime, ctx_size=ctx, prefetch=False)  # the KV cache holds one window
    runtime.validate()
    if kl_base is not None and save_logits is not None:
        raise UserError("--kl-base and --save-logits go in separate runs",
                        hint="save the base's logits first, then compare with --kl-base FILE")
    _needs_torch(runtime.threads)
    from ..engine.logits_file import LogitsReader
    from .scoring import read_text, score

    text = read_text(file)
    base = None
    if kl_base is not None and Path(kl_base).is_file():
        base = LogitsReader(Path(kl_base))  # checked before the model loads
    engine = _load(model, runtime, yes)
    if kl_base is not None and base is None:
        base = _load(kl_base, runtime, yes)
    score(engine, file, text, ctx, json_out=json_out, save_logits=save_logits, base=base)


@app.command()
def info(
    model: Annotated[str | None, typer.Argument(metavar="MODEL", help=f"Model directory, config.json, or Hub repo id {DEFAULT_MODEL_HELP}.")] = None,
    bits: Annotated[int | None, typer.Option("--bits", metavar="4|8|16", help="Expert weight bits for the plan  [default: the checkpoint's]")] = None,
    attn_bits: AttnBitsOpt = None,
    output_bits: OutputBitsOpt = None,
    gpu_mem: Annotated[str | None, typer.Option("--gpu-mem", metavar="SIZE", help="GPU memory budget to plan for, e.g. 24GiB  [default: this GPU's free memory; 24GiB without a GPU]")] = None,
    ctx: Annotated[int, typer.Option(*CTX_NAMES, metavar="N", help="Context length for the KV cache in the plan.")] = 4096,
    trace: Annotated[Path | None, typer.Option("--trace", metavar="FILE", help="Replay this routing trace through expert-cache policies: per-layer LRU (today's), a global LRU pool and a layer-aware pool; hit rates and bytes per token.")] = None,
    slots: Annotated[list[int] | None, typer.Option("--slots", metavar="K", help="With --trace: simulate K slots per layer (a pool of layers x K), repeatable  [default: top-k to all experts, and the budget's pool]")] = None,
    pool: Annotated[list[int] | None, typer.Option("--pool", metavar="N", help="With --trace: simulate a pool of N slots for all layers, repeatable.")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Parameter counts, weight sizes and the memory plan for a GPU budget; with --trace, the expert-cache simulation."""
    if (slots or pool) and trace is None:
        raise UserError("--slots and --pool need --trace FILE", hint="record a trace with `mixtral run --trace FILE`")
    _needs_torch()
    from ..sizes import parse_size
    from .actions import show_info

    show_info(model, bits=bits, attn_bits=attn_bits, output_bits=output_bits, gpu_mem=parse_size(gpu_mem) if gpu_mem else None,
              ctx=ctx,
              json_out=json_out, trace=trace, slots=slots, pools=pool)


@app.command()
def experts(
    file: Annotated[Path, typer.Argument(metavar="FILE", help="A routing trace from run, chat or bench --trace.")],
    tokens: Annotated[str, typer.Option("--tokens", metavar="all|prefill|decode", help="Which tokens to count.")] = "all",
    json_out: JsonOpt = False,
) -> None:
    """Expert usage from a routing trace: a layer x expert heatmap (share of each layer's selections) and how often consecutive tokens reuse experts."""
    from .trace_report import show_routing

    show_routing(file, tokens, json_out)


@app.command()
def quantize(
    model: Annotated[str, typer.Argument(metavar="MODEL", help="Hub-layout model directory or Hub repo id.")],
    bits: Annotated[int, typer.Option("--bits", metavar="4|8", help="Expert weight bits: 4 (nf4) or 8 (int8).")],
    out: Annotated[Path | None, typer.Option("--out", metavar="DIR", help="Output directory  [default: <MODEL>-q<bits> beside a local model; ./<repo name>-q<bits> for a repo id]")] = None,
    group_size: Annotated[int | None, typer.Option("--group-size", metavar="N", help="Weights per scale  [default: 64 for 4-bit, 128 for 8-bit]")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing quantized checkpoint at --out.")] = False,
    shard_size: Annotated[str, typer.Option("--shard-size", metavar="SIZE", help="Approximate size of each output shard.")] = "5GB",
    attn_bits: QuantizeAttnBits = None,
    output_bits: QuantizeOutputBits = None,
    yes: YesOpt = False,
) -> None:
    """Write a copy of MODEL with its linear layers quantized (experts, attention, output); prints the output directory."""
    _needs_torch()
    from ..checkpoints.quantize import quantize_cli
    from ..sizes import parse_size

    source = _resolve(model, yes)
    path = quantize_cli(source, bits, out, group_size, force, parse_size(shard_size), ui.QuantizeProgress,
                        attn_bits=attn_bits, output_bits=output_bits)
    ui.print_plain(str(path))


@app.command()
@shared_options(*generation_and_runtime())
def chat(
    gen: GenerationConfig,
    runtime: RuntimeOptions,
    model: ModelOpt = None,
    system: SystemOpt = None,
    trace: TraceOpt = None,
    yes: YesOpt = False,
) -> None:
    """Multi-turn chat in the terminal (/help inside lists the commands); reads lines from a pipe too."""
    _check_trace(trace)
    _needs_torch(runtime.threads)
    from .chat import chat_loop

    engine = _load(model, runtime, yes)
    with _traced(engine, trace, model):
        chat_loop(engine, gen, system=system)


@app.command()
@shared_options(*generation_and_runtime(SERVE_MAX_TOKENS))
def serve(
    gen: GenerationConfig,
    runtime: RuntimeOptions,
    model: ModelOpt = None,
    host: Annotated[str, typer.Option("--host", metavar="HOST", help="Address to listen on; any but loopback (127.0.0.1, ::1, localhost) lets other machines in.")] = default_of(ServeOptions, "host"),
    port: Annotated[int, typer.Option("--port", metavar="PORT", help="TCP port; 0 picks a free one (the URL printed on stdout names it).")] = default_of(ServeOptions, "port"),
    api_key: Annotated[str | None, typer.Option("--api-key", metavar="KEY", envvar="MIXTRAL_API_KEY", show_envvar=False, help="Require 'Authorization: Bearer KEY' on every /v1 request (/health stays open); default: $MIXTRAL_API_KEY, else no key.")] = None,
    max_queue: Annotated[int, typer.Option("--max-queue", metavar="N", help="Requests that may wait while one generates; more get 503 with Retry-After.")] = default_of(ServeOptions, "max_queue"),
    send_timeout: Annotated[float, typer.Option("--send-timeout", metavar="SECONDS", help="Cut a stream whose client has not read for this long.")] = default_of(ServeOptions, "send_timeout"),
    system: Annotated[str | None, typer.Option("--system", metavar="TEXT", help="System prompt for conversations that bring none (default: none).")] = None,
    cors_origin: Annotated[list[str] | None, typer.Option("--cors-origin", metavar="ORIGIN", help="Let web pages from ORIGIN (e.g. http://localhost:3000; '*' for any) call the API from a browser (repeatable)  [default: none: no CORS headers]")] = None,
    yes: YesOpt = False,
) -> None:
    """Serve the model on OpenAI's HTTP API: /v1/chat/completions (streaming too), /v1/completions, /v1/models, /health.

    Generation options are the defaults for what a request leaves out; a request's own fields win.
    One request generates at a time; the others wait in order. SIGINT or SIGTERM stops the server.
    """
    _needs_torch(runtime.threads)
    from ..server.process import is_loopback, listen, model_name
    from ..server.process import serve as run_server

    opts = ServeOptions(model_name=model_name(model), gen=gen, system=system, host=host, port=port,
                        api_key=api_key or None, max_queue=max_queue, send_timeout=send_timeout,
                        cors_origins=list(cors_origin or ()))
    opts.validate()
    sock = listen(host, port)  # before the long load: a port in use fails at once
    if not opts.api_key and not is_loopback(host):
        ui.notice(f"warning: listening on {host} without an API key: anyone who can reach this port can use "
                  "the model (set --api-key or $MIXTRAL_API_KEY)")
    elif not opts.api_key and "*" in opts.cors_origins:
        ui.notice("warning: --cors-origin '*' without an API key: any web page open in a browser on this machine "
                  "can use the model (set --api-key or $MIXTRAL_API_KEY, or name the origins)")
    run_server(_load(model, runtime, yes), opts, sock, ui.server_log, ui.serve_banner)


@app.command()
@shared_options(*RUNTIME)
def bench(
    runtime: RuntimeOptions,
    model: ModelOpt = None,
    preset: Annotated[str | None, typer.Option("--preset", metavar="tiny|mini|8x7b", help="Synthetic random weights instead of a checkpoint (no download).")] = None,
    bits: Annotated[int | None, typer.Option("--bits", metavar="4|8|16", help="Expert weight bits  [default: 16 for presets, the checkpoint's for -m]")] = None,
    attn_bits: AttnBitsOpt = None,
    output_bits: OutputBitsOpt = None,
    prompt_tokens: Annotated[int, typer.Option("--prompt-tokens", metavar="N", help="Prompt length (random token ids).")] = 512,
    gen_tokens: Annotated[int, typer.Option("--gen-tokens", metavar="N", help="Tokens decoded and timed (greedy, EOS ignored).")] = 128,
    baseline: Annotated[str | None, typer.Option("--baseline", metavar="transformers", help="Also run this engine on the same weights  [default: none]")] = None,
    sweep_slots: Annotated[bool, typer.Option("--sweep-slots", help="Decode with every expert-slot count from top-k to all experts.")] = False,
    csv_path: Annotated[Path | None, typer.Option("--csv", metavar="FILE", help="Where --sweep-slots writes its CSV  [default: ./bench-slots.csv]")] = None,
    rounds: Annotated[int, typer.Option("--rounds", metavar="N", help="Repeat the measurement (interleaved with the baseline); medians are reported.")] = 1,
    layers: Annotated[int | None, typer.Option("--layers", metavar="N", help="With --preset: only the first N layers, at the preset's real matrix sizes (e.g. --preset 8x7b --layers 2).")] = None,
    trace: Annotated[Path | None, typer.Option("--trace", metavar="FILE", help="After the timed rounds, run one more (untimed) and record its routing, prefill and decode, into FILE.")] = None,
    json_out: JsonOpt = False,
    yes: YesOpt = False,
) -> None:
    """Prefill and decode speed, memory, expert-cache hit rate, and the bandwidth bound they imply."""
    _needs_torch(runtime.threads)
    from ..bench.run import BenchOptions, run_bench

    if model is not None and preset is not None:
        raise UserError("pass either -m MODEL or --preset, not both")
    _check_trace(trace)
    model_dir = None
    if preset is None:
        model_dir = _resolve(model, yes)
    opts = BenchOptions(preset=preset, model_dir=model_dir, bits=bits, attn_bits=attn_bits, output_bits=output_bits,
                        prompt_tokens=prompt_tokens,
                        gen_tokens=gen_tokens, baseline=baseline, sweep_slots=sweep_slots, csv_path=csv_path,
                        rounds=rounds, layers=layers, runtime=runtime, trace=trace)
    result = run_bench(opts, log=ui.bench_progress)
    if json_out:
        ui.print_json(result.as_dict())
    else:
        ui.bench_report(result)


# -- usage errors: Click's own messages, as our one line ---------------------------------------
def _looks_like_model(arg: str) -> bool:
    """A local checkpoint directory or something spelled like a Hub repo id (``org/name``)."""
    path = Path(arg).expanduser()
    return (path / "config.json").is_file() or (
        not path.exists() and re.fullmatch(r"[A-Za-z0-9][\w.\-]*/[\w.\-]+", arg) is not None)


def _usage_error(e: Exception, argv: list[str]) -> tuple[str, str | None]:
    """One line (what is wrong, what to do) for a Click usage error: unknown option or command,
    extra or missing argument, bad value."""
    ctx = getattr(e, "ctx", None)
    command = ctx.command_path if ctx is not None else "mixtral"
    see = f"see '{command} --help'"
    kind = type(e).__name__
    message = str(getattr(e, "message", "") or e).strip()
    if kind == "NoSuchOption":
        option = e.option_name  # type: ignore[attr-defined]
        close = list(e.possibilities or [])  # type: ignore[attr-defined]
        if option in ("-m", "--model") and ctx is not None and ctx.info_name in ("info", "quantize"):
            return f"'{command}' takes the model as an argument, not with {option}", f"{command} MODEL ..."
        return f"unknown option {option} for '{command}'", f"did you mean {close[0]}?" if close else see
    m = re.match(r"No such command '([^']*)'", message)
    if m:
        names = sorted(getattr(ctx.command, "commands", {})) if ctx is not None else []
        close = difflib.get_close_matches(m.group(1), names, n=1)
        return (f"unknown command '{m.group(1)}'",
                f"did you mean '{close[0]}'?" if close else f"the commands are: {', '.join(names)}")
    m = re.match(r"Got unexpected extra argument(?:s|\(s\))? \((.*)\)", message)
    if m:
        takes_m = ctx is not None and any("-m" in getattr(p, "opts", ()) for p in ctx.command.params)
        words = [w for w in argv if not w.startswith("-")]
        model = next((w for w in words if _looks_like_model(w)), None)
        if takes_m and model is not None:
            return (f"unexpected argument {m.group(1)} for '{command}'",
                    f"pass a model with -m: {command} -m {model} ...")
        return f"unexpected argument {m.group(1)} for '{command}'", see
    message = " ".join(e.format_message().split()).rstrip(".")  # type: ignore[attr-defined]
    return message[:1].lower() + message[1:], see


def main() -> None:
    """Console entry point: user errors are one line on stderr (exit 2), failures exit 1."""
    argv = sys.argv[1:]
    debug = "--debug" in argv
    try:
        code = app(args=argv, prog_name="mixtral", standalone_mode=False)
    except UserError as e:
        if debug:
            raise
        ui.error_line(e.message, e.hint)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        if debug:
            raise
        ui.error_line("interrupted")
        sys.exit(INTERRUPTED)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        ui.error_line("aborted")
        sys.exit(INTERRUPTED)
    except typer.TyperException as e:  # Click's usage errors (typer bundles Click)
        if type(e).__name__ == "NoArgsIsHelpError":  # a bare `mixtral`
            ui.print_plain(e.ctx.get_help())  # type: ignore[attr-defined]
            sys.exit(0)
        if debug:
            raise
        message, hint = _usage_error(e, argv)
        ui.error_line(message, hint)
        sys.exit(UserError.exit_code)
    except Exception as e:  # noqa: BLE001 - the last line of defence: one line, no traceback
        if debug:
            raise
        ui.error_line(f"{type(e).__name__}: {e}", hint="run with --debug for the traceback")
        sys.exit(1)
    # Typer turns Ctrl-C inside a command into the return value 130 (and an explicit Exit into its code).
    if code == INTERRUPTED:
        ui.error_line("interrupted")
    if isinstance(code, int) and code:
        sys.exit(code)
