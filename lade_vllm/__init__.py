"""lade-vllm: Lookahead Decoding as a vLLM plugin.

vLLM calls :func:`register` through the ``vllm.general_plugins`` entry point in every process it
starts (front-end, engine core, workers), so users never import this package themselves.
"""
from __future__ import annotations

from lade_vllm.adapter.gate import (SUPPORTED_VLLM, UnsupportedPlatform,  # noqa: F401
                                    UnsupportedVLLMVersion, check_vllm_version)

__version__ = "0.1.0"

#: True once register() has run in this process (the entry-point discovery test checks it).
REGISTERED = False


def register() -> None:
    """Entry point of the ``vllm.general_plugins`` group: the version gate (raises with what to
    install), the platform check (on an unsupported platform only the records that refuse a lade
    config are applied; on CUDA lade runs only with ``LADE_VLLM_CUDA=1``, with a warning; see
    lade_vllm.adapter.gate), then every patch record, the platform's tree backend included
    (lade_vllm.adapter.patches.apply_all, lade_vllm.adapter.runtime.patches_for)."""
    global REGISTERED
    if REGISTERED:
        return
    from lade_vllm.adapter import frontend, gate, patches, runtime
    check_vllm_version()
    kind = gate.current_platform_kind()
    gate.PLATFORM_PROBLEM = gate.current_platform_problem()
    if kind == "cuda":
        gate.logger.warning(gate.CUDA_WARNING)
    patches.apply_all(frontend.PATCHES + runtime.patches_for(kind),
                      platform_ok=gate.PLATFORM_PROBLEM is None,
                      allow_foreign=gate.allow_untested())
    REGISTERED = True
