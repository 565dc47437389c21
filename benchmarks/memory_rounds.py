"""Memory of a long-running server, round by round: vanilla and lade side by side.

Each method gets its own `vllm serve` (float32, eager, a KV cache small enough to preempt) and
ROUNDS rounds of the same mixed streaming traffic (tools.traffic: finished, aborted mid-stream,
lade off or a smaller tree per request, seeded sampling). After each round the server is
waited idle and the resident memory of the API server and the engine core is read, with lade's
per-request structures (tools.testing.ForwardCounter.lade_state_sizes).

    .venv/bin/python benchmarks/memory_rounds.py --rounds 10 --requests 40
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

for _k, _v in {"VLLM_TARGET_DEVICE": "cpu", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "VLLM_CPU_KVCACHE_SPACE": "2", "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(_k, _v)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools import prompts  # noqa: E402
from tools.models import model_path  # noqa: E402
from tools.server import Server  # noqa: E402
from tools.traffic import make_jobs, run_jobs  # noqa: E402

MIB = 2**20
SERVER_ARGS = ["--dtype", "float32", "--enforce-eager", "--seed", "0", "--max-model-len", "1024",
               "--max-num-seqs", "8", "--num-gpu-blocks-override", "12",
               "--worker-extension-cls", "tools.testing.ForwardCounter"]
SPECS = {"vanilla": [], "lade": ["--speculative-config", "lade"],
         "ngram": ["--speculative-config", '{"method": "ngram", "num_speculative_tokens": 5, '
                   '"prompt_lookup_min": 2, "prompt_lookup_max": 4}']}


def rounds(method: str, n_rounds: int, n_requests: int, clients: int, texts: list[str],
           log_dir: Path, trim: bool = False) -> list[dict]:
    """One row per round: RSS (MiB) of the API server and the engine core, lade state sizes."""
    rows = []
    with Server(model_path(), [*SERVER_ARGS, *SPECS[method]], log_dir / f"{method}.log",
                env={"VLLM_SERVER_DEV_MODE": "1"}) as server:
        for r in range(n_rounds):
            t0 = time.time()
            jobs = make_jobs(n_requests, seed=r, num_prompts=len(texts), sampled_fraction=0.2)
            results = run_jobs(server, texts, jobs, clients)
            errors = [x for x in results if x.status == "error"]
            if errors:
                raise RuntimeError(f"{method} round {r}: {len(errors)} errors: {errors[0].error}")
            server.wait_idle()
            time.sleep(1.0)
            rss = server.rss_by_process()
            engine = sum(v for k, v in rss.items() if k != "api")
            sizes = server.collective_rpc("lade_state_sizes")[0]
            heap = server.collective_rpc("lade_heap", trim=trim)[0]
            rows.append({"round": r + 1, "api_mib": round(rss["api"] / MIB, 1),
                         "engine_mib": round(engine / MIB, 1),
                         **{f"{k}_mib": round(v / MIB, 1) for k, v in rss.items() if k != "api"},
                         "seconds": round(time.time() - t0, 1),
                         "preemptions": int(server.metric("vllm:num_preemptions")),
                         **{f"worker_{k}": v if isinstance(v, dict) else round(v, 1)
                            for k, v in heap.items()}, **sizes})
            print(f"{method} {json.dumps(rows[-1])}", flush=True)
    return rows


def table(results: dict[str, list[dict]]) -> str:
    methods = list(results)
    head = "| round | " + " | ".join(f"{m} api MiB | {m} engine MiB" for m in methods) + " |"
    lines = [head, "|" + "---|" * (1 + 2 * len(methods))]
    for i in range(len(results[methods[0]])):
        cells = [f"{results[m][i]['api_mib']:.0f} | {results[m][i]['engine_mib']:.0f}"
                 for m in methods]
        lines.append(f"| {i + 1} | " + " | ".join(cells) + " |")
    for m in methods:
        rs = results[m]
        if len(rs) >= 3:
            tot = [x["api_mib"] + x["engine_mib"] for x in rs]
            lines.append(f"\n{m}: total {tot[0]:.0f} -> {tot[-1]:.0f} MiB; round 3 -> "
                         f"{len(rs)}: {tot[-1] - tot[2]:+.0f} MiB")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", default="vanilla,lade")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=10)
    ap.add_argument("--trim", action="store_true",
                    help="call malloc_trim(0) in the worker after each round (allocator check)")
    args = ap.parse_args()
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model_path())
    half = args.prompts // 2
    texts = prompts.load("mtbench", half, tok) + prompts.load("humaneval", args.prompts - half)
    log_dir = Path(tempfile.mkdtemp(prefix="lade-memory-"))
    results = {m: rounds(m, args.rounds, args.requests, args.clients, texts, log_dir, args.trim)
               for m in args.methods.split(",")}
    out = table(results)
    print(out)
    stamp = time.strftime("%Y%m%d-%H%M")
    dest = Path(__file__).resolve().parent / "results" / f"memory-{stamp}.md"
    dest.write_text(f"# memory per round ({vars(args)})\n\n{out}\n\n```\n"
                    + json.dumps(results, indent=1) + "\n```\n")
    print(f"wrote {dest} (server logs in {log_dir})")


if __name__ == "__main__":
    main()
