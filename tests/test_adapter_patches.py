"""The patch registry (lade_vllm.adapter.patches) on a stand-in package, and the table of records.

vLLM-free except the last test, which loads the plugin in a clean process."""
from __future__ import annotations

import logging
import subprocess
import sys
import textwrap

import pytest

from lade_vllm.adapter import patches
from lade_vllm.adapter.patches import AlreadyPatched, Patch, PatchConflict, PatchRegistry

FAKE = '''
import contextlib


class Runner:
    def step(self, x):
        return x + 1

    @staticmethod
    def build(x):
        return x * 2


def helper(x):
    return x - 1


@contextlib.contextmanager
def scope():
    yield 1
'''

OTHER = '''
import functools

import ladefake


def install():
    original = ladefake.Runner.step

    @functools.wraps(original)
    def step(self, x):
        return original(self, x) * 10

    ladefake.Runner.step = step
'''


@pytest.fixture
def fake(tmp_path, monkeypatch):
    pkg = tmp_path / "ladefake"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(FAKE)
    (tmp_path / "otherplugin.py").write_text(OTHER)
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("ladefake", "otherplugin"):
        sys.modules.pop(name, None)
    import ladefake
    yield ladefake
    for name in ("ladefake", "otherplugin"):
        sys.modules.pop(name, None)


class Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append(record)


@pytest.fixture
def log():
    logger = logging.getLogger("test_adapter_patches")
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    lines = Lines()
    logger.addHandler(lines)
    yield logger, lines
    logger.removeHandler(lines)


def plus(k):
    def factory(original):
        def replacement(*args):
            return original(*args) + k
        return replacement
    return factory


def records():
    return [Patch("ladefake.Runner.step", plus(100), why="step"),
            Patch("ladefake.Runner.build", plus(1000), why="static"),
            Patch("ladefake.helper", plus(7), why="module function"),
            Patch("ladefake.scope", lambda original: (lambda *a: original(*a)),
                  why="stdlib-decorated")]


def test_applies_each_record_once_and_logs_one_line_each(fake, log):
    logger, lines = log
    reg = PatchRegistry(log=logger)
    for p in records():
        reg.apply(p)
    assert fake.Runner().step(1) == 102
    assert fake.Runner.build(2) == 1004          # still a staticmethod
    assert fake.helper(1) == 7
    debug = [r.getMessage() for r in lines.records if r.levelno == logging.DEBUG]
    assert len(debug) == 4
    assert debug[0] == "lade: patched ladefake.Runner.step (vLLM 0.32): step"
    assert all(reg.is_applied(p) for p in records())
    reg.revert_all()
    assert fake.Runner().step(1) == 2 and fake.Runner.build(2) == 4 and fake.helper(1) == 0
    assert not any(reg.is_applied(p) for p in records())


def test_double_patch_is_detected(fake, log):
    p = records()[0]
    reg = PatchRegistry(log=log[0])
    reg.apply(p)
    with pytest.raises(AlreadyPatched, match="ladefake.Runner.step"):
        reg.apply(p)
    with pytest.raises(AlreadyPatched):         # also from a second registry
        PatchRegistry(log=log[0]).apply(p)
    assert fake.Runner().step(1) == 102          # wrapped once


def test_target_replaced_by_someone_else_is_detected(fake, log):
    import otherplugin
    otherplugin.install()
    p = records()[0]
    with pytest.raises(PatchConflict, match="otherplugin.py"):
        PatchRegistry(log=log[0]).apply(p)
    assert fake.Runner().step(1) == 20           # untouched by lade
    reg = PatchRegistry(log=log[0], allow_foreign=True)
    reg.apply(p)                                  # a warning, then on top
    assert fake.Runner().step(1) == 120
    assert any(r.levelno == logging.WARNING and "otherplugin.py" in r.getMessage()
               for r in log[1].records)


def test_missing_target_names_it(fake, log):
    with pytest.raises(patches.PatchError, match="ladefake.Runner.gone"):
        PatchRegistry(log=log[0]).apply(Patch("ladefake.Runner.gone", plus(1), why="x"))


def test_register_records(log):
    store = {}
    p = Patch("ladefake.BACKEND", lambda: store.__setitem__("b", "ours"), kind="register",
              read=lambda: store.get("b"), value="ours", undo=lambda: store.pop("b"), why="reg")
    reg = PatchRegistry(log=log[0])
    reg.apply(p)
    assert store == {"b": "ours"} and reg.is_applied(p)
    with pytest.raises(AlreadyPatched):
        reg.apply(p)
    reg.revert_all()
    store["b"] = "theirs"
    with pytest.raises(PatchConflict, match="theirs"):
        PatchRegistry(log=log[0]).apply(p)


def test_apply_all_on_an_unsupported_platform_applies_only_any_platform_records(
        fake, log, monkeypatch):
    table = [Patch("ladefake.helper", plus(7), why="a", any_platform=True),
             Patch("ladefake.Runner.step", plus(100), why="b")]
    monkeypatch.setattr(patches, "LADE_PATCHES", table)
    monkeypatch.setattr(patches, "_REGISTRY", None)
    reg = patches.apply_all(platform_ok=False)
    try:
        assert [p.why for p in reg.applied] == ["a"]
        assert fake.helper(1) == 7 and fake.Runner().step(1) == 2
        assert patches.apply_all() is reg        # once per process
    finally:
        reg.revert_all()


def test_the_table():
    from lade_vllm.adapter import frontend, runtime
    table = frontend.PATCHES + runtime.PATCHES
    targets = [p.target for p in table]
    assert len(set(targets)) == len(targets) == 14
    for p in table:
        assert p.target.startswith("vllm.") and p.vllm_version == "0.32" and p.why
        assert "\n" not in p.why
    front = {p.target.rsplit(".", 1)[-1] for p in table if p.any_platform}
    assert front == {"create_speculative_config", "add_cli_args"}


def test_backend_path_matches_the_backend_module():
    import ast
    import pathlib

    import lade_vllm.attention
    from lade_vllm.adapter.runtime import CPU_TREE_BACKEND
    src = pathlib.Path(lade_vllm.attention.__file__).with_name("cpu_tree.py").read_text()
    tree = ast.parse(src)
    value = next(n.value.value for n in tree.body if isinstance(n, ast.Assign)
                 and getattr(n.targets[0], "id", None) == "BACKEND_PATH")
    assert value == CPU_TREE_BACKEND.value


def test_plugin_applies_every_record_once_against_vllm():
    code = textwrap.dedent("""
        from vllm.plugins import load_general_plugins
        load_general_plugins()
        from lade_vllm.adapter import patches
        reg = patches.registry()
        assert len(reg.applied) == 14, reg.applied
        assert all(reg.is_applied(p) for p in patches.LADE_PATCHES)
        for p in patches.LADE_PATCHES:
            try:
                reg.apply(p)
            except patches.AlreadyPatched:
                continue
            raise SystemExit("applied twice: " + p.target)
        from lade_vllm.adapter.runtime import CPU_TREE_BACKEND
        patches.ensure(CPU_TREE_BACKEND)         # applied already: a no-op
        print("OK")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "OK" in proc.stdout
