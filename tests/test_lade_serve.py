"""A real OpenAI-compatible server with `--speculative-config lade`, spoken to with the openai
client: completions and streamed chat completions give the same text as vanilla greedy."""
import pytest

from helpers import FULL, start_server
from tools.server import MODEL_NAME

# CI runs the same server configuration and checks (completion and streamed chat == vanilla, the
# "lade enabled" log line) in tests/test_examples.py::test_serve_and_client_examples
pytestmark = pytest.mark.skipif(not FULL, reason="LADE_FULL=1: covered in CI by test_examples")

MAX_TOKENS = 48


@pytest.fixture(scope="module")
def lade_server(model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "server.log"
    args = ["--max-model-len", "2048", "--max-num-seqs", "4", "--speculative-config", "lade"]
    with start_server(model_dir, args, log) as server:
        yield server.base_url, log


def test_completions_and_streaming_chat_match_vanilla(lade_server, vanilla_llm, tokenizer):
    from openai import OpenAI
    from vllm import SamplingParams

    from tools import prompts
    base_url, log = lade_server
    client = OpenAI(base_url=base_url, api_key="none")
    sp = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)

    code = prompts.load("humaneval", 2)
    for prompt in code:
        want = vanilla_llm.generate([prompt], sp, use_tqdm=False)[0].outputs[0].text
        got = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=MAX_TOKENS,
                                        temperature=0.0)
        assert got.choices[0].text == want

    for question in prompts.mtbench_questions()[:2]:
        templated = prompts.chat_prompts([question], tokenizer)[0]
        want = vanilla_llm.generate([templated], sp, use_tqdm=False)[0].outputs[0].text
        stream = client.chat.completions.create(
            model=MODEL_NAME, messages=[{"role": "user", "content": question}],
            max_tokens=MAX_TOKENS, temperature=0.0, stream=True)
        pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
        assert len(pieces) > 1
        assert "".join(pieces) == want
    assert "lade: lookahead decoding enabled" in log.read_text()
