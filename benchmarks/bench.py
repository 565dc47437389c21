"""Side-by-side benchmark: vanilla vs vLLM ngram vs lade, methods interleaved and repeated.

    .venv/bin/python benchmarks/bench.py                      # or: make bench
    .venv/bin/python benchmarks/bench.py --batches 1,32 --methods vanilla,ngram,lade --prompts 8

For every method, one engine (bf16, compiled, max_num_seqs = the largest batch) decodes MT-bench and
HumanEval prompts greedily; "batch b" submits the prompts b at a time, each wave drained before the
next (a burst: the wave ends with its slowest request, so a request that finishes early saves only
its share of the later steps). ``--queue N`` instead submits N prompts at once to an engine of
max_num_seqs b (one batch size only): the scheduler keeps the batch full from its queue, the
steady state of a loaded server, where every request's speed-up is throughput. Each repetition runs every
method once in turn (--repeat, default 3), so a slow spell of this shared machine hits all methods
alike; the table gives tokens/s min / median / max and the same-repetition ratios. Reports tokens/s,
tokens/step, speedup vs vanilla and vs ngram, step efficiency (speedup / tokens per step) and the
lade proposer's host time per step; writes a markdown table and a PNG plot under
benchmarks/results/.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # tools/: the repository's dev tooling (not installed)

for _k, _v in {"VLLM_TARGET_DEVICE": "cpu", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "VLLM_CPU_KVCACHE_SPACE": "4", "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(_k, _v)

NGRAM = {"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_min": 2,
         "prompt_lookup_max": 4}
METHODS = {
    "vanilla": None,
    "vanilla-sync": None,   # vanilla with async scheduling off, as vLLM runs every custom drafter
    "ngram": NGRAM,
    # the small ngram sweep: fewer / more draft tokens
    "ngram-k3": {**NGRAM, "num_speculative_tokens": 3},
    "ngram-k8": {**NGRAM, "num_speculative_tokens": 8, "prompt_lookup_max": 5},
    # vLLM's suffix decoding (needs arctic-inference: `make arctic` builds it into .venv/arctic)
    "suffix": {"method": "suffix"},
    "lade": "lade",                                   # defaults, adaptive policy on
    "lade-off": "lade",   # every step plain (LADE_FORCE_LEVEL=off): the plugin's own cost
    "lade-norecycle": {"method": "lade", "recycle": False},   # no recycled-successor chains
    "lade-full": {"method": "lade", "adaptive": False},   # W7/N5/G7, every step a full tree
    "lade-W2N3G2": {"method": "lade", "window_size": 2, "ngram_size": 3, "guess_set_size": 2,
                    "adaptive": False},
    "lade-W4N4G4": {"method": "lade", "window_size": 4, "ngram_size": 4, "guess_set_size": 4,
                    "adaptive": False},
    # small windows (README, "What a batch-1 step can afford"): the window and pool alone, every
    # step a tree; and the adaptive policy over them
    "lade-window-W2N3G2": {"method": "lade", "window_size": 2, "ngram_size": 3,
                           "guess_set_size": 2, "adaptive": False, "suffix_tokens": 0,
                           "recycle": False},
    "lade-window-W3N3G2": {"method": "lade", "window_size": 3, "ngram_size": 3,
                           "guess_set_size": 2, "adaptive": False, "suffix_tokens": 0,
                           "recycle": False},
    "lade-a-W2N3G2": {"method": "lade", "window_size": 2, "ngram_size": 3, "guess_set_size": 2},
    "lade-a-W3N4G3": {"method": "lade", "window_size": 3, "ngram_size": 4, "guess_set_size": 3},
}
#: engine arguments of a method besides its speculative config
ENGINE_ARGS = {"vanilla-sync": {"async_scheduling": False}}
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
ARCTIC = os.path.join(ROOT, ".venv", "arctic")   # `make arctic`: the suffix method's package


def _child_env(name: str) -> dict | None:
    """The suffix method's child gets arctic-inference on its path (no other engine sees it);
    lade-off's child forces every step plain."""
    if name == "lade-off":
        return {**os.environ, "LADE_FORCE_LEVEL": "off"}
    if name != "suffix":
        return None
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ARCTIC, env.get("PYTHONPATH")) if p)
    return env


def run_method(name: str, args) -> list[dict]:
    """All datasets and batch sizes of one method, in this process (one engine)."""
    from vllm import LLM, SamplingParams

    from tools import measure, prompts
    from tools.models import model_path

    batches = [int(b) for b in args.batches.split(",")]
    spec = METHODS[name]
    t0 = time.perf_counter()
    llm = LLM(model=model_path(), dtype=args.dtype, max_num_seqs=max(batches), max_model_len=2048,
              seed=0, speculative_config=spec, disable_log_stats=False, enforce_eager=args.eager,
              worker_extension_cls="tools.testing.ForwardCounter", **ENGINE_ARGS.get(name, {}))
    print(f"  [{name}] engine up in {time.perf_counter() - t0:.0f}s", file=sys.stderr, flush=True)
    sp = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    is_lade = isinstance(spec, str) or (isinstance(spec, dict) and spec.get("method") == "lade")
    rows = []
    for dataset in args.datasets.split(","):
        for b in batches:
            n = max(b, args.prompts) if b > 1 else args.prompts
            wave = b
            if args.queue:
                n = wave = args.queue
            ps = prompts.load(dataset, n, llm.get_tokenizer())
            measure.generate(llm, name, ps[:b], SamplingParams(temperature=0.0, max_tokens=4))
            before = llm.collective_rpc("lade_policy")[0] if is_lade else {}
            results = [measure.generate(llm, name, ps[i:i + wave], sp) for i in range(0, n, wave)]
            after = llm.collective_rpc("lade_policy")[0] if is_lade else {}
            tokens = sum(r.num_tokens for r in results)
            seconds = sum(r.seconds for r in results)
            accepted = sum(r.accepted for r in results)
            row = {"method": name, "dataset": dataset, "batch": b, "queue": args.queue,
                   "tokens": tokens,
                   "seconds": seconds, "tok_s": tokens / seconds,
                   "tokens_per_step": tokens / max(tokens - accepted, 1)}
            if b == 1:   # one request per step: seconds per engine step
                row["ms_per_step"] = 1000 * seconds / max(tokens - accepted, 1)
            if is_lade:
                host = after["stats"]["host_seconds"] - before["stats"]["host_seconds"]
                steps = after["stats"]["steps"] - before["stats"]["steps"]
                row["host_ms_per_step"] = 1000 * host / max(steps, 1)
                row["ms_per_step"] = 1000 * seconds / max(steps, 1)
                row["levels"] = [a - b_ for a, b_ in zip(after["history"], before["history"])]
                row["chain_len"] = after.get("chain_len")
                row["cost_ms"] = {k: after.get(k) for k in ("plain_ms", "chain_ms", "tree_ms")}
            rows.append(row)
            print(f"  [{name}] {dataset} batch {b}: {row['tok_s']:.1f} tok/s, "
                  f"{row['tokens_per_step']:.2f} tokens/step", file=sys.stderr, flush=True)
    measure.shutdown(llm)
    return rows


def _spread(xs: list[float]) -> str:
    xs = sorted(xs)
    return f"{xs[0]:.1f} / {statistics.median(xs):.1f} / {xs[-1]:.1f}"


def table(rows: list[dict]) -> str:
    """One line per (dataset, batch, method) over the repetitions: tok/s min / median / max, and
    the ratios to vanilla and ngram of the same repetition (methods interleaved, so each ratio
    compares runs made minutes apart), median and worst."""
    cells: dict[tuple, list[dict]] = {}
    for r in rows:
        cells.setdefault((r["dataset"], r["batch"], r["method"]), []).append(r)
    by_rep = {(r["dataset"], r["batch"], r["method"], r.get("rep", 0)): r for r in rows}

    def ratios(rs, other):
        out = [r["tok_s"] / by_rep[k]["tok_s"] for r in rs
               if (k := (r["dataset"], r["batch"], other, r.get("rep", 0))) in by_rep]
        return f"{statistics.median(out):.2f}x ({min(out):.2f}x)" if out else ""

    out = ["| dataset | batch | method | tok/s min / median / max | tokens/step | "
           "vs vanilla median (worst) | vs ngram median (worst) | ms/step (batch 1) | "
           "proposer host ms/step | lade levels off/chain/lookup/full |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for (ds, b, m), rs in sorted(cells.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        tps = statistics.median(r["tokens_per_step"] for r in rs)
        host = (f"{statistics.median(r['host_ms_per_step'] for r in rs):.2f}"
                if "host_ms_per_step" in rs[0] else "")
        levels = ("/".join(str(sum(r["levels"][i] for r in rs)) for i in range(4))
                  if "levels" in rs[0] else "")
        step = (f"{statistics.median(r['ms_per_step'] for r in rs):.1f}"
                if b == 1 and "ms_per_step" in rs[0] else "")
        out.append(f"| {ds} | {b} | {m} | {_spread([r['tok_s'] for r in rs])} | {tps:.2f} | "
                   f"{ratios(rs, 'vanilla') if m != 'vanilla' else ''} | "
                   f"{ratios(rs, 'ngram') if m not in ('vanilla', 'ngram') else ''} | "
                   f"{step} | {host} | {levels} |")
    return "\n".join(out)


def cost_curves(rows: list[dict]) -> str:
    """The step cost against tokens fed that each lade engine measured (its policy's curves:
    plain/chain steps through vLLM's kernel, tree steps through tree attention), from its last
    row, and the chain length it settled on."""
    out = []
    for r in rows:
        if "cost_ms" in r and r.get("rep", 0) == max(x.get("rep", 0) for x in rows):
            curves = "; ".join(f"{name}: " + ", ".join(f"T={t}: {ms}" for t, ms in (c or {}).items())
                               for name, c in r["cost_ms"].items())
            out.append(f"- {r['method']} {r['dataset']} batch {r['batch']} (chain length "
                       f"{r.get('chain_len')}): {curves}")
    return "\n".join(out)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    datasets = sorted({r["dataset"] for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, axes = plt.subplots(2, len(datasets), figsize=(6 * len(datasets), 8), squeeze=False)
    for j, ds in enumerate(datasets):
        base = {r["batch"]: r["tok_s"] for r in rows if r["method"] == "vanilla" and r["dataset"] == ds}
        for m in methods:
            rs = sorted((r for r in rows if r["method"] == m and r["dataset"] == ds
                         and r.get("rep", 0) == 0), key=lambda r: r["batch"])
            xs = [r["batch"] for r in rs]
            axes[0][j].plot(xs, [r["tok_s"] / base.get(r["batch"], r["tok_s"]) for r in rs],
                            marker="o", label=m)
            axes[1][j].plot(xs, [r["tokens_per_step"] for r in rs], marker="o", label=m)
        axes[0][j].set(title=f"{ds}: speedup vs vanilla", xscale="log", xlabel="batch size")
        axes[0][j].axhline(1.0, color="gray", lw=0.8)
        axes[1][j].set(title=f"{ds}: tokens per step", xscale="log", xlabel="batch size")
        axes[0][j].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main(argv=None) -> None:
    from tools import measure
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--datasets", default="mtbench,humaneval")
    ap.add_argument("--batches", default="1,4,16,32")
    ap.add_argument("--prompts", type=int, default=6, help="prompts per batch-1 run (and minimum)")
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--eager", action="store_true",
                    help="enforce_eager engines (no torch.compile: faster starts, slower steps)")
    ap.add_argument("--repeat", type=int, default=3,
                    help="repetitions; each runs every method once, in order (interleaved)")
    ap.add_argument("--queue", type=int, default=0, metavar="N",
                    help="submit N prompts at once per cell (the batch kept full from the "
                         "scheduler's queue) instead of waves of b; needs a single --batches value")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.queue and "," in args.batches:
        ap.error("--queue needs a single --batches value (the engine's max_num_seqs)")
    if args.one:  # child process: vLLM cannot build a second engine in one process
        print("ROWS " + json.dumps(run_method(args.one, args)), flush=True)
        return
    methods = args.methods.split(",")
    if "suffix" in methods and not os.path.exists(os.path.join(ARCTIC, ".built")):
        print("suffix: skipped (arctic-inference not built: run `make arctic`)", file=sys.stderr)
        methods.remove("suffix")
    if "vanilla" not in methods:
        methods.insert(0, "vanilla")
    rows = []
    for rep in range(args.repeat):
        for k, name in enumerate(methods, 1):
            print(f"[rep {rep + 1}/{args.repeat}, {k}/{len(methods)}] {name} ...",
                  file=sys.stderr, flush=True)
            got = measure.rows_from_child(__file__, name,
                                          argv if argv is not None else sys.argv[1:],
                                          env=_child_env(name))
            rows.extend({**r, "rep": rep} for r in got or ())
    import torch
    import vllm
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M")
    os.makedirs(RESULTS, exist_ok=True)
    mode = f"{args.queue} prompts queued at once" if args.queue else "waves of b prompts"
    head = (f"bench {stamp} UTC: {args.dtype}, greedy, {args.max_tokens} new tokens, {mode}, "
            f"vllm {vllm.__version__}, torch {torch.__version__}, {platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} CPUs; load average at end {os.getloadavg()[0]:.1f}")
    md = head + "\n\n" + table(rows) + "\n"
    curves = cost_curves(rows)
    if curves:
        md += "\nlade step cost (ms) against tokens fed T, as its policy measured it:\n" + curves + "\n"
    md_path = os.path.join(RESULTS, f"bench-{stamp}.md")
    with open(md_path, "w") as f:
        f.write(md)
    with open(md_path[:-3] + ".json", "w") as f:
        json.dump(rows, f, indent=1)
    png = md_path[:-3] + ".png"
    plot(rows, png)
    print(md)
    print(f"wrote {md_path} and {png}")


if __name__ == "__main__":
    main()
