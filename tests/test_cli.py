"""The `mixtral` command as a user runs it: real processes, exit codes, stdout/stderr contracts."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny import write_checkpoint

REAL_CONFIG = Path(__file__).parent / "data" / "mixtral-8x7b-instruct-v0.1.config.json"


def mixtral(*args: str, stdin: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "mixtral_cli", *args], input=stdin, capture_output=True,
                          text=True, env=full_env, timeout=300)


def assert_user_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error:")
    for needle in needles:
        assert needle in lines[0]


# -- info --------------------------------------------------------------------------------------
def test_info_real_config_counts():
    proc = mixtral("info", str(REAL_CONFIG))
    assert proc.returncode == 0, proc.stderr
    assert "46.70B total" in proc.stdout and "12.88B active" in proc.stdout
    data = json.loads(mixtral("info", str(REAL_CONFIG), "--json").stdout)
    assert data["params_total"] == 46_702_792_704
    assert data["params_active"] == 12_879_925_248
    assert data["bytes_weights"]["total"] == 2 * data["params_total"]


def test_info_plan_for_24gib_at_4_bits():
    proc = mixtral("info", str(REAL_CONFIG), "--bits", "4", "--gpu-mem", "24GiB", "--ctx", "4096", "--json")
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)["plan"]
    assert 2 <= plan["slots_per_layer"] < 8 and plan["offloaded"]
    assert plan["total"] <= 24 * 2**30


def test_info_4bit_attention_plans_more_expert_slots():
    def info(*flags: str) -> dict:
        proc = mixtral("info", str(REAL_CONFIG), "--bits", "4", "--gpu-mem", "24GiB", "--ctx", "4096", "--json", *flags)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    bf16, nf4 = info(), info("--attn-bits", "4", "--output-bits", "8")
    assert nf4["plan"]["experts_on_device"] - bf16["plan"]["experts_on_device"] >= 16
    assert (bf16["attn_bits"], nf4["attn_bits"], nf4["output_bits"]) == (16, 4, 8)
    g = nf4["groups"]
    assert g["attention"]["bytes"] == 32 * 21_637_136 == g["attention"]["gpu_bytes"]  # tests/test_plan.py by hand
    assert g["experts"]["host_bytes"] == nf4["plan"]["host_pinned"] > 0
    assert nf4["bytes_weights"]["other"] < bf16["bytes_weights"]["other"]
    assert_user_error(mixtral("info", str(REAL_CONFIG), "--attn-bits", "5"), "--attn-bits 5")


def test_info_accounts_for_host_ram():
    """Offloaded experts all live in a pinned host store (256 x 90,876,096 bytes at 4 bits), and loading
    keeps 2 GiB free for the system; with every expert on the GPU nothing is pinned."""
    data = json.loads(mixtral("info", str(REAL_CONFIG), "--bits", "4", "--gpu-mem", "24GiB", "--json").stdout)
    assert data["host_ram"]["pinned"] == data["plan"]["host_pinned"] == 23_264_280_576
    assert data["host_ram"]["headroom"] == 2 * 2**30
    table = mixtral("info", str(REAL_CONFIG), "--bits", "4", "--gpu-mem", "24GiB").stdout
    assert "21.67 GiB pinned for the expert store" in " ".join(table.split())
    data = json.loads(mixtral("info", str(REAL_CONFIG), "--bits", "4", "--gpu-mem", "80GiB", "--json").stdout)
    assert data["host_ram"]["pinned"] == 0 and data["host_ram"]["headroom"] == 0


def test_info_refuses_budget_below_top_k_slots():
    proc = mixtral("info", str(REAL_CONFIG), "--bits", "4", "--gpu-mem", "4GiB")
    assert_user_error(proc, "minimum")


# -- run ---------------------------------------------------------------------------------------
def test_run_cpu_experts_always_same_tokens_and_counted(tiny_ckpt):
    common = ["run", "The capital of France", "-m", str(tiny_ckpt), "--raw", "--json", "--temp", "0", "-n", "12",
              "--dtype", "float32", "--device", "cpu", "--experts-in-gpu", "2"]
    never, always = (json.loads(mixtral(*common, "--cpu-experts", mode).stdout) for mode in ("never", "always"))
    assert always["token_ids"] == never["token_ids"]
    assert never["expert_cache"]["cpu_experts"] == 0
    assert 0 < always["expert_cache"]["cpu_experts"] <= always["expert_cache"]["misses"]
    assert always["expert_cache"]["bytes_to_device"] < never["expert_cache"]["bytes_to_device"]
    assert_user_error(mixtral(*common, "--cpu-experts", "sometimes"), "cpu-experts")


def test_run_raw_json_greedy_matches_reference(tiny_ckpt, hf_tiny):
    proc = mixtral("run", "The capital of France", "-m", str(tiny_ckpt), "--raw", "--json", "--temp", "0",
                   "-n", "24", "--dtype", "float32", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    for key in ("text", "prompt_token_ids", "token_ids", "finish_reason", "prompt_tokens", "completion_tokens",
                "prefill_tokens_per_s", "decode_tokens_per_s", "expert_cache", "peak_device_memory_bytes"):
        assert key in out
    assert set(out["expert_cache"]) == {"slots_per_layer", "hits", "misses", "prefetch_hits", "bytes_to_device",
                                        "cpu_experts"}
    ids = torch.tensor([out["prompt_token_ids"]])
    assert out["prompt_token_ids"][0] == 1
    with torch.no_grad():
        ref = hf_tiny.generate(ids, max_new_tokens=24, do_sample=False, pad_token_id=0)[0, ids.shape[1]:].tolist()
    assert out["token_ids"] == ref
    assert out["completion_tokens"] == len(ref)
    uses = out["expert_cache"]["hits"] + out["expert_cache"]["misses"]
    # every processed token (prompt + all generated but the last) routes through top-2 of each of 3 layers
    assert uses == 3 * 2 * (out["prompt_tokens"] + out["completion_tokens"] - 1)


def test_run_reads_stdin_and_pipes_plain_text(tiny_ckpt):
    proc = mixtral("run", "-", "-m", str(tiny_ckpt), "--temp", "0", "-n", "8", "--device", "cpu", stdin="Hello there")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.endswith("\n") and "\x1b" not in proc.stdout and "\x1b" not in proc.stderr
    same = mixtral("run", "Hello there", "-m", str(tiny_ckpt), "--temp", "0", "-n", "8", "--device", "cpu", "-t", "1")
    assert same.stdout == proc.stdout


def test_run_seed_reproducible(tiny_ckpt):
    args = ("run", "Hi", "-m", str(tiny_ckpt), "-n", "10", "--temp", "1.0", "--device", "cpu", "--json")
    a = json.loads(mixtral(*args, "-s", "7").stdout)
    b = json.loads(mixtral(*args, "-s", "7").stdout)
    c = json.loads(mixtral(*args, "-s", "8").stdout)
    assert a["token_ids"] == b["token_ids"]
    assert c["token_ids"] != a["token_ids"]  # the seed is really used


def test_run_system_prompt_uses_the_chat_template(tiny_ckpt):
    from mixtral_cli.checkpoints.tokenizer import Tokenizer

    proc = mixtral("run", "Hi", "--system", "Be brief.", "-m", str(tiny_ckpt), "-n", "2", "--temp", "0",
                   "--device", "cpu", "--json")
    assert proc.returncode == 0, proc.stderr
    tok = Tokenizer.from_file(tiny_ckpt / "tokenizer.model")
    expected = tok.encode_chat([{"role": "user", "content": "Hi"}], system="Be brief.")
    assert json.loads(proc.stdout)["prompt_token_ids"] == expected
    assert tok.decode(expected).startswith("[INST] Be brief.\n\nHi [/INST]")
    assert_user_error(mixtral("run", "Hi", "--raw", "--system", "Be brief.", "-m", str(tiny_ckpt)),
                      "--system needs the chat template")


def test_run_stop_string_through_the_cli(tiny_ckpt):
    args = ("run", "Once upon a time", "-m", str(tiny_ckpt), "-n", "24", "--temp", "0", "--device", "cpu", "--json")
    full = json.loads(mixtral(*args).stdout)
    text = full["text"]
    assert full["finish_reason"] == "length" and len(text) > 12
    stop = text[6:10]
    cut = json.loads(mixtral(*args, "--stop", "@@never@@", "--stop", stop).stdout)
    assert cut["text"] == text[: text.index(stop)]
    assert cut["finish_reason"] == "stop" and cut["completion_tokens"] < full["completion_tokens"]


@pytest.mark.parametrize("stdin", ["", "  \n\n"])
def test_empty_prompt_is_refused(tiny_ckpt, stdin):
    assert_user_error(mixtral("run", "-", "-m", str(tiny_ckpt), stdin=stdin), "the prompt is empty")


def test_run_prints_the_stats_line_only_to_a_terminal(tiny_ckpt):
    args = [sys.executable, "-m", "mixtral_cli", "run", "Hi", "-m", str(tiny_ckpt), "-n", "5", "--temp", "0",
            "--device", "cpu"]
    master, slave = os.openpty()
    try:
        proc = subprocess.run(args, stdout=subprocess.PIPE, stderr=slave, text=True, timeout=300,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"})
        os.close(slave)
        err = b""
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: every writer has closed the terminal
                break
            if not chunk:
                break
            err += chunk
    finally:
        os.close(master)
    assert proc.returncode == 0
    assert re.search(r"prompt [\d.]+ tok/s · gen [\d.]+ tok/s · 5 tokens · experts hit \d+%", err.decode())
    piped = mixtral(*args[3:])
    assert piped.returncode == 0 and piped.stdout == proc.stdout and "tok/s" not in piped.stderr


def test_prompt_longer_than_context_is_refused(tiny_ckpt):
    proc = mixtral("run", "word " * 100, "-m", str(tiny_ckpt), "-c", "32", "--device", "cpu")
    assert_user_error(proc, "context")


# -- perplexity --------------------------------------------------------------------------------
def test_perplexity_refuses_too_little_text_and_non_utf8(tiny_ckpt, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert_user_error(mixtral("perplexity", str(empty), "-m", str(tiny_ckpt), "--device", "cpu"), "no text to score")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    assert_user_error(mixtral("perplexity", str(latin1), "-m", str(tiny_ckpt)), "UTF-8")
    assert_user_error(mixtral("perplexity", str(tmp_path / "missing.txt"), "-m", str(tiny_ckpt)), "does not exist")


def test_perplexity_equals_direct_computation(tiny_ckpt, hf_tiny, tmp_path):
    from mixtral_cli.checkpoints.tokenizer import Tokenizer

    text = "Mixtral is a sparse mixture of experts. " * 12
    f = tmp_path / "t.txt"
    f.write_text(text)
    proc = mixtral("perplexity", str(f), "-m", str(tiny_ckpt), "--ctx", "32", "--json", "--dtype", "float32",
                   "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    ids = Tokenizer.from_file(tiny_ckpt / "tokenizer.model").encode(text, bos=True)
    nll, n, windows = 0.0, 0, 0
    for start in range(0, len(ids), 32):
        w = torch.tensor([ids[start:start + 32]])
        windows += 1
        if w.shape[1] < 2:
            continue
        with torch.no_grad():
            logits = hf_tiny(w).logits[0]
        nll += float(torch.nn.functional.cross_entropy(logits[:-1], w[0, 1:], reduction="sum"))
        n += w.shape[1] - 1
    assert len(ids) % 32 != 0  # a shorter last window is scored too
    assert got["windows"] == windows and got["tokens_scored"] == n
    assert math.isclose(got["perplexity"], math.exp(nll / n), rel_tol=1e-4)


# -- bad input: one line, exit 2 ---------------------------------------------------------------
def test_missing_model_directory():
    assert_user_error(mixtral("run", "hi", "-m", "/nonexistent/model"))


def test_not_a_mixtral_config(tmp_path, tiny_ckpt):
    d = tmp_path / "llama"
    shutil.copytree(tiny_ckpt, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(model_type="llama", architectures=["LlamaForCausalLM"])
    (d / "config.json").write_text(json.dumps(cfg))
    assert_user_error(mixtral("run", "hi", "-m", str(d)), "llama", "not Mixtral")


@pytest.mark.parametrize("damage", ["missing_shard", "truncated", "garbage_header", "wrong_shape", "missing_tensor"])
def test_damaged_checkpoint(tmp_path, damage):
    d = write_checkpoint(tmp_path / "m", shards=3)
    shard = d / "model-00002-of-00003.safetensors"
    if damage == "missing_shard":
        shard.unlink()
        needle = shard.name
    elif damage == "truncated":
        data = shard.read_bytes()
        shard.write_bytes(data[: len(data) // 2])
        needle = shard.name
    elif damage == "garbage_header":
        shard.write_bytes(b"\x00" * 64)
        needle = shard.name
    else:
        cfg = json.loads((d / "config.json").read_text())
        if damage == "wrong_shape":
            cfg["intermediate_size"] = 96
        else:
            cfg["num_hidden_layers"] = 4
        (d / "config.json").write_text(json.dumps(cfg))
        needle = "intermediate" if damage == "wrong_shape" else "model.layers.3"
        needle = "shape" if damage == "wrong_shape" else needle
    assert_user_error(mixtral("run", "hi", "-m", str(d), "--device", "cpu"), needle)


def test_pickle_only_directory_is_refused(tmp_path, tiny_ckpt):
    d = tmp_path / "pickles"
    d.mkdir()
    shutil.copy(tiny_ckpt / "config.json", d)
    (d / "pytorch_model.bin").write_bytes(b"not loaded")
    assert_user_error(mixtral("run", "hi", "-m", str(d)), "safetensors")


# every refused value of every shared option, with the line that says so
REFUSED = [
    (["-n", "0"], "max-tokens must be at least 1, got 0"),
    (["--max-tokens", "-3"], "max-tokens must be at least 1, got -3"),
    (["--temp", "-1"], "temperature must be >= 0, got -1.0"),
    (["--temperature", "nan"], "temperature must be a finite number, got nan"),
    (["--temp", "inf"], "temperature must be a finite number, got inf"),
    (["--top-p", "0"], "top-p must be in (0, 1], got 0.0"),
    (["--top-p", "1.5"], "top-p must be in (0, 1], got 1.5"),
    (["--top-k", "-1"], "top-k must be >= 0, got -1"),
    (["--min-p", "1"], "min-p must be in [0, 1), got 1.0"),
    (["--min-p", "-0.1"], "min-p must be in [0, 1), got -0.1"),
    (["--repeat-penalty", "0"], "repeat-penalty must be > 0, got 0.0"),
    (["-s", str(2**64)], f"seed must be a 64-bit integer, got {2**64}"),
    (["-c", "1"], "-c/--ctx-size must be at least 2, got 1"),
    (["--device", "gpu"], "unknown device 'gpu' (use auto, cpu or cuda)"),
    (["--dtype", "int3"], "unknown dtype 'int3' (use auto, float32, bfloat16 or float16)"),
    (["--gpu-mem", "24"], "the size '24' has no unit"),
    (["--gpu-mem", "0GiB"], "--gpu-mem must be more than 0 bytes, got 0"),
    (["--experts-in-gpu", "0"], "--experts-in-gpu must be at least 1, got 0"),
    (["--cpu-experts", "sometimes"], "unknown --cpu-experts 'sometimes' (use auto, never or always)"),
    (["-t", "0"], "-t/--threads must be at least 1, got 0"),
]


@pytest.mark.parametrize("args, line", REFUSED, ids=[" ".join(a) for a, _ in REFUSED])
def test_run_refuses_each_bad_shared_option_before_looking_for_the_model(args, line):
    # a model that does not exist: the option is refused first, before anything is resolved or loaded
    assert_user_error(mixtral("run", "hi", "-m", "/nonexistent/model", *args), line)


@pytest.mark.parametrize("args, needle", [
    (["--experts-in-gpu", "1"], "--experts-in-gpu must be between 2 and 8, got 1"),
    (["--experts-in-gpu", "9"], "--experts-in-gpu must be between 2 and 8, got 9"),
    (["-c", "1000000"], "context size 1000000 exceeds the model's"),
])
def test_run_refuses_options_beyond_the_model(tiny_ckpt, args, needle):
    assert_user_error(mixtral("run", "hi", "-m", str(tiny_ckpt), "--device", "cpu", *args), needle)


@pytest.mark.parametrize("args, line", [
    (["chat", "-n", "0"], "max-tokens must be at least 1, got 0"),
    (["chat", "--top-k", "-1"], "top-k must be >= 0, got -1"),
    (["chat", "-t", "0"], "-t/--threads must be at least 1, got 0"),
    (["serve", "-n", "0"], "max-tokens must be at least 1, got 0"),
    (["serve", "--temp", "-1"], "temperature must be >= 0, got -1.0"),
    (["serve", "--dtype", "int3"], "unknown dtype 'int3'"),
    (["perplexity", "missing.txt", "--experts-in-gpu", "0"], "--experts-in-gpu must be at least 1, got 0"),
    (["perplexity", "missing.txt", "-c", "1"], "-c/--ctx-size must be at least 2, got 1"),
    (["bench", "--cpu-experts", "sometimes"], "unknown --cpu-experts 'sometimes'"),
    (["bench", "--gpu-mem", "0GiB"], "--gpu-mem must be more than 0 bytes, got 0"),
])
def test_chat_serve_perplexity_and_bench_refuse_on_the_same_path(args, line):
    assert_user_error(mixtral(*args, "-m", "/nonexistent/model"), line)


def test_run_and_chat_refuse_n_0_alike():
    run, chat = mixtral("run", "hi", "-n", "0"), mixtral("chat", "-n", "0")
    assert run.returncode == chat.returncode == 2
    assert run.stderr == chat.stderr == "error: max-tokens must be at least 1, got 0\n"


def test_serve_refuses_its_own_bad_options():
    assert_user_error(mixtral("serve", "--max-queue", "-1", "-m", "/nonexistent"), "--max-queue must be at least 0, got -1")
    assert_user_error(mixtral("serve", "--send-timeout", "0", "-m", "/nonexistent"), "--send-timeout must be positive")


def help_defaults(command: str) -> dict[str, str]:
    """`mixtral COMMAND --help` as {first flag of each option: the [default: ...] it shows, or ''}."""
    entries: list[str] = []
    for line in mixtral(command, "--help").stdout.splitlines():
        if line.startswith("  -"):
            entries.append(line)
        elif entries and line.startswith("   "):
            entries[-1] += " " + line.strip()
    found = {}
    for entry in entries:
        default = re.search(r"\[default: ([^\]]*)\]", " ".join(entry.split()))
        found[entry.split()[0].rstrip(",")] = default.group(1) if default else ""
    return found


# the defaults README's option table documents (and DESIGN.md's llama.cpp-like sampler)
DOCUMENTED_DEFAULTS = {"-n": "512", "--temperature": "0.8", "--top-p": "0.95", "--top-k": "40", "--min-p": "0.05",
                       "--repeat-penalty": "1.0", "-s": "random", "-c": "min(model max, 4096)", "--stop": "none",
                       "--device": "auto", "--dtype": "auto", "--cpu-experts": "auto", "-t": "one per core"}


@pytest.mark.parametrize("command", ["run", "chat", "serve"])
def test_help_shows_the_documented_defaults(command):
    shown = help_defaults(command)
    expected = DOCUMENTED_DEFAULTS | ({"-n": ""} if command == "serve" else {})  # serve: the rest of the context
    assert {flag: shown.get(flag) for flag in expected} == expected
    assert shown["--no-prefetch"] == "" and shown["--gpu-mem"] == "the GPU's free memory"
    if command == "serve":
        assert "(default: the rest of the context;" in mixtral("serve", "--help").stdout


def test_readme_documents_the_defaults_the_help_shows():
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    spelled = {"-n": "-n, --max-tokens", "--temperature": "--temperature, --temp", "--top-p": "--top-p",
               "--top-k": "--top-k", "--min-p": "--min-p", "--repeat-penalty": "--repeat-penalty",
               "--device": "--device", "--dtype": "--dtype", "--cpu-experts": "--cpu-experts"}
    for flag, names in spelled.items():
        assert f"| `{names}` | {DOCUMENTED_DEFAULTS[flag]} |" in readme, flag


@pytest.mark.parametrize("args, needles", [
    (["rnu", "hi"], ["unknown command 'rnu'", "did you mean 'run'?"]),
    (["run", "--tmep", "0", "hi"], ["unknown option --tmep for 'mixtral run'", "did you mean --temp?"]),
    (["run", "hi", "there"], ["unexpected argument there for 'mixtral run'", "mixtral run --help"]),
    (["chat", "acme/some-model"], ["unexpected argument acme/some-model", "-m acme/some-model"]),
    (["info", "-m", "acme/some-model"], ["takes the model as an argument"]),
    (["quantize", "acme/some-model"], ["missing option '--bits'"]),
    (["run", "-n", "many", "hi"], ["'--max-tokens'", "integer"]),
])
def test_usage_errors_are_one_line_in_our_format(args, needles):
    proc = mixtral(*args)
    assert_user_error(proc, *needles)
    assert "--debug" not in proc.stderr  # a usage error is not a crash


def test_bare_mixtral_prints_help():
    proc = mixtral()
    assert proc.returncode == 0 and proc.stderr == ""
    assert proc.stdout.startswith("Usage: mixtral [OPTIONS] COMMAND") and "quantize" in proc.stdout


def test_help_text_shows_defaults_and_no_type_noise():
    run_help = mixtral("run", "--help").stdout
    assert "<bool>" not in run_help and "--model MODEL" in run_help and "--gpu-mem SIZE" in run_help
    for default in ("[default: 512]", "[default: 0.8]", "[default: $MIXTRAL_MODEL, else mistralai/Mixtral-8x7B-Instruct-v0.1]",
                    "[default: random]", "[default: min(model max, 4096)]", "[default: one per core]"):
        assert default in " ".join(run_help.split()), default
    # one spelling for the context length everywhere; the contract's spellings all work
    for command in ("run", "chat", "perplexity", "info"):
        assert "-c, --ctx-size, --ctx N" in mixtral(command, "--help").stdout, command
    assert "free memory; 24GiB without a GPU" in " ".join(mixtral("info", "--help").stdout.split())
    assert mixtral("info", str(REAL_CONFIG), "-c", "2048", "--json").returncode == 0


def test_help_does_not_load_torch_and_threads_are_configured_first(tmp_path):
    probe = (
        "import sys, runpy\n"
        "import mixtral_cli.system.threads_env as t\n"
        "calls = []\n"
        "real = t.configure_cpu_threads_env\n"
        "t.configure_cpu_threads_env = lambda *a: (calls.append('torch' in sys.modules), real(*a))\n"
        "sys.argv = ['mixtral'] + sys.argv[1:]\n"
        "try:\n"
        "    runpy.run_module('mixtral_cli', run_name='__main__')\n"
        "finally:\n"
        "    print('torch loaded:', 'torch' in sys.modules, 'hook calls:', calls, file=sys.stderr)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for args in (["--help"], ["run", "--help"], ["rnu"]):
        proc = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, env=env, timeout=120)
        assert "torch loaded: False hook calls: []" in proc.stderr, (args, proc.stderr)
    proc = subprocess.run([sys.executable, "-c", probe, "info", str(REAL_CONFIG), "--json"], capture_output=True,
                          text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "torch loaded: True hook calls: [False]" in proc.stderr  # called once, before torch loaded


def test_gpu_mem_needs_a_unit():
    assert_user_error(mixtral("info", str(REAL_CONFIG), "--gpu-mem", "lots"), "cannot read the size 'lots'")
    assert_user_error(mixtral("info", str(REAL_CONFIG), "--gpu-mem", "24"), "the size '24' has no unit", "24GiB")
    assert mixtral("info", str(REAL_CONFIG), "--bits", "4", "--gpu-mem", "24GiB").returncode == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_info_without_a_gpu_says_what_it_plans_for():
    proc = mixtral("info", str(REAL_CONFIG), "--json")
    assert proc.returncode == 0
    assert "no CUDA GPU here: the plan is for a 24 GiB GPU" in proc.stderr
    assert json.loads(proc.stdout)["plan"]["budget"] == 24 * 2**30


def test_info_hint_for_a_missing_repo_offers_no_yes(tmp_path):
    env = {"HF_HUB_CACHE": str(tmp_path / "hub")}
    proc = mixtral("info", "acme/not-here", env=env)
    assert_user_error(proc, "mixtral download acme/not-here")
    assert "--yes" not in proc.stderr
    assert "--yes" in mixtral("run", "hi", "-m", "acme/not-here", env=env).stderr


@pytest.mark.parametrize("field, value", [("num_hidden_layers", -1), ("hidden_size", 0), ("rope_theta", 0),
                                          ("num_key_value_heads", "8"), ("eos_token_id", 99999)])
def test_config_fields_out_of_range_are_named(tmp_path, tiny_ckpt, field, value):
    d = tmp_path / "m"
    shutil.copytree(tiny_ckpt, d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(cfg | {field: value}))
    assert_user_error(mixtral("run", "hi", "-m", str(d), "--device", "cpu"), "config.json", field)


def test_debug_shows_traceback():
    proc = mixtral("--debug", "run", "hi", "-m", "/nonexistent/model")
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_version_and_help():
    assert mixtral("--version").stdout.startswith("mixtral-cli ")
    helptext = mixtral("run", "--help").stdout
    for flag in ("--max-tokens", "--temperature", "--top-p", "--top-k", "--min-p", "--seed", "--ctx-size",
                 "--stop", "--device", "--dtype", "--raw", "--json"):
        assert flag in helptext


# -- download, then run by repo id from the cache ----------------------------------------------
def test_download_then_run_by_repo_id(tmp_path, tiny_ckpt):
    from hub_server import FakeHub

    files = {p.name: p.read_bytes() for p in tiny_ckpt.iterdir() if p.is_file()}
    files["consolidated.00.pt"] = b"pickle that must never be fetched"
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(tmp_path / "hf" / "hub"), "HF_HUB_OFFLINE": "0"}
    with FakeHub() as server:
        sha = server.add_repo("acme/tiny-mixtral", files)
        env["HF_ENDPOINT"] = server.url
        proc = mixtral("pull", "acme/tiny-mixtral", env=env)
        assert proc.returncode == 0, proc.stderr
        assert not server.requests_for("consolidated.00.pt")
    snapshot = Path(proc.stdout.strip())
    assert snapshot.name == sha and (snapshot / "tokenizer.model").is_file()
    env["HF_HUB_OFFLINE"] = "1"
    run = mixtral("run", "hi", "-m", "acme/tiny-mixtral", "--temp", "0", "-n", "4", "--device", "cpu", env=env)
    assert run.returncode == 0, run.stderr
    missing = mixtral("run", "hi", "-m", "acme/other-model", env=env)
    assert_user_error(missing, "mixtral download acme/other-model")


def test_ctrl_c_mid_generation_is_one_line(tiny_ckpt, tmp_path):
    import signal
    import time

    from tiny import long_context_copy

    # greedy, in a 16k context with no EOS among its first 3000 tokens: the generation cannot end
    # by itself between the first streamed text and the signal
    ckpt = long_context_copy(tiny_ckpt, tmp_path / "long")
    proc = subprocess.Popen([sys.executable, "-m", "mixtral_cli", "run", "Tell me a long story", "-m", str(ckpt),
                             "-n", "100000", "-c", "16384", "--temp", "0", "--device", "cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        os.set_blocking(proc.stdout.fileno(), False)
        deadline = time.time() + 120
        while time.time() < deadline and not (proc.stdout.read(1) or ""):
            time.sleep(0.05)  # wait until text streams
        assert proc.poll() is None, "the generation ended before it was interrupted"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130
    assert "Traceback" not in err and err.strip() == "error: interrupted"
    assert out.endswith("\n")


# -- constrained output: --json-schema, --json-object, --grammar -------------------------------
PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "ok"],
          "properties": {"name": {"type": "string", "minLength": 1, "maxLength": 8},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "ok": {"type": "boolean"}}}


def run_json(tiny_ckpt: Path, *args: str) -> dict:
    proc = mixtral("run", "Describe a person.", "-m", str(tiny_ckpt), "--device", "cpu", "--json", *args)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.mark.parametrize("where", ["inline", "file"])
def test_run_json_schema_output_is_valid_under_the_schema(tiny_ckpt, tmp_path, where):
    import jsonschema

    value = json.dumps(PERSON)
    if where == "file":
        (tmp_path / "person.json").write_text(value)
        value = str(tmp_path / "person.json")
    seed = {"inline": "3", "file": "11"}[where]
    out = run_json(tiny_ckpt, "--json-schema", value, "--temp", "0.8", "--seed", seed, "-n", "200")
    assert out["finish_reason"] == "stop", out["text"]
    jsonschema.validate(json.loads(out["text"]), PERSON)
    # the tiny random model writes no JSON of itself: the grammar is what made this valid
    free = run_json(tiny_ckpt, "--temp", "0.8", "--seed", seed, "-n", "40")
    with pytest.raises(ValueError):
        json.loads(free["text"])


def test_run_json_object_and_a_cut_document(tiny_ckpt):
    out = run_json(tiny_ckpt, "--json-object", "--temp", "0", "-n", "200")
    assert out["finish_reason"] == "stop" and isinstance(json.loads(out["text"]), dict)
    long = {"type": "object", "required": ["essay"], "additionalProperties": False,
            "properties": {"essay": {"type": "string", "minLength": 200}}}
    cut = run_json(tiny_ckpt, "--json-schema", json.dumps(long), "--temp", "0.8", "-s", "1", "-n", "6")
    assert cut["finish_reason"] == "length" and cut["completion_tokens"] == 6
    assert cut["text"].startswith('{"essay": ') and not cut["text"].endswith('"}')
    proc = mixtral("run", "hi", "-m", str(tiny_ckpt), "--device", "cpu", "--json-schema", json.dumps(long), "-n", "6")
    assert proc.returncode == 0 and "the output was cut after 6 tokens" in proc.stderr


def test_run_grammar_files_gbnf_raw_and_lark_chat(tiny_ckpt, tmp_path):
    gbnf = tmp_path / "answer.gbnf"
    gbnf.write_text('# yes or no, then two digits\nroot ::= ("yes" | "no") " " digit digit\ndigit ::= [0-9]\n')
    for seed in ("1", "2"):
        proc = mixtral("run", "The answer is", "-m", str(tiny_ckpt), "--device", "cpu", "--raw", "--grammar", str(gbnf),
                       "--temp", "0.8", "-s", seed, "-n", "50", "--json")
        assert proc.returncode == 0, proc.stderr
        out = json.loads(proc.stdout)
        assert re.fullmatch(r"(yes|no) [0-9]{2}", out["text"]), out["text"]
        assert out["finish_reason"] == "stop"
    lark = tmp_path / "word.lark"
    lark.write_text('start: WORD ("," WORD){2}\nWORD: /[a-c]{2,4}/\n')
    proc = mixtral("run", "List three words.", "-m", str(tiny_ckpt), "--device", "cpu", "--grammar", str(lark),
                   "--temp", "0.8", "-s", "4", "-n", "50")
    assert proc.returncode == 0, proc.stderr
    assert re.fullmatch(r"[a-c]{2,4}(,[a-c]{2,4}){2}\n", proc.stdout), proc.stdout


def test_run_refuses_bad_schemas_and_grammars_before_the_model(tmp_path):
    import time

    (tmp_path / "broken.json").write_text('{"type": "object",')
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "bad.gbnf").write_text('root ::= "a" missing\n')
    (tmp_path / "bad.lark").write_text("start: (\n")
    (tmp_path / "empty.gbnf").write_text("  \n")
    cases = [
        (["--json-schema", '{"type": "object",'], "--json-schema: not valid JSON"),
        (["--json-schema", '{"type": "foo"}'], "--json-schema: Invalid type: foo"),
        (["--json-schema", str(tmp_path / "broken.json")], f"--json-schema {tmp_path / 'broken.json'}: not valid JSON"),
        (["--json-schema", str(tmp_path / "list.json")], "a JSON Schema must be an object, got list"),
        (["--json-schema", str(tmp_path / "missing.json")], "--json-schema: no such file"),
        (["--json-schema", str(tmp_path)], "is a directory"),
        (["--grammar", str(tmp_path / "missing.gbnf")], "--grammar: no such file"),
        (["--grammar", str(tmp_path / "bad.gbnf")], "not a valid GBNF grammar: Rule 'missing' not found"),
        (["--grammar", str(tmp_path / "bad.lark")], f"--grammar {tmp_path / 'bad.lark'}: "),
        (["--grammar", str(tmp_path / "empty.gbnf")], "the file is empty"),
        (["--json-schema", "{}", "--grammar", str(tmp_path / "bad.gbnf")], "--json-schema and --grammar cannot be combined"),
        (["--json-object", "--json-schema", "{}"], "--json-schema and --json-object cannot be combined"),
    ]
    for args, needle in cases:
        t0 = time.monotonic()
        # a model that does not exist: refused before the model is looked up, let alone loaded
        proc = mixtral("run", "hi", "-m", "/nonexistent/model", *args)
        assert_user_error(proc, needle)
        assert time.monotonic() - t0 < 60
