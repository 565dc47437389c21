"""The harness is real: vanilla vLLM and vLLM's own ngram method agree token for token in float32
greedy decoding (the same bar lade must meet)."""
import pytest

from helpers import NGRAM_CONFIG, close_llm, greedy_texts, make_llm
from tools import prompts

MAX_TOKENS = 96


@pytest.fixture(scope="module")
def ngram_llm(model_dir):
    llm = make_llm(model_dir, speculative_config=dict(NGRAM_CONFIG))
    yield llm
    close_llm(llm)


def test_ngram_matches_vanilla_fp32_greedy(vanilla_llm, ngram_llm, tokenizer):
    ps = prompts.load("mtbench", 8, tokenizer)
    want = greedy_texts(vanilla_llm, ps, MAX_TOKENS)
    got = greedy_texts(ngram_llm, ps, MAX_TOKENS)
    assert all(len(ids) > 10 for _, ids in want)
    mismatched = [i for i, (a, b) in enumerate(zip(want, got)) if a[1] != b[1]]
    assert not mismatched, f"prompts {mismatched} differ"


def test_prompt_sets_load(tokenizer):
    mt = prompts.load("mtbench", 80, tokenizer)
    he = prompts.load("humaneval", 164)
    assert len(mt) == 80 and len(he) == 164
    assert mt[0].startswith("<|im_start|>") and "assistant" in mt[0][-30:]
    assert he[0].lstrip().startswith("from typing import List")
    with pytest.raises(ValueError, match="unknown prompt set"):
        prompts.load("nope", 1)
