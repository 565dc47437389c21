"""`make demo`: lade on the offline model over real MT-bench prompts, against vanilla decoding and
vLLM's ngram, side by side: tokens/s, tokens/step, speedup, outputs identical to vanilla, and a PNG
chart of the same numbers.

    python -m tools.demo [--prompts 8] [--max-tokens 128] [--dtype auto] [--verbose]

``--dtype auto`` (the default) is bfloat16 where the CPU computes it natively (AVX-512 BF16 or
AMX) and float32 elsewhere (an AVX2-only CPU emulates bf16 GEMMs at 2-3x the cost of fp32).

vLLM's own log is kept to errors unless ``--verbose``; each method shows one progress bar.
"""
from __future__ import annotations

import argparse
import logging
import os

#: set (unless already set) before vLLM is imported: CPU platform, no hub access, 2 GiB KV cache
ENV_DEFAULTS = {"VLLM_TARGET_DEVICE": "cpu", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "VLLM_CPU_KVCACHE_SPACE": "2", "TOKENIZERS_PARALLELISM": "false"}
#: and unless --verbose: vLLM, torch's C++ side and Python warnings quiet (engine processes too)
QUIET = {"VLLM_LOGGING_LEVEL": "ERROR", "TORCH_CPP_LOG_LEVEL": "ERROR",
         "PYTHONWARNINGS": "ignore", "TRANSFORMERS_VERBOSITY": "error"}

METHODS = {
    "vanilla": None,
    "ngram": {"method": "ngram", "num_speculative_tokens": 5,
              "prompt_lookup_min": 2, "prompt_lookup_max": 4},
    "lade": "lade",
}
RESULTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       "benchmarks", "results")


def progress_bar(method: str):
    """vLLM's ``use_tqdm`` callable: one bar per method, answers done of the prompts (vLLM's
    prompt-rendering bar is left out)."""
    from tqdm import tqdm

    def make(iterable=None, desc=None, **kwargs):
        if desc != "Processed prompts":
            return tqdm(iterable, disable=True)
        return tqdm(iterable, desc=f"{method:>8}", unit="answer", **kwargs)
    return make


def default_dtype(cpuinfo: str = "/proc/cpuinfo") -> str:
    """bfloat16 where the CPU has native bf16 arithmetic, float32 elsewhere."""
    try:
        with open(cpuinfo) as f:
            flags = next((line.split(":", 1)[1].split() for line in f
                          if line.startswith("flags")), [])
    except OSError:
        return "bfloat16"
    return "bfloat16" if {"avx512_bf16", "amx_bf16"} & set(flags) else "float32"


def table(results, base, title: str) -> str:
    lines = [title, f"{'method':<9} {'tok/s':>7} {'tok/step':>9} {'speedup':>8} "
                    f"{'same text as vanilla':>21}"]
    for r in results:
        same = sum(a == b for a, b in zip(r.token_ids, base.token_ids))
        lines.append(f"{r.method:<9} {r.tokens_per_s:>7.1f} {r.tokens_per_step:>9.2f} "
                     f"{r.tokens_per_s / base.tokens_per_s:>7.2f}x {same:>14}/{len(r.token_ids)}")
    return "\n".join(lines)


def chart(results, base, title: str, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = [r.method for r in results]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    axes[0].bar(names, [r.tokens_per_s / base.tokens_per_s for r in results], color="tab:blue")
    axes[0].axhline(1.0, color="gray", lw=0.8)
    axes[0].set(title="speedup vs vanilla (tokens/s)")
    axes[1].bar(names, [r.tokens_per_step for r in results], color="tab:green")
    axes[1].set(title="tokens per model step")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--dtype", default="auto", help="auto: bfloat16 where the CPU has native "
                    "bf16 (AVX-512 BF16, AMX), else float32")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--verbose", action="store_true", help="show vLLM's full log")
    args = ap.parse_args(argv)
    if args.dtype == "auto":
        args.dtype = default_dtype()
    for key, value in {**ENV_DEFAULTS, **({} if args.verbose else QUIET)}.items():
        os.environ.setdefault(key, value)
    if not args.verbose:   # vLLM warns on import, before its logging config applies
        logging.getLogger("vllm").setLevel(logging.ERROR)

    from vllm import LLM, SamplingParams

    from tools import measure, prompts
    from tools.models import model_path

    model = model_path()
    sp = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    results = []
    for name in args.methods.split(","):
        print(f"{name}: starting the engine ({args.dtype}, one request at a time) ...", flush=True)
        llm = LLM(model=model, dtype=args.dtype, max_num_seqs=1, max_model_len=2048, seed=0,
                  speculative_config=METHODS[name], disable_log_stats=False, enforce_eager=True,
                  use_tqdm_on_load=args.verbose)
        ps = prompts.load("mtbench", args.prompts, llm.get_tokenizer())
        measure.generate(llm, name, ps[:1], SamplingParams(temperature=0.0, max_tokens=8))
        results.append(measure.generate(llm, name, ps, sp, progress=progress_bar(name)))
        measure.shutdown(llm)
        del llm

    base = results[0]
    title = (f"MT-bench first {args.prompts} questions, {args.max_tokens} new tokens, greedy, "
             f"{args.dtype}, one request at a time, SmolLM2-135M on this CPU")
    print("\n" + table(results, base, title))
    print(f"\nlade's first answer: {results[-1].texts[0][:200]!r}")
    if args.dtype != "float32":
        print(f"({args.dtype} is not bit-exact for any speculative method; "
              "`--dtype float32` gives identical text)")
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, "demo.png")
    chart(results, base, title, path)
    print(f"chart: {path}")


if __name__ == "__main__":
    main()
