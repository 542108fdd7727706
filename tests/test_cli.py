"""The `mixtral` command as a user runs it: real processes, exit codes, stdout/stderr contracts."""

from __future__ import annotations

import json
import math
import os
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


def test_info_refuses_budget_below_top_k_slots():
    proc = mixtral("info", str(REAL_CONFIG), "--bits", "4", "--gpu-mem", "4GiB")
    assert_user_error(proc, "minimum")


# -- run ---------------------------------------------------------------------------------------
def test_run_raw_json_greedy_matches_reference(tiny_ckpt, hf_tiny):
    proc = mixtral("run", "The capital of France", "-m", str(tiny_ckpt), "--raw", "--json", "--temp", "0",
                   "-n", "24", "--dtype", "float32", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    for key in ("text", "prompt_token_ids", "token_ids", "finish_reason", "prompt_tokens", "completion_tokens",
                "prefill_tokens_per_s", "decode_tokens_per_s", "expert_cache", "peak_device_memory_bytes"):
        assert key in out
    assert set(out["expert_cache"]) == {"slots_per_layer", "hits", "misses", "prefetch_hits", "bytes_to_device"}
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
    assert a["token_ids"] == b["token_ids"]


def test_prompt_longer_than_context_is_refused(tiny_ckpt):
    proc = mixtral("run", "word " * 100, "-m", str(tiny_ckpt), "-c", "32", "--device", "cpu")
    assert_user_error(proc, "context")


# -- perplexity --------------------------------------------------------------------------------
def test_perplexity_equals_direct_computation(tiny_ckpt, hf_tiny, tmp_path):
    from mixtral_cli.tokenizer import Tokenizer

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


def test_bad_options_are_user_errors(tiny_ckpt):
    assert_user_error(mixtral("run", "hi", "-m", str(tiny_ckpt), "--top-p", "0"), "top-p")
    assert_user_error(mixtral("run", "hi", "-m", str(tiny_ckpt), "--dtype", "int3"), "dtype")
    assert_user_error(mixtral("run", "hi", "-m", str(tiny_ckpt), "-t", "0"), "threads")
    assert_user_error(mixtral("info", str(REAL_CONFIG), "--gpu-mem", "lots"), "size")


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


def test_ctrl_c_mid_generation_is_one_line(tiny_ckpt):
    import signal
    import time

    proc = subprocess.Popen([sys.executable, "-m", "mixtral_cli", "run", "Tell me a long story", "-m", str(tiny_ckpt),
                             "-n", "100000", "-c", "1024", "--temp", "1", "--device", "cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    os.set_blocking(proc.stdout.fileno(), False)
    deadline = time.time() + 120
    while time.time() < deadline and not (proc.stdout.read(1) or ""):
        time.sleep(0.05)  # wait until text streams
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "Traceback" not in err and err.strip() == "error: interrupted"
    assert out.endswith("\n")
