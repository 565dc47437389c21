"""lade under the scheduler's pressure: KV-cache preemption, chunked prefill, token-budget truncation
of trees, max_model_len truncation, aborts and requests joining mid-flight. Outputs must still equal
vanilla greedy (float32), and per-request state must be freed."""
import pytest

from helpers import LADE_TREES, close_llm, make_llm
from tools import prompts

MAX_MODEL_LEN = 1024


@pytest.fixture(scope="module")
def tight_lade(model_dir):
    # 10 blocks of 128 tokens for 8 concurrent requests, each with a tree of 26 extra slots (CI
    # size): the scheduler must preempt; a 160-token budget chunks long prompts and truncates
    # the trees of 8 requests (8 x 27 query tokens).
    llm = make_llm(model_dir, speculative_config=dict(LADE_TREES), max_num_seqs=8, max_model_len=MAX_MODEL_LEN,
                   num_gpu_blocks_override=10, enable_chunked_prefill=True,
                   max_num_batched_tokens=160,
                   worker_extension_cls="tools.testing.ForwardCounter")
    yield llm
    close_llm(llm)


def _preemptions(llm) -> float:
    return sum(float(m.value) for m in llm.get_metrics() if m.name == "vllm:num_preemptions")


def _ids(outs):
    return [list(o.outputs[0].token_ids) for o in outs]


def test_preemption_chunked_prefill_and_truncation(tight_lade, vanilla_llm, tokenizer):
    from vllm import SamplingParams
    ps = prompts.load("mtbench", 6, tokenizer) + prompts.load("humaneval", 6)
    long_prompt = "\n".join(prompts.load("humaneval", 12)[6:12])  # several chunks of prefill
    ps.append(long_prompt)
    sp = SamplingParams(temperature=0.0, max_tokens=64)
    before = _preemptions(tight_lade)
    got = tight_lade.generate(ps, sp, use_tqdm=False)
    want = vanilla_llm.generate(ps, sp, use_tqdm=False)
    assert _preemptions(tight_lade) > before, "the test did not force any preemption"
    assert _ids(got) == _ids(want)


def test_edge_prompts(tight_lade, vanilla_llm, tokenizer):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    near_limit = tokenizer("word " * 2000)["input_ids"][:MAX_MODEL_LEN - 12]
    cases = [
        (TokensPrompt(prompt_token_ids=[tokenizer.bos_token_id or 1]), 24),  # one-token prompt
        (TokensPrompt(prompt_token_ids=near_limit), 12),  # trees cut by max_model_len
        (prompts.load("humaneval", 1)[0], 1),             # max_tokens=1
    ]
    for prompt, max_tokens in cases:
        sp = SamplingParams(temperature=0.0, max_tokens=max_tokens)
        got = tight_lade.generate([prompt], sp, use_tqdm=False)
        want = vanilla_llm.generate([prompt], sp, use_tqdm=False)
        assert _ids(got) == _ids(want)
        assert len(got[0].outputs[0].token_ids) == max_tokens


def test_aborts_and_joins_free_state(tight_lade, vanilla_llm, tokenizer):
    from vllm import SamplingParams
    engine = tight_lade.llm_engine
    ps = prompts.load("mtbench", 8, tokenizer)
    sp = SamplingParams(temperature=0.0, max_tokens=64)
    for i in range(5):
        engine.add_request(f"a{i}", ps[i], sp)
    finished = {}
    steps = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = list(out.outputs[0].token_ids)
        steps += 1
        if steps == 6:
            engine.abort_request(["a1", "a3"])
            for i in range(5, 8):  # join while others are mid-flight
                engine.add_request(f"a{i}", ps[i], sp)
    assert set(finished) == {"a0", "a2", "a4", "a5", "a6", "a7"}
    want = vanilla_llm.generate([ps[int(r[1:])] for r in sorted(finished)], sp, use_tqdm=False)
    assert [finished[r] for r in sorted(finished)] == _ids(want)
    # one more request lets the worker see the last finished ids; only it may hold state then
    tight_lade.generate([ps[0]], SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)
    assert tight_lade.collective_rpc("lade_live_slots")[0] <= 1
