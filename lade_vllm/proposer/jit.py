"""Numba-compiled CPU kernels of the proposer, compiled on first use.

numba ships with vLLM. It is imported only when a kernel first runs: importing it when these
modules load would put llvmlite in ``sys.modules`` before an in-process vLLM worker scans every
module for Triton kernels to rebind (``vllm.triton_utils.dispatcher``), which llvmlite's wrappers
break. Without numba the kernels run as plain Python (same results, slow).

``Kernel(build)``: ``build(njit)`` returns the compiled entry point, where ``njit(f)`` compiles a
Python function (``nogil``; the identity without numba). Kernels calling each other compile them
inside ``build``.
"""
from __future__ import annotations


def _njit():
    try:
        from numba import njit
    except ImportError:  # pragma: no cover - numba ships with vLLM
        return lambda f: f
    return lambda f: njit(nogil=True)(f)


class Kernel:
    """A numba kernel compiled by ``build(njit)`` on its first call."""

    def __init__(self, build):
        self.build = build
        self.fn = None

    def __call__(self, *args):
        if self.fn is None:
            self.fn = self.build(_njit())
        return self.fn(*args)
