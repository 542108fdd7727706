"""The CPU thread environment of torch (OpenMP, MKL, oneDNN), set before torch first loads.

The OpenMP runtime reads its environment variables (``OMP_NUM_THREADS``, ``OMP_WAIT_POLICY``, ...)
once, when torch is imported: anything set later is ignored. Every command that needs torch calls
:func:`configure_cpu_threads_env` first, before any module that imports torch (``cli.py`` keeps
those imports inside the commands), so this is the one place that decides that environment.
"""

from __future__ import annotations

import os

# Passive waiting: an OpenMP thread that reaches the end of a parallel region sleeps instead of
# spinning. A spinning thread holds its core while the thread it waits for is descheduled, so on a
# busy machine every parallel region becomes a wait for the scheduler; a sleeping one hands its core
# over. The cost on a quiet machine is one wake-up per region (docs/benchmarks.md 3.4).
DEFAULTS = {"OMP_WAIT_POLICY": "PASSIVE"}


def configure_cpu_threads_env(threads: int | None = None) -> None:
    """Set the thread environment for a process that is about to import torch.

    ``threads`` is the command's ``-t/--threads`` (``None``: not given). Given, it becomes
    ``OMP_NUM_THREADS`` even over the user's value, since the flag is the more specific request: torch's
    OpenMP and MKL pools, and the native kernels (which take torch's count when they load), then start
    at that size. The defaults leave variables the user set alone. It must not import torch.
    """
    for name, value in DEFAULTS.items():
        os.environ.setdefault(name, value)
    if threads is not None:
        os.environ["OMP_NUM_THREADS"] = str(threads)
