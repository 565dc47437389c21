"""The worker hands freed heap back to the system every so often (glibc ``malloc_trim``).

vLLM 0.32's CPU linear layers cache one oneDNN primitive per distinct token count of a step, 32
per layer, least recently used evicted (``ops.create_onednn_mm(weight, 32)``). Plain decoding sees
few token counts; a speculative method (vLLM's ngram too) sees many, so primitives are built and
evicted all the time, and glibc keeps the memory of the evicted ones in its arenas: the worker's
resident memory creeps up round after round of traffic though nothing live grows
(``benchmarks/onednn_cache_rss.py``: +2.0 GiB after token counts 1..1024 on one layer, +379 MiB
after ``malloc_trim(0)``). The lade adapter calls :meth:`HeapTrim.tick` once per step; at most
every ``LADE_HEAP_TRIM_SECONDS`` seconds (default 10; 0 turns it off) it trims the heap, which
takes a few milliseconds. Where glibc is not the C library nothing happens.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import time

logger = logging.getLogger("vllm.lade_vllm")


def _malloc_trim():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


class HeapTrim:
    """Calls glibc's malloc_trim(0) at most every ``seconds`` (0 or no glibc: never)."""

    def __init__(self, seconds: float | None = None, clock=time.monotonic):
        if seconds is None:
            seconds = float(os.environ.get("LADE_HEAP_TRIM_SECONDS", "10"))
        self.seconds = seconds
        self.clock = clock
        self.trim = _malloc_trim() if seconds > 0 else None
        self.last = clock()
        self.count = 0             # trims so far
        self.spent = 0.0           # seconds spent trimming

    def tick(self) -> None:
        if self.trim is None:
            return
        now = self.clock()
        if now - self.last < self.seconds:
            return
        self.trim(0)
        self.last = self.clock()
        self.count += 1
        self.spent += self.last - now
