"""Replay recorded greedy outputs through lade's step engine and policy: no model, no noise.

    .venv/bin/python benchmarks/replay.py --record      # vanilla fp32 greedy outputs (~4 min)
    .venv/bin/python benchmarks/replay.py [--cost 0.03] [--seeds 3]

``--record`` decodes MT-bench and HumanEval prompts (``--prompts`` of each) greedily in float32
with vanilla vLLM and saves prompt and output token ids under benchmarks/results/. Replaying runs
the real :class:`LadeEngine` (proposer, chains, adaptive policy; batch 1) over them: a node's
target is the recorded next token when the node's path is the recorded continuation (what the
model returns there: fp32 greedy lade equals vanilla) and -1 elsewhere, so chain and trie
acceptance are exact; window rows get no real targets, so LOOKUP and FULL are undervalued. Each
step takes ``1 + cost * (T - 1)`` time units for T tokens fed (``TREE_FACTOR`` times that with tree
attention), times lognormal noise, and the policy is fed that as the step's time. vLLM's ngram
(k=5, matches of 2-4 tokens, earliest occurrence) is replayed the same way, and lade with and
without recycled successors (``recycle``). Hundreds of prompts
compare candidate sources and policies in seconds, without this machine's run-to-run drift.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

RESULTS = os.path.join(ROOT, "benchmarks", "results")
TREE_FACTOR = float(os.environ.get("REPLAY_TREE_FACTOR", "1.8"))  # tree step cost / plain step
UNIT = 0.06           # seconds per time unit handed to the policy (a batch-1 step on this CPU)


def record(path: str, prompts_each: int, max_tokens: int) -> None:
    for k, v in {"VLLM_TARGET_DEVICE": "cpu", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                 "VLLM_CPU_KVCACHE_SPACE": "4", "TOKENIZERS_PARALLELISM": "false"}.items():
        os.environ.setdefault(k, v)
    from vllm import LLM, SamplingParams

    from tools import prompts
    from tools.models import model_path
    llm = LLM(model=model_path(), dtype="float32", max_num_seqs=16, max_model_len=2048, seed=0,
              enforce_eager=True)
    out = {}
    for ds in ("mtbench", "humaneval"):
        ps = prompts.load(ds, prompts_each, llm.get_tokenizer())
        res = llm.generate(ps, SamplingParams(temperature=0.0, max_tokens=max_tokens))
        out[ds] = [(list(r.prompt_token_ids), list(r.outputs[0].token_ids)) for r in res]
    os.makedirs(RESULTS, exist_ok=True)
    with open(path, "w") as f:
        json.dump(out, f)
    print(f"recorded {path}")


def ngram_drafts(ctx: list[int], k: int = 5, lo: int = 2, hi: int = 4) -> list[int]:
    """vLLM's prompt lookup: the longest suffix of 2-4 tokens seen before, its earliest
    occurrence, the k tokens after it."""
    L = len(ctx)
    for n in range(min(hi, L - 1), lo - 1, -1):
        suffix = ctx[L - n:]
        for s in range(0, L - n):
            if ctx[s:s + n] == suffix:
                return ctx[s + n:s + n + k]
    return []


def replay_ngram(data, cost: float) -> tuple[float, float]:
    steps = tokens = units = 0.0
    for prompt, out in data:
        ctx, t = list(prompt) + out[:1], 1
        while t < len(out):
            drafts = ngram_drafts(ctx)
            a = 0
            while a < len(drafts) and t + a < len(out) and drafts[a] == out[t + a]:
                a += 1
            adv = min(a + 1, len(out) - t)
            ctx += out[t:t + adv]
            t += adv
            steps, tokens, units = steps + 1, tokens + adv, units + 1 + cost * len(drafts)
    return tokens / steps, tokens / units


def replay_lade(data, cost: float, seed: int, config=None) -> tuple[float, float, list[int]]:
    import lade_vllm.engine as engine_mod
    from lade_vllm.config import LadeConfig
    from lade_vllm.engine import LadeEngine, ProposeBatch, RequestInfo, ScheduledBatch

    rng = random.Random(seed)
    clock = [0.0]
    real_clock = engine_mod.time.perf_counter
    engine_mod.time.perf_counter = lambda: clock[0]   # the policy times steps by this clock
    try:
        vocab = 1 + max(max(max(p), max(o)) for p, o in data)
        eng = LadeEngine(config or LadeConfig(), max_seqs=2, vocab_size=vocab)
        steps = tokens = units = 0.0
        for i, (prompt, out) in enumerate(data):
            rid, full = f"r{i}", np.array(list(prompt) + list(out), dtype=np.int64)[None, :]
            num, t = len(prompt) + 1, 1           # the prefill step emitted out[0]
            while t < len(out):
                batch = ProposeBatch([rid], [[out[t - 1]]], np.array([num]), full, {rid}, 1,
                                     lambda r: RequestInfo(True))
                drafts = eng.propose(batch)[0]
                fed = 1 + len(drafts)
                ctx = eng.plan(ScheduledBatch(
                    total_tokens=fed, finished=[], index_of={rid: 0},
                    drafts={rid: drafts} if drafts else {}, num_scheduled={rid: fed},
                    query_start=np.array([0]), num_computed=np.array([num - 1])))
                adv = 1
                if ctx.plan is not None:
                    v = eng.take_plan()
                    target = [out[t + len(p)] if t + len(p) < len(out)
                              and p == out[t:t + len(p)] else -1 for p in eng.node_paths(v)]
                    acc = eng.accept(v, torch.tensor(target),
                                     torch.zeros(len(target), dtype=torch.bool),
                                     eng.acceptance_rows(v))
                    adv = len([x for x in acc.emitted[0] if x >= 0])
                adv = max(1, min(adv, len(out) - t))
                step = (1 + cost * (fed - 1)) * (TREE_FACTOR if ctx.tree else 1.0)
                clock[0] += UNIT * step * rng.lognormvariate(0.0, 0.2)
                steps, tokens, units = steps + 1, tokens + adv, units + step
                t, num = t + adv, num + adv
            eng.release([rid])
        return tokens / steps, tokens / units, list(eng.policy.history)
    finally:
        engine_mod.time.perf_counter = real_clock


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--record", action="store_true", help="record the greedy outputs first")
    ap.add_argument("--prompts", type=int, default=80, help="prompts of each set (recording)")
    ap.add_argument("--max-tokens", type=int, default=128, help="new tokens (recording)")
    ap.add_argument("--cost", type=float, default=0.03, help="step cost per extra token fed")
    ap.add_argument("--seeds", type=int, default=3, help="noise seeds for the lade replay")
    args = ap.parse_args(argv)
    path = os.path.join(RESULTS, f"greedy-{args.prompts}x{args.max_tokens}.json")
    if args.record or not os.path.exists(path):
        record(path, args.prompts, args.max_tokens)
    with open(path) as f:
        data = json.load(f)
    print(f"replay of {path}, step cost 1 + {args.cost} per extra token "
          f"(x{TREE_FACTOR} with tree attention); throughput relative to plain decoding")
    print("set        method  tokens/step  throughput (min / median / max over seeds)  levels")
    for ds, runs in data.items():
        ts, speed = replay_ngram(runs, args.cost)
        print(f"{ds:10s} ngram   {ts:11.3f}  {speed:.3f}")
        from lade_vllm.config import LadeConfig
        for name, cfg in (("lade", LadeConfig()), ("norecycle", LadeConfig(recycle=False))):
            res = [replay_lade(runs, args.cost, seed, cfg) for seed in range(args.seeds)]
            speeds = sorted(r[1] for r in res)
            print(f"{ds:10s} {name:9s} {res[0][0]:9.3f}  {speeds[0]:.3f} / "
                  f"{speeds[len(speeds) // 2]:.3f} / {speeds[-1]:.3f}  {res[0][2]}")


if __name__ == "__main__":
    main()
