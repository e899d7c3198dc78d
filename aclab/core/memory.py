"""Giving freed heap memory back to the operating system.

A learning step on a CPU allocates and frees activations of a few hundred KB each. glibc serves them from
its heap once its dynamic mmap threshold has risen above their size, and keeps freed pages there, resident
with no live object behind them (``docs/performance.md``, Memory). ``malloc_trim(0)`` returns every whole
free page of the heap to the system (``madvise(MADV_DONTNEED)``). Callers do it every so many steps
(:class:`aclab.algos.offpolicy.OffPolicyConfig`, ``trim_heap_every``), not every step.

:func:`heap_in_use` reads the bytes the program has allocated and not freed (independent of what the heap
keeps resident): a count that grows update after update is a leak, not fragmentation.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


class _MallInfo2(ctypes.Structure):
    _fields_ = [(field, ctypes.c_size_t) for field in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                       "fsmblks", "uordblks", "fordblks", "keepcost")]


@functools.cache
def _libc():
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name)
    except OSError:
        return None


@functools.cache
def _mallinfo2():
    """glibc's ``mallinfo2`` (2.33+), or None."""
    mallinfo2 = getattr(_libc(), "mallinfo2", None)
    if mallinfo2 is not None:
        mallinfo2.restype = _MallInfo2
    return mallinfo2


def heap_in_use() -> int | None:
    """Bytes allocated through malloc and not yet freed, in the main heap, other arenas and malloc's own
    mappings (``mallinfo2``: ``uordblks + hblkhd``); None without glibc 2.33+."""
    mallinfo2 = _mallinfo2()
    if mallinfo2 is None:
        return None
    info = mallinfo2()
    return info.uordblks + info.hblkhd


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim``, or None where the C library has none (musl, macOS, Windows)."""
    return getattr(_libc(), "malloc_trim", None)


def trim_heap() -> bool:
    """``malloc_trim(0)``: release the heap's free pages to the OS. Returns whether it could be called."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
