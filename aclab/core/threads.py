"""Intra-op thread settings, one function for every entry point (``aclab train / eval / analyze /
report``, sweep children, the Python API's :func:`aclab.train.train`).

``set_threads(requested, obs_shape=..., device=...)``: ``requested > 0`` is used as given (the
``--threads`` option, ``torch_threads`` in a run's config); ``0`` / ``None`` picks
:func:`default_threads`:

* **one thread** for vector observations (MLP networks: PPO family, TD3, SAC, meta-RL), for the
  analyses and for anything on a GPU (the host only feeds the device);
* **all cores** for image observations on CPU (convolutional torsos: Procgen, Atari), or
  ``OMP_NUM_THREADS`` when it is set.

Measured on the 2-core machine (``benchmarks/cpu_layout_threads.py``, two runs; docs/performance.md,
"Threads"), "loaded" = one competing busy process, with aclab's passive OpenMP waiting (:mod:`aclab`):

| workload | quiet, 2 threads vs 1 | loaded, 2 threads vs 1 |
| --- | --- | --- |
| IMPALA torso fwd+bwd, 2048 frames | 1.54-1.56x faster | 1.41-1.44x slower |
| TD3 HalfCheetah, 256-256, batch 256 | 1.85-2.0x slower | 1.13-1.37x slower |

So more cores pay only for convolutions, and only on a machine the run has to itself (on a shared one,
``--threads 1``); 256-wide MLPs are slower on two threads either way (and with torch's spinning default,
TD3 at two threads fell to 4.8 steps/s on a busy machine against 171 with one). ``--threads N`` overrides.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

_PROCESS_DEFAULT = torch.get_num_threads()


def available_cores() -> int:
    """Cores this process may run on (its affinity mask), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def default_threads(obs_shape: Sequence[int] | None = None, device: str | torch.device = "cpu") -> int:
    """One thread, except for image observations (``len(obs_shape) == 3``) on CPU: all cores, or
    ``OMP_NUM_THREADS`` when that is set (``aclab sweep`` sets it to cores / parallel runs)."""
    device_type = torch.device(device).type
    if device_type == "cpu" and obs_shape is not None and len(obs_shape) == 3:
        budget = os.environ.get("OMP_NUM_THREADS", "")
        return int(budget) if budget.isdigit() and int(budget) > 0 else available_cores()
    return 1


def set_threads(requested: int | None = None, *, obs_shape: Sequence[int] | None = None,
                device: str | torch.device = "cpu") -> int:
    """Set torch's intra-op threads: ``requested`` when > 0, else :func:`default_threads`; returns it."""
    threads = int(requested) if requested else default_threads(obs_shape, device)
    if threads < 1:
        raise ValueError(f"threads must be >= 1 or 0/None for the default, got {requested!r}")
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads


def restore_process_default() -> None:
    """torch's thread count from before any aclab call (for tests and long-lived host processes)."""
    torch.set_num_threads(_PROCESS_DEFAULT)
