"""Edge cases and bad input over HTTP (issue #9), against a real `--speculative-config lade` server
with a small token budget (chunked prefill, truncated trees) and a short max_model_len.

Edge cases, each equal to vanilla greedy (fp32) in tokens and text: a one-token prompt; a prompt
ending 12 tokens short of max_model_len (trees cut by the length limit); max_tokens=1; EOS as the
first generated token; a long prompt prefilled in chunks; requests joining and leaving at every
step (staggered starts, different max_tokens).
Bad input: invalid per-request lade options (400 naming the field), prompts over max_model_len,
invalid UTF-8, malformed JSON and wrong types: each a clear 4xx, while a concurrent good request
is undisturbed and the server stays healthy.
"""
from __future__ import annotations

import json
import threading
import time

import pytest

from helpers import CI_TREE, LADE_TREES, start_server
from lade_vllm.config import LadeConfig
from tools.server import MODEL_NAME

MAX_MODEL_LEN = 512
#: trees on every step (CI size: 27 query tokens per request)
SPEC = json.dumps(LADE_TREES)
#: the tree's limits, which per-request options may not exceed
TREE = LadeConfig(**CI_TREE)
#: --max-num-batched-tokens: a 440-token prompt takes 5 chunks; the trees of 4 requests
#: (4 x 27 tokens in CI, 4 x 64 at the defaults) exceed it and are truncated
BUDGET = 96
STAGGER = (3, 7, 12, 20, 33, 50)  # max_tokens of the staggered requests, started 0.4 s apart
EOS_CANDIDATES = (  # chat-templated conversations whose assistant turn is already complete
    ("Say OK and nothing else.", "OK"),
    ("Say OK and nothing else.", "OK."),
    ("What is the capital of France? Answer with one word.", "Paris."),
    ("Hi!", "Hello! How can I help you today?"),
)


def _vanilla(llm, prompts, sps):
    outs = llm.generate(prompts, sps, use_tqdm=False)
    return [(o.outputs[0].text, tuple(o.outputs[0].token_ids), o.outputs[0].finish_reason)
            for o in outs]


@pytest.fixture(scope="module")
def cases(vanilla_llm, tokenizer):
    """Every edge case's prompt and vanilla reference, computed before the lade server starts."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from tools import prompts
    eos = tokenizer.eos_token_id
    # EOS as first token: the first completed conversation whose greedy next token is EOS
    candidates = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                                add_generation_prompt=True) + a
                  for q, a in EOS_CANDIDATES]
    firsts = _vanilla(vanilla_llm, candidates, SamplingParams(temperature=0.0, max_tokens=1))
    eos_prompt = next((p for p, f in zip(candidates, firsts) if f[1] == (eos,)), None)
    eos_stop = None
    if eos_prompt is None:  # fallback: stop on whatever the first greedy token is
        eos_prompt, eos_stop = candidates[0], [firsts[0][1][0]]

    words = tokenizer("\n".join(prompts.load("humaneval", 12)))["input_ids"]
    near_limit = words[:MAX_MODEL_LEN - 12]
    long_prompt = words[100:540]
    text = prompts.load("humaneval", 1)[0]
    mt = prompts.load("mtbench", len(STAGGER), tokenizer)
    table = {  # name -> (prompt for the server, vLLM prompt, max_tokens, stop_token_ids)
        "one_token": ([tokenizer.bos_token_id], TokensPrompt(prompt_token_ids=[
            tokenizer.bos_token_id]), 24, None),
        "near_max_model_len": (near_limit, TokensPrompt(prompt_token_ids=near_limit), 12, None),
        "max_tokens_1": (text, text, 1, None),
        "eos_first": (eos_prompt, eos_prompt, 16, eos_stop),
        "chunked_prefill": (long_prompt, TokensPrompt(prompt_token_ids=long_prompt), 32, None),
    }
    for i, m in enumerate(STAGGER):
        table[f"stagger_{i}"] = (mt[i], mt[i], m, None)
    refs = _vanilla(vanilla_llm, [v[1] for v in table.values()],
                    [SamplingParams(temperature=0.0, max_tokens=v[2], stop_token_ids=v[3])
                     for v in table.values()])
    return {name: (v[0], v[2], v[3], ref) for (name, v), ref in zip(table.items(), refs)}, \
        eos_stop is None


@pytest.fixture(scope="module")
def http_server(model_dir, cases, tmp_path_factory):
    log = tmp_path_factory.mktemp("http") / "server.log"
    args = ["--speculative-config", SPEC, "--max-model-len", str(MAX_MODEL_LEN),
            "--max-num-seqs", "4", "--max-num-batched-tokens", str(BUDGET),
            "--enable-chunked-prefill"]
    # 1 GiB of KV cache is plenty here (max_model_len 512) and spares the shared machine's memory
    with start_server(model_dir, args, log, env={"VLLM_CPU_KVCACHE_SPACE": "1"}) as server:
        yield server


def _complete(client, prompt, max_tokens, stop_token_ids=None, stream=False, lade=None):
    extra = {"return_token_ids": True}
    if stop_token_ids:
        extra["stop_token_ids"] = stop_token_ids
    if lade is not None:
        extra["vllm_xargs"] = {"lade": lade}
    kwargs = dict(model=MODEL_NAME, prompt=prompt, max_tokens=max_tokens, temperature=0.0,
                  extra_body=extra)
    if not stream:
        choice = client.completions.create(**kwargs).choices[0]
        return choice.text, tuple(choice.token_ids), choice.finish_reason
    text, ids, finish = [], [], None
    for chunk in client.completions.create(stream=True, **kwargs):
        if chunk.choices:
            text.append(chunk.choices[0].text or "")
            ids.extend(chunk.choices[0].token_ids or [])
            finish = chunk.choices[0].finish_reason or finish
    return "".join(text), tuple(ids), finish


def test_edge_cases_match_vanilla(http_server, cases, tokenizer):
    table, eos_found = cases
    client = http_server.client()
    for name in ("one_token", "near_max_model_len", "max_tokens_1", "eos_first",
                 "chunked_prefill"):
        prompt, max_tokens, stop, want = table[name]
        for stream in (False, True):
            got = _complete(client, prompt, max_tokens, stop, stream=stream)
            assert got == want, (name, stream, got, want)
    assert len(table["max_tokens_1"][3][1]) == 1
    assert len(table["near_max_model_len"][3][1]) == 12  # generated right up to max_model_len
    if eos_found:  # the model itself ended the turn at once
        assert table["eos_first"][3][1] == (tokenizer.eos_token_id,)
        assert table["eos_first"][3][2] == "stop"
    print(f"\nEOS as first token: {'found a prompt' if eos_found else 'stop_token_ids fallback'}")

    # requests joining and leaving at every step: staggered starts, different lengths, streamed
    results: dict[str, tuple] = {}

    def run(name, delay):
        time.sleep(delay)
        prompt, max_tokens, stop, _ = table[name]
        results[name] = _complete(http_server.client(), prompt, max_tokens, stop, stream=True)

    threads = [threading.Thread(target=run, args=(f"stagger_{i}", 0.4 * i))
               for i in range(len(STAGGER))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    for i in range(len(STAGGER)):
        name = f"stagger_{i}"
        assert results.get(name) == table[name][3], name
    assert http_server.healthy()


def _error_message(body: str) -> str:
    try:
        data = json.loads(body)
    except json.JSONDecodeError:
        return body
    if isinstance(data, dict) and isinstance(data.get("error"), dict):
        return str(data["error"].get("message", "")) + " " + str(data["error"].get("param", ""))
    return json.dumps(data)


def test_bad_input_fails_alone(http_server, cases):
    table, _ = cases
    prompt, max_tokens, stop, want = table["stagger_5"]  # the longest good request
    good: dict[str, tuple] = {}
    runner = threading.Thread(target=lambda: good.update(
        r=_complete(http_server.client(), prompt, max_tokens, stop, stream=True)))
    runner.start()
    time.sleep(1.0)

    base = {"model": MODEL_NAME, "prompt": "def add(a, b):", "max_tokens": 8, "temperature": 0}
    chat = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 8, "temperature": 0}
    too_long = [1] * (MAX_MODEL_LEN + 40)
    bad_json = [  # (path, payload, words the error must contain)
        ("/v1/completions", {**base, "vllm_xargs": {"lade": '{"window_size": 99}'}},
         ["window_size", f"[1, {TREE.window_size}]", "99"]),
        ("/v1/completions", {**base, "stream": True,
                             "vllm_xargs": {"lade": '{"ngram_size": 1}'}},
         ["ngram_size", f"[2, {TREE.ngram_size}]"]),
        ("/v1/chat/completions", {**chat, "stream": True, "vllm_xargs": {
            "lade": json.dumps({"guess_set_size": TREE.guess_set_size + 1})}},
         ["guess_set_size", f"[0, {TREE.guess_set_size}]"]),
        ("/v1/chat/completions", {**chat, "vllm_xargs": {"lade": '{"tree": 3}'}},
         ["unknown", "tree"]),
        ("/v1/completions", {**base, "vllm_xargs": {"lade": False}}, ["lade", "\"false\""]),
        ("/v1/completions", {**base, "vllm_xargs": {"lade": "maybe"}}, ["lade", "JSON"]),
        ("/v1/completions", {**base, "vllm_xargs": {"lade": {"window_size": 2}}},
         ["vllm_xargs", "lade"]),  # the server's own schema refuses nested objects
        ("/v1/completions", {**base, "prompt": too_long}, ["maximum context length"]),
        ("/v1/completions", {**base, "prompt": "word " * 700, "stream": True},
         ["maximum context length"]),
        ("/v1/completions", {**base, "max_tokens": "many"}, ["max_tokens"]),
        ("/v1/completions", {**base, "temperature": "hot"}, ["temperature"]),
        ("/v1/completions", {**base, "prompt": 5.5}, ["prompt"]),
        ("/v1/completions", {**base, "max_tokens": -3}, ["max_tokens"]),
        ("/v1/chat/completions", {**chat, "messages": "hello"}, ["messages"]),
    ]
    for path, payload, words in bad_json:
        status, body = http_server.post_json(path, payload)
        assert 400 <= status < 500, (payload, status, body)
        message = _error_message(body).lower()
        for w in words:
            assert w.lower() in message, (payload, w, message)
    bad_bytes = [
        b'{"model": "smollm2", "prompt": "\xff\xfe\xfd", "max_tokens": 4}',  # invalid UTF-8
        b'{"model": "smollm2", "prompt": ',                                 # truncated JSON
        b"\x00\x01garbage",
        b"[1, 2, 3]",
    ]
    for body in bad_bytes:
        status, text = http_server.post_raw("/v1/completions", body)
        assert 400 <= status < 500, (body, status, text)

    runner.join(timeout=600)
    assert good.get("r") == want, "the concurrent good request was disturbed"
    http_server.wait_idle()
    assert http_server.healthy()
    # and the server still answers exactly, with per-request options applied or not
    for lade in (None, "false", '{"window_size": 2, "ngram_size": 3, "guess_set_size": 0}'):
        p, m, s, w = table["stagger_2"]
        assert _complete(http_server.client(), p, m, s, lade=lade) == w, lade
    log = http_server.log_text()
    assert "Traceback" not in log and "EngineDeadError" not in log


def test_min_p_and_logit_bias_accepted(http_server, cases, vanilla_llm):
    """min_p and logit_bias requests, which vLLM 0.32 refuses under other speculative methods,
    are served under lade (overrides #10): greedy + logit_bias equals vanilla, min_p sampling
    (completions and streamed chat) answers."""
    from vllm import SamplingParams
    table, _ = cases
    prompt, max_tokens, stop, (_, plain, _) = table["stagger_2"]
    bias = {plain[0]: -100.0, plain[len(plain) // 2]: -100.0}
    ref = _vanilla(vanilla_llm, [prompt], [SamplingParams(temperature=0.0, max_tokens=max_tokens,
                                                          logit_bias=bias)])[0]
    assert ref[1] != plain and plain[0] not in ref[1]
    client = http_server.client()
    choice = client.completions.create(
        model=MODEL_NAME, prompt=prompt, max_tokens=max_tokens, temperature=0.0,
        logit_bias={str(t): b for t, b in bias.items()},
        extra_body={"return_token_ids": True}).choices[0]
    assert (choice.text, tuple(choice.token_ids), choice.finish_reason) == ref
    choice = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=12,
                                       temperature=1.0, seed=3,
                                       extra_body={"min_p": 0.2}).choices[0]
    assert choice.text and choice.finish_reason in ("length", "stop")
    text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": "Name three colours."}],
        max_tokens=12, temperature=0.8, seed=4, stream=True,
        logit_bias={"28": 1.0}, extra_body={"min_p": 0.1}) if c.choices)
    assert text
    assert http_server.healthy()
