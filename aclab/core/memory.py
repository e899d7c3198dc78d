"""Giving freed heap memory back to the operating system.

A learning step on a CPU allocates and frees activations of a few hundred KB each. glibc serves them from
its heap once its dynamic mmap threshold has risen above their size, and keeps freed pages there, resident
with no live object behind them (``docs/performance.md``, Memory). ``malloc_trim(0)`` returns every whole
free page of the heap to the system (``madvise(MADV_DONTNEED)``). Callers do it every so many steps
(:class:`aclab.algos.offpolicy.OffPolicyConfig`, ``trim_heap_every``), not every step.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim``, or None where the C library has none (musl, macOS, Windows)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None


def trim_heap() -> bool:
    """``malloc_trim(0)``: release the heap's free pages to the OS. Returns whether it could be called."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
