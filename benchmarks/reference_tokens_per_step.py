"""Tokens per step of the Hugging Face reference lookahead loop (``tools.reference``), and its
exactness against plain greedy decoding.

    python benchmarks/reference_tokens_per_step.py [--n 10] [--max-new-tokens 128] [--threads 1]
                                                   [--seeds 0,1,2]

MT-bench (chat-templated) and HumanEval, first ``--n`` prompts each, greedy, float32, batch 1, for
(N, W, G) in (4, 5, 5), (5, 7, 7), (5, 15, 15), with and without the prompt n-gram pool.
tokens/step = generated tokens / model forwards over the set, the prefill counting as a step (the
definition of ``tools.measure.RunResult.tokens_per_step``); identical = outputs equal to plain
greedy token for token. The window's random initial tokens (``seed``) move tokens/step by up to
~0.1 on 10 prompts, so compare implementations over several seeds. Prints a markdown table (rows
also go to stderr as they finish).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # tools/: the repository's dev tooling (not installed)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

CONFIGS = [(4, 5, 5), (5, 7, 7), (5, 15, 15)]  # (N, W, G)


@torch.inference_mode()
def greedy(model, ids: torch.Tensor, max_new_tokens: int, eos: int | None) -> list[int]:
    """Plain greedy decoding with a KV cache (one token per forward)."""
    from transformers import DynamicCache
    cache = DynamicCache(config=model.config)
    x, out = ids[None], []
    for _ in range(max_new_tokens):
        logits = model(input_ids=x, past_key_values=cache, use_cache=True).logits
        tok = int(logits[0, -1].argmax())
        out.append(tok)
        if tok == eos:
            break
        x = torch.tensor([[tok]])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--n", type=int, default=10, help="prompts per set")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared machine)")
    ap.add_argument("--attn", default="eager", choices=["eager", "sdpa"])
    ap.add_argument("--sets", default="mtbench,humaneval")
    ap.add_argument("--seeds", default="0", help="window-init seeds, comma separated; tokens/step "
                    "is pooled over them (it moves by up to ~0.1 from one seed to another)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tools import prompts
    from tools.models import model_path
    from tools.reference import lookahead_generate

    path = model_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                 attn_implementation=args.attn).eval()
    eos, M = tok.eos_token_id, args.max_new_tokens
    seeds = [int(x) for x in args.seeds.split(",")]
    rows = []
    for name in args.sets.split(","):
        texts = prompts.load(name, args.n, tok if name == "mtbench" else None)
        ids = [torch.tensor(tok(t).input_ids) for t in texts]
        t0 = time.perf_counter()
        refs = [greedy(model, x, M, eos) for x in ids]
        print(f"[{name}] greedy: {sum(map(len, refs))} tokens in {time.perf_counter() - t0:.0f}s",
              file=sys.stderr, flush=True)
        for N, W, G in CONFIGS:
            for pool in (False, True):
                t0 = time.perf_counter()
                n_tok = n_steps = same = 0
                for seed in seeds:
                    for x, ref in zip(ids, refs):
                        out, steps = lookahead_generate(model, x, M, window_size=W, ngram_size=N,
                                                        guess_set_size=G, pool_from_prompt=pool,
                                                        eos_token_id=eos, seed=seed)
                        n_tok, n_steps = n_tok + len(out), n_steps + steps
                        same += out == ref
                row = (name, f"{N}/{W}/{G}", "prompt" if pool else "no", n_tok / n_steps,
                       f"{same}/{len(ids) * len(seeds)}")
                rows.append(row)
                print(f"{row} {n_tok} tokens {n_steps} steps {time.perf_counter() - t0:.0f}s",
                      file=sys.stderr, flush=True)

    print(f"\nHF reference loop, {args.attn} attention, fp32, greedy, batch 1, "
          f"{M} new tokens, first {args.n} prompts, seeds {args.seeds}; tokens/step counts the "
          "prefill as a step.\n")
    print("| set | N/W/G | pool | tokens/step | identical |")
    print("|---|---|---|---|---|")
    for name, cfg, pool, tps, same in rows:
        print(f"| {name} | {cfg} | {pool} | {tps:.2f} | {same} |")


if __name__ == "__main__":
    main()
