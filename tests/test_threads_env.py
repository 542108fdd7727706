"""The thread environment set before torch loads."""

from __future__ import annotations

import os
import subprocess
import sys

from mixtral_cli.system.threads_env import configure_cpu_threads_env


def test_passive_openmp_wait_by_default_and_user_value_kept(monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    configure_cpu_threads_env()
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    configure_cpu_threads_env(2)
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"


def test_cli_sets_it_before_torch_loads():
    """The policy only works if it is in the environment when torch's OpenMP runtime starts."""
    code = ("import sys; from mixtral_cli import cli; assert 'torch' not in sys.modules; "
            "from mixtral_cli.system.threads_env import configure_cpu_threads_env; configure_cpu_threads_env(); "
            "import os, torch; print(os.environ['OMP_WAIT_POLICY'])")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "PASSIVE"
