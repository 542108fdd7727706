"""Shared pytest fixtures."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

V1_TOKENIZER_SHA256 = "dadfd56d766715c61d2ef780a525ab43b8e6da4de6865bda3d95fdef5e134055"
V3_TOKENIZER_SHA256 = "9addc8bdce5988448ae81b729336f43a81262160ae8da760674badab9d4c7d33"


def _mistral_common_file(name: str, sha256: str) -> Path:
    from importlib.resources import files

    path = Path(str(files("mistral_common") / "data" / name))
    assert path.is_file(), f"mistral-common does not ship {path}"
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert digest == sha256, f"unexpected sha256 {digest} of {name}"
    return path


@pytest.fixture(scope="session")
def v1_tokenizer_path() -> Path:
    """The real Mistral v1 ``tokenizer.model`` shipped inside the mistral-common package."""
    return _mistral_common_file("tokenizer.model.v1", V1_TOKENIZER_SHA256)


@pytest.fixture(scope="session")
def v3_tokenizer_path() -> Path:
    """The real Mistral v3 ``tokenizer.model`` (Mixtral-8x22B's) shipped inside mistral-common."""
    return _mistral_common_file("mistral_instruct_tokenizer_240323.model.v3", V3_TOKENIZER_SHA256)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    """A tiny random Mixtral in the Hub layout: 3 shards + index, real v1 tokenizer."""
    from tiny import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-mixtral")


@pytest.fixture(scope="session")
def tiny_v3_ckpt(tmp_path_factory, v3_tokenizer_path) -> Path:
    """The tiny Mixtral at Mixtral-8x22B's vocabulary of 32768, with the real v3 tokenizer."""
    from tiny import TINY_CONFIG, write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-mixtral-v3", TINY_CONFIG | {"vocab_size": 32768},
                            tokenizer=v3_tokenizer_path)


@pytest.fixture(scope="session")
def hf_tiny(tiny_ckpt):
    """The numerical oracle: transformers' MixtralForCausalLM on the same weights, in fp32."""
    import torch
    from transformers import MixtralForCausalLM

    return MixtralForCausalLM.from_pretrained(tiny_ckpt, dtype=torch.float32).eval()


_SHARED_FP32: dict = {}  # the engine_fp32 engine and a copy of the state tests may change


@pytest.fixture(scope="session")
def engine_fp32(tiny_ckpt):
    """One fp32 engine on the tiny checkpoint (256-token context) for the whole session; what a test
    changes in it (cache size, lm_head) is put back after that test, pass or fail."""
    from mixtral_cli.engine.loader import RuntimeOptions, load_engine

    engine = load_engine(tiny_ckpt, RuntimeOptions(device="cpu", dtype="float32", ctx_size=256))
    _SHARED_FP32.update(engine=engine, lm_head=engine.model.lm_head.weight.detach().clone())
    return engine


@pytest.fixture(autouse=True)
def _isolate_engine_fp32(request):
    yield
    if "engine_fp32" not in request.fixturenames or "engine" not in _SHARED_FP32:
        return
    import torch

    model = _SHARED_FP32["engine"].model
    if not torch.equal(model.lm_head.weight, _SHARED_FP32["lm_head"]):
        with torch.no_grad():
            model.lm_head.weight.copy_(_SHARED_FP32["lm_head"])
    model.setup_cache(256)


_EXERCISED: set[str] = set()


@pytest.fixture
def exercised() -> set[str]:
    """Tests add the names of the fast paths (and instruction sets) they actually ran."""
    return _EXERCISED


def pytest_terminal_summary(terminalreporter):
    if _EXERCISED:
        terminalreporter.write_line(f"kernel paths exercised on this machine: {', '.join(sorted(_EXERCISED))}")
