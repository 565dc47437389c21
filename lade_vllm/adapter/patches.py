"""The patch registry: every change lade-vllm makes to vLLM's code is one :class:`Patch` record.

A record names its target by dotted path (``vllm.v1.worker.gpu_model_runner.GPUModelRunner.
_prepare_inputs``), carries the replacement, the vLLM release line it was written against and one
line saying why. :func:`apply_all` installs the tables of ``lade_vllm.adapter.frontend`` and ``.runtime`` (handed
over by ``lade_vllm.register()``) and is, with :func:`ensure`, the only caller of
:meth:`PatchRegistry.apply` in the package.

Two kinds of record:

* ``wrap``: ``replace(original) -> replacement`` for a function or method; the registry reads the
  attribute without descriptors (``inspect.getattr_static``), keeps ``staticmethod`` /
  ``classmethod`` wrappers, marks the replacement with the record's target and remembers the
  original for :meth:`PatchRegistry.revert_all`.
* ``register``: a registration through a vLLM API (e.g. ``register_backend``). ``replace()`` installs
  it, ``read()`` returns the value the target holds now (None when vLLM's default is in place),
  ``value`` is the value lade installs, ``undo()`` removes it.

Checks made before anything is changed:

* applying a record whose replacement is already in place raises :class:`AlreadyPatched`;
* a ``wrap`` target whose current code (or a wrapper of it other than torch's or the standard
  library's decorators) does not live in the target's top-level package (someone else replaced it), or a ``register`` target holding a value that is neither vLLM's default nor
  lade's, raises :class:`PatchConflict` (a warning instead when ``allow_foreign`` is set).

Each applied record logs one DEBUG line (``lade: patched <target> (vLLM <version>): <why>``).

This module imports no vLLM code itself; targets are imported when a record is applied.
"""
from __future__ import annotations

import importlib
import inspect
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable

logger = logging.getLogger("vllm.lade_vllm")  # under vllm: its handler and level

#: attribute set on every wrap replacement: the target path of the record that installed it
MARK = "__lade_patch__"


class PatchError(RuntimeError):
    """A patch record cannot be applied."""


class AlreadyPatched(PatchError):
    """The record's replacement is already installed at its target."""


class PatchConflict(PatchError):
    """The target was already replaced by code outside vLLM."""


@dataclass(frozen=True)
class Patch:
    """One touch of vLLM (see the module docstring for the two kinds)."""
    target: str
    replace: Callable
    why: str
    vllm_version: str = "0.32"
    kind: str = "wrap"                       # "wrap" | "register"
    read: Callable[[], Any] | None = None    # register: the value at the target now
    value: Any = None                        # register: the value lade installs
    undo: Callable[[], None] | None = None   # register: remove lade's value
    any_platform: bool = False               # applied also where lade cannot run (see gate)


def resolve(target: str) -> tuple[Any, str]:
    """(owner object, attribute name) of a dotted path: the longest importable module prefix,
    then attribute lookups."""
    parts = target.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:-1]:
            obj = getattr(obj, name)
        return obj, parts[-1]
    raise PatchError(f"cannot import any module of patch target {target!r}")


def _function_of(raw: Any) -> Any:
    return raw.__func__ if isinstance(raw, (staticmethod, classmethod)) else raw


#: packages whose decorators may wrap a pristine target (vLLM decorates with torch's
#: ``inference_mode`` and the standard library's ``functools`` / ``contextlib``)
DECORATOR_PACKAGES = ("torch",)


def _folder(package: str) -> str | None:
    try:
        mod = importlib.import_module(package)
    except ImportError:
        return None
    path = getattr(mod, "__file__", None)
    return os.path.dirname(os.path.abspath(path)) + os.sep if path else None


def _code_file(func: Any) -> str | None:
    code = getattr(func, "__code__", None)
    return os.path.abspath(code.co_filename) if code is not None else None


def foreign_layer(func: Any, package: str) -> str | None:
    """Where the code wrapping ``func`` comes from when it is neither ``package``'s nor a known
    decorator's (torch, the standard library): the ``__wrapped__`` chain is followed down to the
    innermost function, which must live in ``package``. None when ``func`` is pristine."""
    own = _folder(package)
    trusted = [f for f in (_folder(p) for p in DECORATOR_PACKAGES) if f]
    trusted.append(os.path.dirname(os.path.abspath(os.__file__)) + os.sep)   # the stdlib
    layer = func
    for _ in range(32):
        where = _code_file(layer)
        inner = getattr(layer, "__wrapped__", None)
        if where is None:
            module = getattr(layer, "__module__", "") or ""
            if inner is None and not (module == package or module.startswith(package + ".")):
                return module or repr(layer)
        elif inner is None:
            return None if own and where.startswith(own) else where
        elif not ((own and where.startswith(own)) or any(where.startswith(t) for t in trusted)):
            return where
        if inner is None:
            return None
        layer = inner
    return repr(func)


class PatchRegistry:
    """Applies records once each and remembers how to undo them."""

    def __init__(self, log: logging.Logger | None = None, allow_foreign: bool = False):
        self.log = log or logger
        self.allow_foreign = allow_foreign
        self.applied: list[Patch] = []
        self._undo: list[Callable[[], None]] = []

    def is_applied(self, patch: Patch) -> bool:
        if patch.kind == "register":
            return patch.read() == patch.value
        owner, name = resolve(patch.target)
        func = _function_of(inspect.getattr_static(owner, name, None))
        return getattr(func, MARK, None) == patch.target

    def apply(self, patch: Patch) -> None:
        if patch.kind == "wrap":
            self._apply_wrap(patch)
        elif patch.kind == "register":
            self._apply_register(patch)
        else:
            raise PatchError(f"{patch.target}: unknown patch kind {patch.kind!r}")
        self.applied.append(patch)
        self.log.debug("lade: patched %s (vLLM %s): %s", patch.target, patch.vllm_version,
                       patch.why)

    def _conflict(self, message: str) -> None:
        if not self.allow_foreign:
            raise PatchConflict(message)
        self.log.warning("lade: %s; patching on top of it", message)

    def _apply_wrap(self, patch: Patch) -> None:
        owner, name = resolve(patch.target)
        try:
            raw = inspect.getattr_static(owner, name)
        except AttributeError:
            raise PatchError(f"patch target {patch.target} does not exist in this vLLM "
                             f"(the record targets vLLM {patch.vllm_version})") from None
        original = _function_of(raw)
        if getattr(original, MARK, None) == patch.target:
            raise AlreadyPatched(f"{patch.target} is already patched by lade-vllm")
        package = patch.target.split(".", 1)[0]
        where = foreign_layer(original, package)
        if where is not None:
            self._conflict(f"{patch.target} was already replaced outside {package} ({where})")
        replacement = patch.replace(original)
        setattr(replacement, MARK, patch.target)
        installed = type(raw)(replacement) if isinstance(raw, (staticmethod, classmethod)) \
            else replacement
        # a class attribute inherited from a base is deleted again on undo, not copied back
        had_own = not isinstance(owner, type) or name in owner.__dict__
        setattr(owner, name, installed)
        self._undo.append(lambda: setattr(owner, name, raw) if had_own else delattr(owner, name))

    def _apply_register(self, patch: Patch) -> None:
        current = patch.read()
        if current == patch.value:
            raise AlreadyPatched(f"{patch.target} already holds lade-vllm's {patch.value}")
        if current is not None:
            self._conflict(f"{patch.target} was already registered to {current}")
        patch.replace()
        if patch.undo is not None:
            self._undo.append(patch.undo)

    def revert_all(self) -> None:
        """Undo every applied record, last first (tests)."""
        while self._undo:
            self._undo.pop()()
        self.applied.clear()


# ---- the table ----------------------------------------------------------------------------------

#: every record lade-vllm applies (the table apply_all() was given)
LADE_PATCHES: list[Patch] = []

_REGISTRY: PatchRegistry | None = None


def apply_all(records: list[Patch] = (), platform_ok: bool = True,
              allow_foreign: bool = False) -> PatchRegistry:
    """Apply ``records`` (kept as :data:`LADE_PATCHES`) once per process (later calls return the
    same registry). lade_vllm.register() passes the adapter's tables (``frontend.PATCHES +
    runtime.patches_for(kind)``, kind: the platform's, lade_vllm.adapter.gate).

    ``platform_ok`` False: only the records marked ``any_platform`` (lade cannot run here, see
    lade_vllm.adapter.gate; vLLM's runner stays untouched)."""
    global _REGISTRY
    if _REGISTRY is not None:
        return _REGISTRY
    if not LADE_PATCHES:
        LADE_PATCHES.extend(records)
    targets = [p.target for p in LADE_PATCHES]
    dup = {t for t in targets if targets.count(t) > 1}
    if dup:
        raise PatchError(f"several records target {sorted(dup)}")
    registry = PatchRegistry(allow_foreign=allow_foreign)
    for patch in LADE_PATCHES:
        if platform_ok or patch.any_platform:
            registry.apply(patch)
    _REGISTRY = registry
    return registry


def ensure(patch: Patch) -> None:
    """Apply ``patch`` unless its replacement is in place already (for callers that may run
    before or after :func:`apply_all`, e.g. tests of the CPU tree backend)."""
    reg = _REGISTRY or PatchRegistry()
    if not reg.is_applied(patch):
        reg.apply(patch)


def registry() -> PatchRegistry | None:
    """The process's registry once :func:`apply_all` has run, else None."""
    return _REGISTRY
