"""Client for examples/serve.sh: one completion and one streamed chat completion, greedy.

    examples/serve.sh &                                    # wait for "Application startup complete"
    python examples/client.py --base-url http://127.0.0.1:8000/v1

The server is a plain OpenAI-compatible vLLM server; lookahead decoding changes only its speed,
never the text. Prints one JSON object: {"completion": ..., "chat": ...}.
"""
import argparse
import json
import time
import urllib.request


def wait_healthy(base_url: str, timeout_s: float) -> None:
    health = base_url.rsplit("/v1", 1)[0] + "/health"
    deadline = time.time() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(health, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            if time.time() > deadline:
                raise
            time.sleep(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--model", default="lade-model", help="the server's --served-model-name")
    parser.add_argument("--prompt", default="def fibonacci(n):\n")
    parser.add_argument("--question", default="What is the capital of France?")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--wait", type=float, default=0.0, help="seconds to wait for /health")
    args = parser.parse_args()

    from openai import OpenAI

    if args.wait:
        wait_healthy(args.base_url, args.wait)
    client = OpenAI(base_url=args.base_url, api_key="unused")
    completion = client.completions.create(model=args.model, prompt=args.prompt,
                                           max_tokens=args.max_tokens, temperature=0.0)
    stream = client.chat.completions.create(
        model=args.model, messages=[{"role": "user", "content": args.question}],
        max_tokens=args.max_tokens, temperature=0.0, stream=True)
    chat = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    print(json.dumps({"completion": completion.choices[0].text, "chat": chat}))


if __name__ == "__main__":
    main()
