"""The adaptive policy inside the real engine: it switches levels (full tree, pool candidates only,
plain decoding) step by step, and outputs stay identical to vanilla greedy whatever it picks."""
from __future__ import annotations

import pytest

from helpers import FULL, close_llm, make_llm
from lade_vllm.config import LadeConfig
from tools import prompts


@pytest.fixture(scope="module")
def adaptive_lade(model_dir):
    # explore every 2 steps, any level, so that one short run visits every level
    llm = make_llm(model_dir, speculative_config={"method": "lade", "adaptive_explore_every": 2,
                                                  "adaptive_explore_margin": 0.0},
                   max_num_seqs=8, worker_extension_cls="tools.testing.ForwardCounter")
    yield llm
    close_llm(llm)


def test_adaptive_levels_switch_and_outputs_identical(adaptive_lade, vanilla_llm, tokenizer):
    from vllm import SamplingParams

    from tools import measure
    ps = prompts.load("mtbench", 12, tokenizer) + prompts.load("humaneval", 4, tokenizer)
    sp = SamplingParams(temperature=0.0, max_tokens=48)
    want = vanilla_llm.generate(ps, sp, use_tqdm=False)
    got = measure.generate(adaptive_lade, "lade-adaptive", ps, sp)
    assert got.token_ids == [list(w.outputs[0].token_ids) for w in want]
    policy = adaptive_lade.collective_rpc("lade_policy")[0]
    assert all(n > 0 for n in policy["history"]), policy  # every level ran
    # every level that ran measured what it delivered: its estimate comes from its own steps, and
    # lies between one token per step (the target's own) and a whole n-gram candidate accepted
    # plus the bonus token
    assert all(policy["measured"]), policy
    assert all(1.0 <= t <= LadeConfig().ngram_size for t in policy["tokens"]), policy
    # vLLM counted accepted drafts, and the policy saw them: some level measured more than one
    # token per step
    assert got.accepted > 0, (got.accepted, got.drafts)
    assert max(policy["tokens"]) > 1.0, policy


def test_per_request_caps_are_honoured_and_exact(adaptive_lade, vanilla_llm, tokenizer):
    """extra_args={"lade": {...}} caps a request's tree: one candidate of one token per step."""
    from vllm import SamplingParams

    from tools import measure
    ps = prompts.load("humaneval", 6, tokenizer)
    caps = {"window_size": 2, "ngram_size": 2, "guess_set_size": 1}
    sp = SamplingParams(temperature=0.0, max_tokens=40, extra_args={"lade": caps})
    want = vanilla_llm.generate(ps, SamplingParams(temperature=0.0, max_tokens=40), use_tqdm=False)
    got = measure.generate(adaptive_lade, "lade-capped", ps, sp)
    assert got.token_ids == [list(w.outputs[0].token_ids) for w in want]
    # at most one candidate node per tree step, so at most one accepted token per step
    assert got.draft_tokens <= got.drafts and got.accepted <= got.drafts, got


def test_seeded_sampling_reproducible_with_adaptive_policy(adaptive_lade, vanilla_llm, tokenizer):
    """The policy picks levels from timings, so two runs see different levels step by step; a
    seeded sampled request's text does not depend on its trees: the same every run, and the
    same as vanilla vLLM's for the same seed."""
    from vllm import SamplingParams

    from tools import measure
    n = 4 if FULL else 2
    ps = prompts.load("humaneval", n, tokenizer) + prompts.load("mtbench", n, tokenizer)
    seeded = [SamplingParams(temperature=0.4, top_p=0.95, max_tokens=40, seed=11 + i)
              for i in range(len(ps))]
    greedy = [SamplingParams(temperature=0.0, max_tokens=40) for _ in ps]
    # the greedy requests beside them follow the policy (exploring every 2 steps)
    first = adaptive_lade.generate(ps + ps, seeded + greedy, use_tqdm=False)
    policy = adaptive_lade.collective_rpc("lade_policy")[0]
    second = adaptive_lade.generate(ps[::-1] + ps, seeded[::-1] + greedy, use_tqdm=False)
    again = measure.generate(adaptive_lade, "lade-seeded", ps, seeded)
    want = [list(o.outputs[0].token_ids) for o in first[:len(ps)]]
    vanilla = vanilla_llm.generate(ps, seeded, use_tqdm=False)
    assert want == [list(o.outputs[0].token_ids) for o in vanilla]
    assert [list(o.outputs[0].token_ids) for o in second[:len(ps)]][::-1] == want
    assert again.token_ids == want
    # the seeded requests were tree-decoded alone (no greedy requests): drafts were verified
    assert again.drafts > 0 and again.accepted > 0, again
    assert sum(policy["history"]) > 0, policy
