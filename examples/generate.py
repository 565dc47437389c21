"""Minimal offline generation with lookahead decoding: LLM(...).generate().

    python examples/generate.py                       # the offline SmolLM2 model, two prompts
    python examples/generate.py --model /path/to/hf_folder --max-tokens 128 "Once upon a time"

Nothing needs importing for lade: vLLM loads the plugin through its entry point, and
``speculative_config="lade"`` (or a dict with options) turns it on. Prints each completion, then
the tokens per step read from vLLM's spec-decode counters (1.00 would mean no speedup from
speculation).
"""
import argparse
import json
import os
import sys

# vLLM on CPU otherwise reserves most of the machine's memory for the KV cache (GiB; GPUs ignore it)
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

DEFAULT_PROMPTS = ["def fibonacci(n):\n", "The three primary colors are"]


def offline_model() -> str:
    """The repository's offline SmolLM2 folder (tools/models.py, prepared on first use)."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from tools.models import model_path
    return model_path()


def accepted_tokens(llm) -> float:
    """Draft tokens accepted so far: vLLM's spec-decode counter (needs disable_log_stats=False)."""
    return sum(float(m.value) for m in llm.get_metrics()
               if m.name == "vllm:spec_decode_num_accepted_tokens")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("prompts", nargs="*", default=DEFAULT_PROMPTS)
    parser.add_argument("--model", default=None, help="HF folder (default: the offline SmolLM2)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--lade", default="lade",
                        help='"lade" or a JSON dict, e.g. \'{"method": "lade", "window_size": 3}\'')
    parser.add_argument("--json", action="store_true", help="print one JSON object instead")
    args = parser.parse_args()

    from vllm import LLM, SamplingParams

    spec = json.loads(args.lade) if args.lade.lstrip().startswith("{") else args.lade
    llm = LLM(model=args.model or offline_model(), dtype=args.dtype, speculative_config=spec,
              enforce_eager=True, max_model_len=2048, seed=0,
              disable_log_stats=False)  # keeps the spec-decode counters that tokens/step uses
    outputs = llm.generate(args.prompts, SamplingParams(temperature=0.0, max_tokens=args.max_tokens))
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    steps = tokens - accepted_tokens(llm)  # each step emits one target token + accepted drafts
    result = {"texts": [o.outputs[0].text for o in outputs],
              "token_ids": [list(o.outputs[0].token_ids) for o in outputs],
              "tokens": tokens, "tokens_per_step": tokens / steps if steps else 0.0}
    if args.json:
        print(json.dumps(result))
    else:
        for prompt, text in zip(args.prompts, result["texts"]):
            print(f"--- {prompt!r}\n{text}")
        print(f"tokens/step: {result['tokens_per_step']:.2f} ({tokens} tokens)")
    llm.llm_engine.engine_core.shutdown()  # an idle engine busy-polls a core


if __name__ == "__main__":
    main()
