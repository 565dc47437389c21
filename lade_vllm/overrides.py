"""Every override of vLLM internals made by lade-vllm, in one place.

Targets vLLM 0.32.x (checked by lade_vllm.check_vllm_version before anything here runs).
Each entry names the vLLM function it replaces or wraps and why.

| # | vLLM 0.32 target | kind | why |
|---|------------------|------|-----|
(no overrides yet)
"""
from __future__ import annotations

_APPLIED = False


def apply() -> None:
    """Install all overrides (idempotent; runs in every vLLM process via register())."""
    global _APPLIED
    if _APPLIED:
        return
    _APPLIED = True
