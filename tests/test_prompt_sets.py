"""The prompt sets the tests and benchmarks read load offline. (That vLLM's own ngram method
agrees with vanilla token for token is checked in test_lade_engine, on lade's prompts.)"""
import pytest

from tools import prompts


def test_prompt_sets_load(tokenizer):
    mt = prompts.load("mtbench", 80, tokenizer)
    he = prompts.load("humaneval", 164)
    assert len(mt) == 80 and len(he) == 164
    assert mt[0].startswith("<|im_start|>") and "assistant" in mt[0][-30:]
    assert he[0].lstrip().startswith("from typing import List")
    with pytest.raises(ValueError, match="unknown prompt set"):
        prompts.load("nope", 1)
