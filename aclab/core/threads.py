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

``flush_denormals(enabled)``: the CPU's flush-to-zero / denormals-are-zero mode (``torch.set_flush_denormal``),
set from a run's ``flush_denormal`` (default on) wherever the threads are set. Values below float32's
smallest normal number (1.2e-38) become 0 instead of being computed on the CPU's slow denormal path. In a
TD3 or SAC run they come from Adam: a weight whose gradient stays exactly 0 (a dead ReLU unit) has its first
moment multiplied by 0.9 at every step, and it falls into the denormal range within a few hundred steps. In
SAC on HalfCheetah shapes Adam then took 1.54 ms of a 9.1 ms update, against 0.22 ms with the mode on
(``benchmarks/offpolicy_anatomy.py``; docs/performance.md, "Denormal numbers"). The mode belongs to a
thread: it holds for the calling thread and for the threads started after the call. ``aclab.train.train``
sets it before it builds the envs and networks, so torch's intra-op threads, started at the first parallel
operation, inherit it; IMPALA / STAC actor processes set it themselves when they start. In a long-lived
process whose intra-op threads already exist, those keep their mode (it matters only with more than one
thread).
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


def flush_denormals(enabled: bool) -> bool:
    """Turn the CPU's flush-to-zero / denormals-are-zero mode on or off for this thread (and the intra-op
    threads started after this call); returns False where the CPU has no such mode (nothing changes)."""
    return bool(torch.set_flush_denormal(bool(enabled)))


_DENORMAL_BITS = 1 << 19  # the float32 whose bits are 0x00080000: 2**-130, a denormal


def denormals_flushed() -> bool:
    """Whether this thread computes with denormal numbers flushed to zero: then the product of the float32
    denormal ``2**-130`` and 1 is 0. The number is built from its bits and the result read as bits (a
    conversion through float64 would itself be flushed); a one-element product runs on the calling thread."""
    tiny = torch.tensor([_DENORMAL_BITS], dtype=torch.int32).view(torch.float32)
    return int((tiny * 1.0).view(torch.int32).item()) == 0


def restore_process_default() -> None:
    """torch's thread count from before any aclab call (for tests and long-lived host processes)."""
    torch.set_num_threads(_PROCESS_DEFAULT)
