"""aclab.core.memory: freed heap pages go back to the OS (trim_heap, and the off-policy loop calling it every
``params.trim_heap_every`` updates), and heap_in_use counts the bytes malloc has handed out."""

import ctypes
import ctypes.util
import platform
import subprocess
import sys

import pytest
from offpolicy_common import build_algo, offpolicy_config

from aclab.core import memory

FRAGMENT = """
import torch
from aclab.core import memory

def rss():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) / 1024 for line in status if line.startswith("VmRSS"))

big = torch.ones(2 ** 20)  # freeing a 4 MB mmapped block raises glibc's dynamic mmap threshold above 256 KB
del big
keep, freed = [], []
for _ in range(400):
    freed.append(torch.ones(64 * 1024))  # 256 KB, now from the heap
    keep.append(torch.ones(16))  # live blocks between them: the heap cannot shrink from its top
del freed
before = rss()
called = memory.trim_heap()
print(called, before, rss())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc and /proc only")
def test_trim_heap_gives_freed_activation_sized_blocks_back():
    """400 freed 256 KB tensors between live small ones stay resident until the heap is trimmed (in a fresh
    process, so that the heap's layout is the pattern's own)."""
    out = subprocess.run([sys.executable, "-c", FRAGMENT], check=True, capture_output=True, text=True).stdout.split()
    called, before, after = out[0] == "True", float(out[1]), float(out[2])
    assert called
    assert before - after > 50, f"the freed 100 MB stayed resident ({before:.0f} -> {after:.0f} MB)"


@pytest.mark.parametrize("name", ["td3", "sac"])
@pytest.mark.parametrize("every", [0, 7])
def test_offpolicy_loop_trims_the_heap_every_n_updates(monkeypatch, name, every):
    import aclab.algos.offpolicy as offpolicy

    calls = []
    monkeypatch.setattr(offpolicy, "trim_heap", lambda: calls.append(algo.loop.updates) or True)
    algo, envs = build_algo(offpolicy_config(name, "params.learning_starts=10", "params.steps_per_iteration=25",
                                             f"params.trim_heap_every={every}", total=200))
    updates = sum(int(algo.iterate(envs)["updates"]) for _ in range(3))
    envs.close()
    assert updates >= 50
    assert len(calls) == (updates // every if every else 0)


def test_trim_heap_every_is_validated():
    from aclab.config import ConfigError

    with pytest.raises(ConfigError, match="params.trim_heap_every"):
        offpolicy_config("td3", "params.trim_heap_every=-1")


def test_trim_heap_calls_malloc_trim_with_zero_padding_and_says_when_it_cannot(monkeypatch):
    calls = []
    monkeypatch.setattr(memory, "_malloc_trim", lambda: calls.append)
    assert memory.trim_heap() is True and calls == [0]  # pad 0: keep no slack at the heap's top
    monkeypatch.setattr(memory, "_malloc_trim", lambda: None)  # no glibc (musl, macOS)
    assert memory.trim_heap() is False and calls == [0]


def _glibc_at_least(major: int, minor: int) -> bool:
    name, version = platform.libc_ver()
    return name == "glibc" and tuple(int(x) for x in version.split(".")[:2]) >= (major, minor)


HAS_MALLINFO2 = _glibc_at_least(2, 33)  # decided from the platform, not from heap_in_use itself


@pytest.mark.skipif(not HAS_MALLINFO2, reason="needs glibc's mallinfo2 (Linux, glibc >= 2.33)")
def test_heap_in_use_counts_live_malloc_blocks_in_the_heap_and_in_mappings():
    """A 64 KB block (served from the heap) and a 64 MB one (its own mapping, above any mmap threshold)
    each raise the count by their size while live, and lower it again when freed."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    for size in (64 << 10, 64 << 20):
        before = memory.heap_in_use()
        block = libc.malloc(size)
        during = memory.heap_in_use()
        libc.free(block)
        after = memory.heap_in_use()
        assert size <= during - before <= size + 4096, size
        assert abs(after - before) <= 4096, size


def test_heap_in_use_is_none_without_mallinfo2(monkeypatch):
    monkeypatch.setattr(memory, "_mallinfo2", lambda: None)  # musl, macOS, glibc < 2.33
    assert memory.heap_in_use() is None
