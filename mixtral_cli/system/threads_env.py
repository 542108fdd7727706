"""The CPU thread environment of torch (OpenMP, MKL, oneDNN), set before torch first loads.

The OpenMP runtime reads its environment variables (``OMP_NUM_THREADS``, ``OMP_WAIT_POLICY``, ...)
once, when torch is imported: anything set later is ignored. Every command that needs torch calls
:func:`configure_cpu_threads_env` first, before any module that imports torch (``cli.py`` keeps
those imports inside the commands), so this is the one place that decides that environment.
"""

from __future__ import annotations

import os

# Passive waiting: an OpenMP thread that reaches the end of a parallel region sleeps instead of
# spinning. On a busy machine a spinning thread holds its core while the thread it waits for is
# descheduled, which turns every parallel region into a wait for the scheduler (a 10x collapse of
# decode with one competing process on 2 cores); a sleeping one hands its core over. The cost on a
# quiet machine is one futex wake per region, and decode's heavy products run in the project's own
# kernels (kernels.native), whose pool hands out work in small chunks and spins only briefly.
# Measured in docs/benchmarks.md ("Decode with a competing process").
DEFAULTS = {"OMP_WAIT_POLICY": "PASSIVE"}


def configure_cpu_threads_env(threads: int | None = None) -> None:
    """Set the thread environment for a process that is about to import torch.

    ``threads`` is the command's ``-t/--threads`` (``None``: not given); the count itself is applied
    through ``torch.set_num_threads`` when the engine is built (``runtime.apply_threads``).
    Variables the user set are left alone. It must not import torch.
    """
    for name, value in DEFAULTS.items():
        os.environ.setdefault(name, value)
