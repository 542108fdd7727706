"""The thread environment set before torch loads, seen through the real `mixtral` command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REAL_CONFIG = Path(__file__).parent / "data" / "mixtral-8x7b-instruct-v0.1.config.json"
WATCHED = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")

# Runs `mixtral ARGS...` as `python -m mixtral_cli` does and writes to OUT what the thread settings
# were: the watched variables at the moment torch is first imported (what its OpenMP runtime reads),
# then torch's thread count and the size of the native kernels' pool.
PROBE = f"""
import json, os, runpy, sys

out, sys.argv = sys.argv[1], ["mixtral", *sys.argv[2:]]
at_import = {{}}


class WatchTorchImport:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and not at_import:
            at_import.update({{k: os.environ.get(k) for k in {WATCHED!r}}})
        return None


sys.meta_path.insert(0, WatchTorchImport())
try:
    runpy.run_module("mixtral_cli", run_name="__main__")
    code = 0
except SystemExit as e:
    code = e.code
import torch
from mixtral_cli.kernels import native

# mx_set_threads(0) starts no worker and returns the pool's size, the calling thread included
pool = native._lib().mx_set_threads(0) if native.available() else None
with open(out, "w") as f:
    json.dump({{"exit": code, "at_import": at_import, "torch": torch.get_num_threads(), "native": pool}}, f)
"""


def run_cli(tmp_path: Path, env: dict[str, str], *args: str) -> tuple[dict, str]:
    """What PROBE records for `mixtral ARGS...`, and the command's stdout."""
    out = tmp_path / "probe.json"
    base = {k: v for k, v in os.environ.items() if k not in WATCHED}
    proc = subprocess.run([sys.executable, "-c", PROBE, str(out), *args], capture_output=True, text=True,
                          env={**base, "HF_HUB_OFFLINE": "1", **env}, timeout=300)
    assert proc.returncode == 0 and out.is_file(), proc.stderr
    seen = json.loads(out.read_text())
    assert seen["exit"] == 0, proc.stderr
    return seen, proc.stdout


@pytest.mark.parametrize("threads", [1, 2])  # one of them differs from torch's default on any machine
def test_threads_flag_sizes_the_pools_before_torch_loads(tmp_path, threads):
    """`-t N` wins over the user's OMP_NUM_THREADS, and is in the environment when torch loads."""
    seen, stdout = run_cli(tmp_path, {"OMP_NUM_THREADS": "3"}, "bench", "--preset", "tiny", "-t", str(threads),
                           "--prompt-tokens", "8", "--gen-tokens", "2", "--json")
    assert seen["at_import"] == {"OMP_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "PASSIVE"}
    assert seen["torch"] == threads and json.loads(stdout)["threads"] == threads
    if seen["native"] is not None:
        assert seen["native"] == threads


def test_without_the_flag_the_users_variables_are_kept(tmp_path):
    seen, _ = run_cli(tmp_path, {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "ACTIVE"}, "info", str(REAL_CONFIG), "--json")
    assert seen["at_import"] == {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "ACTIVE"}
    assert seen["torch"] == 1
