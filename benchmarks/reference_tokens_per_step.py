"""Tokens per step of the Hugging Face reference lookahead loop (``tools.reference``), and its
exactness against plain greedy decoding.

    python benchmarks/reference_tokens_per_step.py [--n 10] [--max-new-tokens 128] [--threads 1]
                                                   [--seeds 0,1,2]
    python benchmarks/reference_tokens_per_step.py --write-prompt-ids ids.json   # no model run
    python benchmarks/reference_tokens_per_step.py --prompt-ids ids.json --model DIR \
        --device cuda --dtype bfloat16 --attn sdpa                              # e.g. on a GPU

MT-bench (chat-templated) and HumanEval, first ``--n`` prompts each, greedy, float32, batch 1, for
(N, W, G) in (4, 5, 5), (5, 7, 7), (5, 15, 15), with and without the prompt n-gram pool.
tokens/step = generated tokens / model forwards over the set, the prefill counting as a step (the
definition of ``tools.measure.RunResult.tokens_per_step``); identical = outputs equal to plain
greedy token for token (bit-exact only in float32). Wall-clock tokens/s of plain greedy and of each
setting, and their ratio, are printed too (greedy is timed before and after the settings; the ratio
uses their mean); ``--prompt-ids`` runs from pre-tokenized prompts where no tokenizer or prompt set
is installed (``--write-prompt-ids`` makes the file). The window's random initial tokens (``seed``) move tokens/step by up to
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
        x = torch.tensor([[tok]], device=ids.device)
    return out


def timed(device: torch.device, fn):
    """(seconds, fn()) with the device synchronized around the call."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def load_prompt_ids(args) -> tuple[dict[str, list[list[int]]], int | None]:
    """{set name: [token ids per prompt]} and the EOS id, from --prompt-ids or the prompt sets."""
    import json
    if args.prompt_ids:
        data = json.load(open(args.prompt_ids))
        return {k: v[:args.n] for k, v in data["sets"].items()}, data["eos"]
    from transformers import AutoTokenizer

    from tools import prompts
    tok = AutoTokenizer.from_pretrained(args.model)
    sets = {name: [tok(t).input_ids for t in
                   prompts.load(name, args.n, tok if name == "mtbench" else None)]
            for name in args.sets.split(",")}
    return sets, tok.eos_token_id


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--n", type=int, default=10, help="prompts per set")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared machine)")
    ap.add_argument("--attn", default="eager", choices=["eager", "sdpa"])
    ap.add_argument("--sets", default="mtbench,humaneval")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--model", default=None, help="HF model folder (default: the offline SmolLM2)")
    ap.add_argument("--prompt-ids", default=None, help="JSON of pre-tokenized prompts")
    ap.add_argument("--write-prompt-ids", default=None, help="write that JSON and exit")
    ap.add_argument("--configs", default=None, help="N/W/G settings, comma separated "
                    "(default 4/5/5,5/7/7,5/15/15)")
    ap.add_argument("--seeds", default="0", help="window-init seeds, comma separated; tokens/step "
                    "is pooled over them (it moves by up to ~0.1 from one seed to another)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM

    from tools.reference import lookahead_generate
    if args.model is None:
        from tools.models import model_path
        args.model = model_path()
    sets, eos = load_prompt_ids(args)
    if args.write_prompt_ids:
        import json
        json.dump({"sets": sets, "eos": eos}, open(args.write_prompt_ids, "w"))
        return
    configs = [tuple(int(v) for v in c.split("/")) for c in args.configs.split(",")] \
        if args.configs else CONFIGS
    device = torch.device(args.device)
    model = AutoModelForCausalLM.from_pretrained(
        args.model, dtype=getattr(torch, args.dtype), attn_implementation=args.attn).to(device).eval()
    M = args.max_new_tokens
    seeds = [int(x) for x in args.seeds.split(",")]
    rows = []
    for name, id_lists in sets.items():
        ids = [torch.tensor(x, device=device) for x in id_lists]
        greedy(model, ids[0], 8, eos)  # warm-up (kernels, allocator)
        lookahead_generate(model, ids[0], 8, window_size=5, ngram_size=4, guess_set_size=5)
        before, refs = timed(device, lambda: [greedy(model, x, M, eos) for x in ids])
        n_ref = sum(map(len, refs))
        print(f"[{name}] greedy: {n_ref} tokens in {before:.1f}s", file=sys.stderr, flush=True)
        settings = []
        for N, W, G in configs:
            for pool in (False, True):
                secs, outs = timed(device, lambda: [
                    lookahead_generate(model, x, M, window_size=W, ngram_size=N, guess_set_size=G,
                                       pool_from_prompt=pool, eos_token_id=eos, seed=seed)
                    for seed in seeds for x in ids])
                n_tok = sum(len(out) for out, _ in outs)
                n_steps = sum(steps for _, steps in outs)
                same = sum(out == ref for (out, _), ref in zip(outs, refs * len(seeds)))
                settings.append((name, f"{N}/{W}/{G}", "prompt" if pool else "no",
                                 n_tok / n_steps, f"{same}/{len(outs)}", n_tok / secs))
                print(f"{settings[-1]} {n_tok} tokens {n_steps} steps {secs:.1f}s",
                      file=sys.stderr, flush=True)
        after, _ = timed(device, lambda: [greedy(model, x, M, eos) for x in ids])
        print(f"[{name}] greedy tok/s before {n_ref / before:.1f}, after {n_ref / after:.1f}",
              file=sys.stderr, flush=True)
        rows += [row + (2 * n_ref / (before + after),) for row in settings]

    print(f"\nHF reference loop, {args.attn} attention, {args.dtype} on {args.device}, greedy, batch 1, "
          f"{M} new tokens, first {args.n} prompts, seeds {args.seeds}; tokens/step counts the "
          "prefill as a step.\n")
    print("| set | N/W/G | pool | tokens/step | identical | tok/s | greedy tok/s | speedup |")
    print("|---|---|---|---|---|---|---|---|")
    for name, cfg, pool, tps, same, speed, greedy_tps in rows:
        print(f"| {name} | {cfg} | {pool} | {tps:.2f} | {same} | {speed:.1f} | {greedy_tps:.1f} "
              f"| {speed / greedy_tps:.2f}x |")


if __name__ == "__main__":
    main()
