"""`mixtral quantize`: the written layout, exactness, atomicity, refusals, and loading the result."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny import TINY_CONFIG, write_checkpoint

import mixtral_cli.checkpoints.quantize as qmod
from mixtral_cli.checkpoints.layout import (
    GROUP_MODULES,
    INDEX_NAME,
    Quantization,
    expert_prefix,
    group_of,
    linear_shapes,
    shared_shapes,
)
from mixtral_cli.checkpoints.quantize import default_output_dir, quantize_checkpoint
from mixtral_cli.checkpoints.reader import Checkpoint
from mixtral_cli.engine.loader import RuntimeOptions, load_engine
from mixtral_cli.errors import UserError
from mixtral_cli.kernels.formats import FORMAT_VERSION, QuantizedTensor, quantize, spec_for_bits

# tiny experts are [128, 64] / [64, 128]: int8's default block (128) does not divide 64, so without
# --group-size the quantizer takes int8 in groups of 64 (the largest default that fits)
GROUP = {4: None, 8: 64}


def expected_quant(bits: int) -> Quantization:
    """What `quantize --bits B` writes for the tiny model with the default group bits: attention and
    the output layer at 8, every group size the largest default that divides 64."""
    return Quantization(experts=spec_for_bits(bits, GROUP[bits]), attention=spec_for_bits(8, 64),
                        output=spec_for_bits(8, 64))
TEXT = "The quick brown fox jumps over the lazy dog. " * 6


def mixtral(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "mixtral_cli", *args], capture_output=True, text=True,
                          env=env, timeout=300)


def assert_user_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error:")
    for needle in needles:
        assert needle in lines[0], lines[0]


def leftovers(parent: Path) -> list[str]:
    """Hidden temporary / moved-aside directories the writer may have left."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(".") and (".tmp-" in p.name or ".old-" in p.name))


@pytest.fixture(scope="module")
def quantized(tmp_path_factory, tiny_ckpt) -> dict[int | str, Path]:
    """The tiny checkpoint quantized in-process to 4 and 8 bits with the default group bits, and
    "all4" with attention and output at 4 too (small shards: several files)."""
    root = tmp_path_factory.mktemp("quantized")
    out: dict[int | str, Path] = {
        bits: quantize_checkpoint(tiny_ckpt, root / f"q{bits}", bits, GROUP[bits], shard_bytes=1_500_000)
        for bits in (4, 8)}
    out["all4"] = quantize_checkpoint(tiny_ckpt, root / "q-all4", 4, GROUP[4], shard_bytes=1_500_000,
                                      attn_bits=4, output_bits=4)
    return out


def prompt(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 32000, (n,), generator=torch.Generator().manual_seed(seed))


# -- the CLI end to end ---------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [4, 8])
def test_cli_quantize_then_run_and_perplexity_without_source(tmp_path, tiny_ckpt, bits):
    src = tmp_path / "tiny-mixtral"
    shutil.copytree(tiny_ckpt, src)
    args = ["quantize", str(src), "--bits", str(bits), "--shard-size", "3MB"]
    if GROUP[bits]:
        args += ["--group-size", str(GROUP[bits])]
    proc = mixtral(*args)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / f"tiny-mixtral-q{bits}"
    assert proc.stdout == f"{out}\n"  # the path alone on stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-mixtral", f"tiny-mixtral-q{bits}"]
    cfg = json.loads((out / "config.json").read_text())
    spec = spec_for_bits(bits, GROUP[bits])
    groups = cfg["quantization"]["groups"]
    assert groups["experts"]["format"] == spec.name and groups["experts"]["bits"] == bits
    assert groups["experts"]["group_size"] == spec.group_size
    assert groups["attention"]["bits"] == 8 and groups["output"]["bits"] == 8
    assert cfg["quantization"]["format_version"] == FORMAT_VERSION == 2
    assert Checkpoint(out).quant == expected_quant(bits)
    assert len(list(out.glob("model-*.safetensors"))) > 1

    shutil.rmtree(src)  # the quantized checkpoint must stand alone
    run = mixtral("run", "--raw", "--json", "--temp", "0", "-n", "6", "-m", str(out), "Hello there")
    assert run.returncode == 0, run.stderr
    data = json.loads(run.stdout)
    assert data["completion_tokens"] == 6 and data["prompt_token_ids"][0] == 1

    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    ppl = mixtral("perplexity", str(text), "-m", str(out), "--ctx", "16", "--json")
    assert ppl.returncode == 0, ppl.stderr
    res = json.loads(ppl.stdout)
    assert res["windows"] > 1 and res["perplexity"] > 1 and res["perplexity"] == res["perplexity"]


def test_cli_refuses_existing_output_unless_force(tmp_path, tiny_ckpt):
    out = tmp_path / "q"
    assert mixtral("quantize", str(tiny_ckpt), "--bits", "4", "--out", str(out)).returncode == 0
    before = (out / "config.json").read_text()
    assert_user_error(mixtral("quantize", str(tiny_ckpt), "--bits", "8", "--group-size", "64", "--out", str(out)),
                      "already exists", "--force")
    assert (out / "config.json").read_text() == before
    proc = mixtral("quantize", str(tiny_ckpt), "--bits", "8", "--group-size", "64", "--out", str(out), "--force")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "config.json").read_text())["quantization"]["groups"]["experts"]["bits"] == 8
    Checkpoint(out)  # complete and valid
    assert leftovers(tmp_path) == []


def test_force_never_deletes_a_directory_that_is_not_a_quantized_checkpoint(tmp_path, tiny_ckpt):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    assert_user_error(mixtral("quantize", str(tiny_ckpt), "--bits", "4", "--out", str(precious), "--force"),
                      "refusing")
    assert (precious / "notes.txt").read_text() == "keep me"


def test_cli_refuses_quantized_source(quantized):
    assert_user_error(mixtral("quantize", str(quantized[4]), "--bits", "8", "--out", str(quantized[4]) + "-again"),
                      "already quantized")
    assert not Path(str(quantized[4]) + "-again").exists()


def test_cli_bad_bits(tmp_path, tiny_ckpt):
    assert_user_error(mixtral("quantize", str(tiny_ckpt), "--out", str(tmp_path / "q"), "--bits", "5"), "bits")
    assert list(tmp_path.iterdir()) == []
    proc = mixtral("quantize", str(tiny_ckpt), "--out", str(tmp_path / "q"), "--bits", "3")
    assert_user_error(proc, "--bits 3:")
    assert "group-size" not in proc.stderr  # not given, so not quoted back as "--group-size None"


def test_cli_refuses_a_broken_source_before_writing_anything(tmp_path, tiny_ckpt):
    src = tmp_path / "src"
    shutil.copytree(tiny_ckpt, src)
    out = tmp_path / "out" / "q"
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps(cfg | {"num_hidden_layers": -1}))
    assert_user_error(mixtral("quantize", str(src), "--bits", "4", "--out", str(out)),
                      "num_hidden_layers must be at least 1, got -1")
    (src / "config.json").write_text(json.dumps(cfg))
    (src / "tokenizer.model").write_bytes(os.urandom(4096))
    assert_user_error(mixtral("quantize", str(src), "--bits", "4", "--out", str(out)), "tokenizer", "SentencePiece")
    assert not out.parent.exists()


@pytest.mark.parametrize("bits, group, needle", [
    (3, None, "bits"),
    (4, 48, "group size"),
    (8, 3, "group size"),
    (8, 128, "does not divide"),  # an explicit group size is never changed: 128 does not divide 64
])
def test_bad_bits_or_group_size(tmp_path, tiny_ckpt, bits, group, needle):
    with pytest.raises(UserError, match=needle):
        quantize_checkpoint(tiny_ckpt, tmp_path / "q", bits, group)
    assert list(tmp_path.iterdir()) == []


# -- what is written --------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [4, 8, "all4"])
def test_round_trip_is_bit_exact(quantized, tiny_ckpt, bits):
    """Every linear weight of every group (experts, attention, output) holds exactly the reference
    quantizer's parts for its group's format."""
    src, out = Checkpoint(tiny_ckpt), Checkpoint(quantized[bits])
    nf4 = spec_for_bits(4, GROUP[4])
    assert out.quant == (Quantization(experts=nf4, attention=nf4, output=nf4) if bits == "all4" else expected_quant(bits))
    groups = set()
    for prefix in linear_shapes(src.args):
        spec = out.quant.spec_for(prefix)
        groups.add(group_of(prefix))
        want = quantize(src.weight(prefix), spec, reference=True)
        got = out.weight(prefix)
        assert isinstance(got, QuantizedTensor) and got.shape == want.shape and got.spec == spec
        assert got.parts.keys() == want.parts.keys()
        for k in want.parts:
            assert got.parts[k].dtype == want.parts[k].dtype, (prefix, k)
            assert torch.equal(got.parts[k], want.parts[k]), (prefix, k)
    assert groups == set(GROUP_MODULES)


@pytest.mark.parametrize("bits", [4, 8])
def test_tensors_outside_the_groups_are_byte_identical(quantized, tiny_ckpt, bits):
    src, out = Checkpoint(tiny_ckpt), Checkpoint(quantized[bits])
    kept = [n for n in shared_shapes(src.args) if group_of(n.removesuffix(".weight")) is None]
    assert len(kept) > 8 and "model.embed_tokens.weight" in kept  # norms, routers, the embedding table
    for name in kept:
        a, b = src.tensor(name), out.tensor(name)
        assert a.dtype == b.dtype == torch.bfloat16 and a.shape == b.shape
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), name
    # every linear weight of a group is stored as its parts only, and nothing else is written
    parts = {f"{prefix}.{part}" for prefix, shape in linear_shapes(src.args).items()
             for part in QuantizedTensor.expected_parts(out.quant.spec_for(prefix), shape)}
    assert set(out.tensors) == set(kept) | parts


def test_groups_at_16_bits_stay_bf16_and_experts_only_matches_version_1(tmp_path, tiny_ckpt):
    """`--attn-bits 16 --output-bits 16` copies attention and lm_head byte for byte; the same
    checkpoint described in format version 1 (experts only, no re-quantizing) loads to the same
    logits."""
    out = quantize_checkpoint(tiny_ckpt, tmp_path / "v2", 4, None, attn_bits=16, output_bits=16)
    ck = Checkpoint(out)
    assert ck.quant == Quantization(experts=spec_for_bits(4))
    src = Checkpoint(tiny_ckpt)
    for name in ("lm_head.weight", "model.layers.1.self_attn.o_proj.weight"):
        assert torch.equal(ck.tensor(name).view(torch.uint8), src.tensor(name).view(torch.uint8))
    v1 = tmp_path / "v1"
    shutil.copytree(out, v1)
    cfg = json.loads((v1 / "config.json").read_text())
    cfg["quantization"] = {"format": "nf4", "bits": 4, "group_size": 64, "format_version": 1,
                           "modules": list(GROUP_MODULES["experts"])}
    (v1 / "config.json").write_text(json.dumps(cfg))
    assert Checkpoint(v1).quant == ck.quant
    ids = prompt(24)
    opts = RuntimeOptions(device="cpu", dtype="float32", ctx_size=32)
    assert torch.equal(load_engine(v1, opts).model(ids, 0), load_engine(out, opts).model(ids, 0))


def test_quantized_attention_and_output_are_quantlinears(quantized):
    from mixtral_cli.kernels.linear import QuantLinear

    m = load_engine(quantized[4], RuntimeOptions(device="cpu", dtype="float32", ctx_size=16)).model
    attn = m.model.layers[2].self_attn
    assert all(isinstance(getattr(attn, p), QuantLinear) for p in ("q_proj", "k_proj", "v_proj", "o_proj"))
    assert isinstance(m.lm_head, QuantLinear) and m.lm_head.spec == spec_for_bits(8, 64)
    assert isinstance(m.model.embed_tokens.weight, torch.Tensor) and m.model.embed_tokens.weight.dtype == torch.float32


@pytest.mark.parametrize("bits", [4, 8])
def test_layout_index_shards_and_copied_files(quantized, tiny_ckpt, bits):
    out = quantized[bits]
    index = json.loads((out / INDEX_NAME).read_text())
    files = sorted(set(index["weight_map"].values()))
    assert files == sorted(p.name for p in out.glob("*.safetensors")) and len(files) > 1
    n = len(files)
    assert files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    total = 0
    for f in files:
        with safe_open(out / f, framework="pt") as sf:
            keys = set(sf.keys())
            assert keys == {k for k, v in index["weight_map"].items() if v == f}
            for k in keys:
                t = sf.get_tensor(k)
                total += t.numel() * t.element_size()
        header_len = int.from_bytes((out / f).read_bytes()[:8], "little")
        assert (8 + header_len) % 64 == 0  # data starts aligned
    assert index["metadata"]["total_size"] == total
    for name in ("tokenizer.model", "generation_config.json"):
        assert (out / name).read_bytes() == (tiny_ckpt / name).read_bytes()
    cfg, orig = json.loads((out / "config.json").read_text()), json.loads((tiny_ckpt / "config.json").read_text())
    q = cfg.pop("quantization")
    assert cfg == orig
    assert set(q) == {"format_version", "groups"} and set(q["groups"]) == {"experts", "attention", "output"}
    assert sorted(q["groups"]["experts"]["modules"]) == [f"model.layers.*.block_sparse_moe.experts.*.{p}"
                                                         for p in ("w1", "w2", "w3")]
    assert q["groups"]["output"]["modules"] == ["lm_head"]


def test_logits_close_to_unquantized_and_8bit_closer(quantized, engine_fp32):
    ids = prompt(48)
    engine_fp32.model.setup_cache(256)
    ref = engine_fp32.model(ids, 0)

    def rel(bits: int) -> float:
        eng = load_engine(quantized[bits], RuntimeOptions(device="cpu", dtype="float32", ctx_size=64))
        got = eng.model(ids, 0)
        return float((got - ref).norm() / ref.norm())

    e4, e8 = rel(4), rel(8)
    assert 0 < e8 < e4 / 4, (e4, e8)
    assert e4 < 0.15 and e8 < 0.02, (e4, e8)


# -- corrupted quantized checkpoints: one line, exit 2 ------------------------------------------------
def _corrupt_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _rewrite_tensor(ckpt: Path, name: str, new: torch.Tensor | None) -> None:
    weight_map = json.loads((ckpt / INDEX_NAME).read_text())["weight_map"]
    shard = ckpt / weight_map[name]
    sd = load_file(shard)
    if new is None:
        del sd[name]
    else:
        sd[name] = new
    save_file(sd, shard, metadata={"format": "pt"})


@pytest.mark.parametrize("damage, needle, cli", [
    ("missing", "missing", True),
    ("version", "version 99", True),
    ("group", "unknown quantization group 'embedding'", True),
    ("group bits", "unsupported quantization of the attention", True),
    ("shape", "shape", False),
    ("dtype", "dtype", False),
    ("modules", "modules", False),
])
def test_corrupted_quantized_checkpoint_is_one_line_error(tmp_path, quantized, damage, needle, cli):
    ckpt = _corrupt_copy(quantized[4], tmp_path / "broken")
    name = f"{expert_prefix(1, 3, 'w2')}.scales"
    if damage == "missing":
        _rewrite_tensor(ckpt, name, None)
    elif damage == "shape":
        _rewrite_tensor(ckpt, name, torch.zeros(7, dtype=torch.uint8))
    elif damage == "dtype":
        _rewrite_tensor(ckpt, f"{expert_prefix(0, 0, 'w1')}.scales_absmax", torch.zeros(1, dtype=torch.float16))
    else:
        cfg = json.loads((ckpt / "config.json").read_text())
        groups = cfg["quantization"]["groups"]
        if damage == "version":
            cfg["quantization"]["format_version"] = 99
        elif damage == "group":
            groups["embedding"] = {"bits": 8, "format": "int8", "group_size": 64}
        elif damage == "group bits":
            groups["attention"]["bits"] = 5
        else:
            groups["experts"]["modules"].append("model.layers.*.self_attn.q_proj")
        (ckpt / "config.json").write_text(json.dumps(cfg))
    if cli:  # how the user sees it
        proc = mixtral("run", "--raw", "--json", "--temp", "0", "-n", "2", "-m", str(ckpt), "hi")
        assert_user_error(proc, needle)
    else:  # a UserError is what the CLI prints as one line, exit 2 (checked above)
        with pytest.raises(UserError, match=needle):
            load_engine(ckpt, RuntimeOptions(device="cpu", dtype="float32", ctx_size=16))


# -- atomicity ---------------------------------------------------------------------------------------
class Boom(RuntimeError):
    pass


def _fail_after(monkeypatch, n: int, exc: type[BaseException]) -> list[int]:
    calls = [0]
    real = qmod.quantize_tensor

    def flaky(w, spec):
        calls[0] += 1
        if calls[0] > n:
            raise exc("simulated failure")
        return real(w, spec)

    monkeypatch.setattr(qmod, "quantize_tensor", flaky)
    return calls


@pytest.mark.parametrize("exc", [Boom, KeyboardInterrupt])
def test_failure_midway_leaves_no_output_and_no_temp(tmp_path, tiny_ckpt, monkeypatch, exc):
    calls = _fail_after(monkeypatch, 20, exc)
    out = tmp_path / "out" / "q4"
    seen: list[Path] = []
    real_write = qmod._write_files

    def spy(ckpt, tmp, *a):
        seen.append(tmp)
        assert tmp.parent == out.parent and tmp.name.startswith(".q4.tmp-")
        return real_write(ckpt, tmp, *a)

    monkeypatch.setattr(qmod, "_write_files", spy)
    with pytest.raises(exc):
        quantize_checkpoint(tiny_ckpt, out, 4, None, shard_bytes=1_000_000)
    assert calls[0] == 21 and len(seen) == 1  # it did fail midway, after writing into the temp dir
    assert not out.exists()
    assert not seen[0].exists()
    assert list(out.parent.iterdir()) == []


def test_failed_force_keeps_the_existing_output(tmp_path, tiny_ckpt, monkeypatch):
    out = quantize_checkpoint(tiny_ckpt, tmp_path / "q", 4, None)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    _fail_after(monkeypatch, 5, Boom)
    with pytest.raises(Boom):
        quantize_checkpoint(tiny_ckpt, out, 8, 64, force=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert leftovers(tmp_path) == []


def test_stale_temp_of_a_dead_process_is_removed(tmp_path, tiny_ckpt):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".q.tmp-{int(dead.stdout)}-abcd1234"
    stale.mkdir()
    (stale / "model-00001-of-00002.safetensors").write_bytes(b"half")
    quantize_checkpoint(tiny_ckpt, tmp_path / "q", 4, None)
    assert not stale.exists() and leftovers(tmp_path) == []


def test_half_written_temp_is_not_a_model(tmp_path, tiny_ckpt, monkeypatch):
    """config.json is written last: a temp dir caught mid-way cannot be loaded."""
    _fail_after(monkeypatch, 10, Boom)
    captured: list[Path] = []
    real_rmtree = shutil.rmtree

    def keep(path, *a, **k):
        captured.append(Path(path))
        real_rmtree(Path(path).parent / "copy", ignore_errors=True)
        shutil.copytree(path, Path(path).parent / "copy")
        return real_rmtree(path, *a, **k)

    monkeypatch.setattr(qmod.shutil, "rmtree", keep)
    with pytest.raises(Boom):
        quantize_checkpoint(tiny_ckpt, tmp_path / "q", 4, None)
    assert captured
    with pytest.raises(UserError, match="config.json"):
        Checkpoint(tmp_path / "copy")


# -- paths and progress ---------------------------------------------------------------------------------
def test_default_output_dirs(tmp_path):
    assert default_output_dir(tmp_path / "Mixtral", 4) == tmp_path / "Mixtral-q4"
    assert default_output_dir(tmp_path / "Mixtral", 8) == tmp_path / "Mixtral-q8"
    snap = tmp_path / "hub" / "models--mistralai--Mixtral-8x7B-Instruct-v0.1" / "snapshots" / ("a" * 40)
    assert default_output_dir(snap, 4, cwd=tmp_path / "here") == tmp_path / "here" / "Mixtral-8x7B-Instruct-v0.1-q4"


def test_output_inside_source_refused(tiny_ckpt):
    with pytest.raises(UserError, match="overlaps"):
        quantize_checkpoint(tiny_ckpt, tiny_ckpt / "q4", 4, None)
    assert not (tiny_ckpt / "q4").exists()


def test_progress_reports_every_tensor(tmp_path, tiny_ckpt):
    events: list[tuple] = []

    class Sink:
        def begin(self, tensors, total_bytes):
            events.append(("begin", tensors, total_bytes))

        def advance(self, name, nbytes):
            events.append(("advance", name, nbytes))

        def end(self):
            events.append(("end",))

    quantize_checkpoint(tiny_ckpt, tmp_path / "q", 4, None, progress=Sink())
    src = Checkpoint(tiny_ckpt)
    assert events[0] == ("begin", len(src.tensors), sum(f.stat().st_size for f in src.files) - _headers(src))
    advances = [e for e in events if e[0] == "advance"]
    assert sorted(e[1] for e in advances) == sorted(src.tensors)
    assert sum(e[2] for e in advances) == events[0][2]
    assert events[-1] == ("end",)


def _headers(ckpt: Checkpoint) -> int:
    return sum(8 + int.from_bytes(f.read_bytes()[:8], "little") for f in ckpt.files)


def test_wider_model_info_shows_format_and_size(tmp_path):
    src = write_checkpoint(tmp_path / "w", dict(TINY_CONFIG, hidden_size=128, intermediate_size=256,
                                               num_hidden_layers=2), shards=2)
    out = quantize_checkpoint(src, None, 8, None)  # default group 128 fits here
    assert out == tmp_path / "w-q8"
    proc = mixtral("info", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["expert_format"] == "int8" and data["bits"] == 8
    assert data["checkpoint_bytes"] == sum(p.stat().st_size for p in out.glob("*.safetensors"))
    text = mixtral("info", str(out))
    assert text.returncode == 0 and "int8 (8-bit, group 128)" in text.stdout


@pytest.mark.parametrize("bits", [4, 8])
def test_offloaded_quantized_experts_match_resident(quantized, bits):
    """Quantized experts packed into the host store and copied into slots (prepared forms rebuilt
    on every refill) give the same greedy tokens as the all-resident quantized model."""
    from mixtral_cli.engine.experts import ExpertCache
    from mixtral_cli.engine.generate import Completion, Session
    from mixtral_cli.engine.loader import RuntimeOptions, load_engine
    from mixtral_cli.settings import GenerationConfig, SamplingConfig

    def greedy(slots: int | None) -> tuple[list[int], object]:
        eng = load_engine(quantized[bits], RuntimeOptions(device="cpu", dtype="bfloat16", ctx_size=64,
                                                          experts_in_gpu=slots))
        cfg = GenerationConfig(max_tokens=12, sampling=SamplingConfig(temperature=0))
        return list(Completion(Session(eng.model), eng.tokenizer, [1, 415, 5565, 302, 4843], cfg).tokens()), eng

    resident, _ = greedy(None)
    offloaded, eng = greedy(2)
    assert isinstance(eng.experts, ExpertCache) and eng.experts.stats.misses > 0
    assert offloaded == resident
