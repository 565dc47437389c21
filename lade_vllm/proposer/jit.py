"""Numba-compiled CPU kernels of the proposer, compiled on first use and cached on disk.

numba ships with vLLM. It is imported only when a kernel first runs: importing it when these
modules load would put llvmlite in ``sys.modules`` before an in-process vLLM worker scans every
module for Triton kernels to rebind (``vllm.triton_utils.dispatcher``), which llvmlite's wrappers
break. Without numba the kernels run as plain Python (same results, slow).

A kernel is a few plain functions of one module calling each other by their global names.
``Kernel(globals(), "helper", ..., "entry")`` replaces those globals by their compiled versions
on its first call (numba resolves a called global when it compiles its caller) and then calls
the last one. The machine code is cached next to the module (numba's ``cache=True``: a user-wide
directory where that is not writable, ``NUMBA_CACHE_DIR`` to choose one), so a process loads it
in well under a second instead of compiling it for seconds.
"""
from __future__ import annotations

import os


def enabled() -> bool:
    """Whether CPU work uses the compiled kernels (``LADE_JIT=0``: the torch code)."""
    return os.environ.get("LADE_JIT") != "0"


class Kernel:
    """The compiled function ``names[-1]`` of module ``namespace`` (its globals), compiled with
    the helpers it calls, ``names[:-1]``, on the first call."""

    def __init__(self, namespace: dict, *names: str):
        self.namespace = namespace
        self.names = names
        self.fn = None

    def __call__(self, *args):
        if self.fn is None:
            self.fn = _compile(self.namespace, self.names)
        return self.fn(*args)


def _compile(namespace: dict, names) -> object:
    try:
        from numba import njit
    except ImportError:  # pragma: no cover - numba ships with vLLM
        return namespace[names[-1]]
    for name in names:
        fn = namespace[name]
        if not hasattr(fn, "py_func"):   # not compiled by an earlier kernel of the module
            namespace[name] = njit(nogil=True, cache=True)(fn)
    return namespace[names[-1]]
