"""Each example in examples/ run as a user would (a real subprocess, real engine, small inputs), its
output checked token for token against the session's vanilla engine (float32, greedy)."""
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import LADE_TREES, greedy_texts

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
MAX_TOKENS = 32


# the adaptive policy may decode plain on a loaded machine; these tests check trees are used
TREES = json.dumps(LADE_TREES)


def _run(cmd, log: Path, timeout: float = 600, **env) -> str:
    """Run an example; return its stdout, or fail with the tail of its log."""
    with open(log, "w") as err:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True, timeout=timeout,
                              cwd=ROOT, env=dict(os.environ, **env))
    if proc.returncode != 0:
        pytest.fail(f"{cmd[1]} exited {proc.returncode}:\n{log.read_text()[-4000:]}")
    return proc.stdout


def _last_json(out: str) -> dict:
    """The example's JSON result: its last line that is a JSON object (vLLM logs to stdout too)."""
    return json.loads([line for line in out.splitlines() if line.startswith("{")][-1])


def _code_prompts(n):
    from tools import prompts
    return prompts.load("humaneval", n)


def test_generate_example(model_dir, vanilla_llm, tmp_path):
    prompts = _code_prompts(2)
    out = _run([sys.executable, str(EXAMPLES / "generate.py"), "--json", "--model", model_dir,
                "--max-tokens", str(MAX_TOKENS), "--lade", TREES, *prompts], tmp_path / "generate.log")
    result = _last_json(out)
    want = greedy_texts(vanilla_llm, prompts, MAX_TOKENS)
    assert result["token_ids"] == [ids for _, ids in want]
    assert result["texts"] == [text for text, _ in want]
    # code prompts: lade accepts drafts, so more than one token per step
    assert result["tokens_per_step"] > 1.0


def test_batch_ray_data_example(model_dir, vanilla_llm, tmp_path):
    pytest.importorskip("pyarrow", reason="Ray Data needs pyarrow: pip install 'lade-vllm[examples]'")
    prompts = _code_prompts(3) + ["The three primary colors are"]
    prompt_file = tmp_path / "prompts.jsonl"
    prompt_file.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    out_file = tmp_path / "out.jsonl"
    out = _run([sys.executable, str(EXAMPLES / "batch_ray_data.py"), str(prompt_file), "--lade", TREES,
                str(out_file), "--model", model_dir, "--max-tokens", str(MAX_TOKENS),
                "--batch-size", "2"], tmp_path / "batch.log",
               # Ray's memory monitor counts the whole machine (this session's other engines too)
               RAY_memory_monitor_refresh_ms="0")
    summary = _last_json(out)
    rows = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == prompts  # input order kept
    want = greedy_texts(vanilla_llm, prompts, MAX_TOKENS)
    assert [r["text"] for r in rows] == [text for text, _ in want]
    assert summary["prompts"] == len(prompts)
    assert summary["tokens"] == sum(len(ids) for _, ids in want)
    assert summary["tokens_per_step"] > 1.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_and_client_examples(model_dir, vanilla_llm, tokenizer, tmp_path):
    port = _free_port()
    log = tmp_path / "server.log"
    env = dict(os.environ, MODEL=model_dir, PORT=str(port), PYTHON=sys.executable)
    with open(log, "w") as out:
        server = subprocess.Popen(["bash", str(EXAMPLES / "serve.sh"), "--enforce-eager",
                                   "--max-num-seqs", "4"], stdout=out, stderr=subprocess.STDOUT,
                                  env=env, cwd=ROOT)
    try:
        deadline = time.time() + 300
        while True:  # the client waits too, but a dead server should fail fast with its log
            if server.poll() is not None:
                pytest.fail(f"serve.sh exited {server.returncode}:\n{log.read_text()[-4000:]}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if time.time() > deadline:
                    pytest.fail(f"server not listening in 300 s:\n{log.read_text()[-4000:]}")
                time.sleep(1)
        prompt, question = _code_prompts(1)[0], "What is the capital of France?"
        out = _run([sys.executable, str(EXAMPLES / "client.py"),
                    "--base-url", f"http://127.0.0.1:{port}/v1", "--wait", "300",
                    "--prompt", prompt, "--question", question,
                    "--max-tokens", str(MAX_TOKENS)], tmp_path / "client.log")
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
    got = _last_json(out)
    from tools import prompts as prompt_sets
    templated = prompt_sets.chat_prompts([question], tokenizer)[0]
    (want_completion, _), (want_chat, _) = greedy_texts(vanilla_llm, [prompt, templated],
                                                        MAX_TOKENS)
    assert got["completion"] == want_completion
    assert got["chat"] == want_chat
    assert "lade: lookahead decoding enabled" in log.read_text()
