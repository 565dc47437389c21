"""lade_vllm.adapter.heap.HeapTrim: glibc's malloc_trim(0) at most every so many seconds."""
from __future__ import annotations

import sys

import pytest

from lade_vllm.adapter.heap import HeapTrim


def test_trims_at_most_once_per_interval():
    now = [100.0]
    heap = HeapTrim(seconds=10.0, clock=lambda: now[0])
    calls = []
    heap.trim = lambda pad: calls.append(pad) or 1
    for t in (100.0, 105.0, 109.9):
        now[0] = t
        heap.tick()
    assert calls == []
    now[0] = 110.5
    heap.tick()
    heap.tick()
    assert calls == [0] and heap.count == 1
    now[0] = 121.0
    heap.tick()
    assert heap.count == 2


def test_zero_seconds_turns_it_off(monkeypatch):
    monkeypatch.setenv("LADE_HEAP_TRIM_SECONDS", "0")
    heap = HeapTrim(clock=lambda: 1e9)
    assert heap.trim is None
    heap.tick()
    assert heap.count == 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc")
def test_returns_freed_heap_to_the_system():
    """Blocks freed between live ones stay in glibc's arenas (resident) until a trim."""
    import psutil
    proc = psutil.Process()
    heap = HeapTrim(seconds=1e-9)
    assert heap.trim is not None
    blocks = [bytearray(64 * 1024 - 64) for _ in range(4000)]   # ~256 MiB, below mmap's threshold
    keep = blocks[::50]                                          # pins the heap around the holes
    del blocks
    before = proc.memory_info().rss
    heap.tick()
    after = proc.memory_info().rss
    assert heap.count == 1 and len(keep) == 80
    assert before - after > 128 * 2**20, (before / 2**20, after / 2**20)   # measured: 261 -> 19
