"""Tokens per step for requests with each sampling feature: lade vs vanilla vs vLLM ngram.

    .venv/bin/python benchmarks/features_tokens_per_step.py
    .venv/bin/python benchmarks/features_tokens_per_step.py --methods lade,ngram --max-tokens 64

One engine per method (float32, eager, max_num_seqs 8), each in its own process. Per feature the
same prompts (MT-bench and HumanEval) are submitted as one batch with that feature's
SamplingParams (greedy), and tokens/step is read from vLLM's spec-decode counters as in
tools/measure.py: tokens / (tokens - accepted drafts), the prefill counting as a step. Vanilla is
1.0 by definition; it is run to check that the other methods' greedy outputs equal its outputs
token for token (fp32), per feature; JSON-schema answers are also parsed and checked.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # tools/: the repository's dev tooling (not installed)

for _k, _v in {"VLLM_TARGET_DEVICE": "cpu", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "VLLM_CPU_KVCACHE_SPACE": "2", "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(_k, _v)

METHODS = {
    "vanilla": None,
    "ngram": {"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_min": 2,
              "prompt_lookup_max": 4},
    "lade": "lade",                                          # defaults, adaptive policy on
    "lade-full": {"method": "lade", "adaptive": False},      # every step a full tree
}

JSON_SCHEMA = {"type": "object",
               "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                              "city": {"type": "string"},
                              "hobbies": {"type": "array", "items": {"type": "string"},
                                          "minItems": 1, "maxItems": 3}},
               "required": ["name", "age", "city", "hobbies"]}


def features(max_tokens: int) -> dict[str, dict]:
    """Feature name -> SamplingParams keyword arguments (greedy)."""
    from vllm.sampling_params import StructuredOutputsParams
    return {
        "plain": {},
        "penalties": dict(repetition_penalty=1.2, presence_penalty=0.3, frequency_penalty=0.1),
        "bad_words": dict(bad_words=[" the", " and", " of the"]),
        "allowed_token_ids": dict(allowed_token_ids=list(range(30, 6000))),
        # EOS masked through the whole answer: the mask matters whenever the model would stop
        "min_tokens": dict(min_tokens=max_tokens),
        "json_schema": dict(structured_outputs=StructuredOutputsParams(json=JSON_SCHEMA)),
    }


def load_prompts(name: str, n: int, tokenizer) -> list[str]:
    from tools import prompts
    if name == "json_schema":
        asks = ["Describe a fictional person as JSON with name, age, city and hobbies.",
                "Give me a JSON object for a chess player: name, age, city, hobbies.",
                "Return JSON describing a retired teacher (name, age, city, hobbies).",
                "Invent a character and output it as JSON: name, age, city, hobbies."]
        return [tokenizer.apply_chat_template([{"role": "user", "content": a}], tokenize=False,
                                              add_generation_prompt=True)
                for a in (asks * n)[:n]]
    half = n // 2
    return prompts.load("mtbench", n - half, tokenizer) + prompts.load("humaneval", half)


def run_method(name: str, args) -> list[dict]:
    """Every feature with one method, in this process (one engine)."""
    from vllm import LLM, SamplingParams

    from tools import measure
    from tools.models import model_path

    llm = LLM(model=model_path(), dtype="float32", enforce_eager=True, max_model_len=2048,
              max_num_seqs=8, seed=0, speculative_config=METHODS[name], disable_log_stats=False)
    tok = llm.get_tokenizer()
    rows = []
    measure.generate(llm, name, load_prompts("plain", 2, tok),
                     SamplingParams(temperature=0.0, max_tokens=4))   # warm-up
    for feat, kw in features(args.max_tokens).items():
        if args.features and feat not in args.features.split(","):
            continue
        ps = load_prompts(feat, args.prompts, tok)
        n_tok = max(args.max_tokens, 128) if feat == "json_schema" else args.max_tokens
        sp = SamplingParams(temperature=0.0, max_tokens=n_tok, **kw)
        r = measure.generate(llm, name, ps, sp)
        row = {"method": name, "feature": feat, "tokens": r.num_tokens, "seconds": r.seconds,
               "tokens_per_step": r.tokens_per_step if name != "vanilla" else 1.0,
               "token_ids": r.token_ids}
        if feat == "json_schema":
            row["json_valid"] = sum(_valid(t) for t in r.texts)
        rows.append(row)
        print(f"  [{name}] {feat}: {row['tokens_per_step']:.2f} tokens/step, "
              f"{r.num_tokens / r.seconds:.1f} tok/s", file=sys.stderr, flush=True)
    measure.shutdown(llm)
    return rows


def _valid(text: str) -> bool:
    try:
        obj = json.loads(text)
    except ValueError:
        return False
    props = JSON_SCHEMA["properties"]
    return (isinstance(obj, dict) and all(k in obj for k in JSON_SCHEMA["required"])
            and isinstance(obj["age"], int) and all(isinstance(obj[k], str) for k in
                                                   ("name", "city"))
            and isinstance(obj["hobbies"], list) and bool(props))


def table(rows: list[dict]) -> str:
    methods = list(dict.fromkeys(r["method"] for r in rows))
    feats = list(dict.fromkeys(r["feature"] for r in rows))
    cell = {(r["method"], r["feature"]): r for r in rows}
    out = ["| feature | " + " | ".join(methods) + " | outputs = vanilla |",
           "|---|" + "---|" * len(methods) + "---|"]
    for f in feats:
        van = cell.get(("vanilla", f))
        same = []
        for m in methods:
            r = cell.get((m, f))
            if m != "vanilla" and van is not None and r is not None:
                n = sum(a == b for a, b in zip(r["token_ids"], van["token_ids"]))
                same.append(f"{m} {n}/{len(van['token_ids'])}")
        vals = []
        for m in methods:
            r = cell.get((m, f))
            v = f"{r['tokens_per_step']:.2f}" if r else ""
            if r and "json_valid" in r:
                v += f" ({r['json_valid']}/{len(r['token_ids'])} valid JSON)"
            vals.append(v)
        out.append(f"| {f} | " + " | ".join(vals) + f" | {', '.join(same)} |")
    return "\n".join(out)


def main(argv=None) -> None:
    from tools import measure
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--prompts", type=int, default=6, help="prompts per feature (one batch)")
    ap.add_argument("--max-tokens", type=int, default=64, help="(JSON requests: at least 128)")
    ap.add_argument("--features", help="comma-separated subset of the features (default all)")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:  # child process: vLLM cannot build a second engine in one process
        print("ROWS " + json.dumps(run_method(args.one, args)), flush=True)
        return
    rows = []
    for name in args.methods.split(","):
        print(f"{name} ...", file=sys.stderr, flush=True)
        rows.extend(measure.rows_from_child(__file__, name,
                                            argv if argv is not None else sys.argv[1:]) or ())
    print(f"tokens/step per feature: fp32 greedy, {args.prompts} prompts per feature in one "
          f"batch, {args.max_tokens} new tokens\n")
    print(table(rows))


if __name__ == "__main__":
    main()
