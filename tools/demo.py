"""`make demo`: lade on the offline model over real MT-bench prompts, against vanilla decoding and
vLLM's ngram, side by side in one run: tokens/s, tokens/step, identical-output count, a sample.
    python -m tools.demo [--prompts 10] [--max-tokens 128] [--dtype bfloat16]
"""
from __future__ import annotations

import argparse
import os

#: set (unless already set) before vLLM is imported: CPU platform, no hub access, 2 GiB KV cache
ENV_DEFAULTS = {"VLLM_TARGET_DEVICE": "cpu", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "VLLM_CPU_KVCACHE_SPACE": "2", "TOKENIZERS_PARALLELISM": "false"}

METHODS = {
    "vanilla": None,
    "ngram": {"method": "ngram", "num_speculative_tokens": 5,
              "prompt_lookup_min": 2, "prompt_lookup_max": 4},
    "lade": "lade",
    # a small tree: fewer extra tokens per forward, which this 2-core CPU pays for
    "lade-small": {"method": "lade", "window_size": 2, "ngram_size": 3, "guess_set_size": 2},
}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--prompts", type=int, default=10)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--methods", default=",".join(METHODS))
    args = ap.parse_args(argv)
    for key, value in ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)

    from vllm import LLM, SamplingParams

    from tools import measure, prompts
    from tools.models import model_path

    model = model_path()
    sp = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    results = []
    for name in args.methods.split(","):
        print(f"\n=== {name}: starting engine ({args.dtype}, batch 1) ===", flush=True)
        llm = LLM(model=model, dtype=args.dtype, max_num_seqs=1, max_model_len=2048, seed=0,
                  speculative_config=METHODS[name], disable_log_stats=False)
        ps = prompts.load("mtbench", args.prompts, llm.get_tokenizer())
        measure.generate(llm, name, ps[:1], SamplingParams(temperature=0.0, max_tokens=8))
        res = measure.generate(llm, name, ps, sp)
        measure.shutdown(llm)
        del llm
        results.append(res)
        print(f"{name}: {res.num_tokens} tokens in {res.seconds:.1f}s = {res.tokens_per_s:.1f} tok/s, "
              f"{res.tokens_per_step:.2f} tokens/step", flush=True)
        print(f"sample: {res.texts[0][:300]!r}", flush=True)

    base = results[0]
    print(f"\nMT-bench first {args.prompts} questions, {args.max_tokens} new tokens, greedy, "
          f"{args.dtype}, max_num_seqs=1")
    print(f"{'method':<11} {'tok/s':>8} {'tok/step':>9} {'speedup':>8} {'same text as vanilla':>22}")
    for r in results:
        same = sum(a == b for a, b in zip(r.token_ids, base.token_ids))
        print(f"{r.method:<11} {r.tokens_per_s:>8.1f} {r.tokens_per_step:>9.2f} "
              f"{r.tokens_per_s / base.tokens_per_s:>7.2f}x {same:>17}/{len(r.token_ids)}")


if __name__ == "__main__":
    main()
