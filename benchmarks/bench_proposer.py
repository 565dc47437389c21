"""Host time of one lookahead step's proposer work (no model forward).

    python benchmarks/bench_proposer.py [--threads 1] [--steps 300] [--breakdown]
    python benchmarks/bench_proposer.py --settings 3,4,3 7,5,7 --batches 1 8 32

Per step: pool lookup + tree build + (stand-in targets) + verify + window update/harvest + pool
insert, via ``LookaheadState.propose`` / ``commit``. State is realistic: tokens come from a small
"active" vocabulary so that keys repeat and the pools are populated (most keys hold G candidates).
Reports the median over the timed steps after warm-up steps, for B=1 and B=64 at W=15, N=5, G=15
(``--settings W,N,G ...`` and ``--batches`` for others), with the K=8 context suffix match
(``--suffix``, 0 = off). ``--device cuda`` keeps the proposer's tensors on the GPU and synchronizes
around each timed part, so the time is host + device.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from lade_vllm.proposer import LookaheadState
from lade_vllm.proposer import state as state_mod

PHASES: dict[str, list[float]] = {}


def timed(name, fn):
    """Wrap ``fn`` to accumulate its wall time under ``name`` (for the per-phase breakdown)."""
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        PHASES.setdefault(name, []).append(time.perf_counter() - t0)
        return out
    return wrapper


def install_phase_timers(state: LookaheadState) -> None:
    state.pool.lookup = timed("pool.lookup", state.pool.lookup)
    state.pool.insert = timed("pool.insert", state.pool.insert)
    state.windows.update = timed("windows.update", state.windows.update)
    state_mod.build_step_trees = timed("build_step_trees", state_mod.build_step_trees)
    state_mod.verify_tree = timed("verify_tree", state_mod.verify_tree)


def bench(batch: int, W: int, N: int, G: int, steps: int, warmup: int, active_vocab: int,
          pool_from_prompt: bool, seed: int = 0, breakdown: bool = False,
          suffix: int = 0, device: str = "cpu") -> dict:
    gen = torch.Generator().manual_seed(seed)
    state = LookaheadState(max(batch, 1), W, N, G, pool_from_prompt=pool_from_prompt,
                           suffix_tokens=suffix, device=device)
    sync = torch.cuda.synchronize if state.device.type == "cuda" else (lambda: None)
    if breakdown:
        install_phase_timers(state)
    slots = torch.arange(batch, device=device)
    # committed tokens per sequence (the engine reads them from vLLM's token table, untimed)
    contexts = []
    for s in range(batch):
        prompt = torch.randint(active_vocab, (256,), generator=gen)
        state.start(s, prompt, seed=s)
        contexts.append(prompt.numpy())
    last = torch.from_numpy(np.array([c[-1] for c in contexts])).to(device)
    times, nodes, cands, emitted = [], [], [], []
    for step in range(warmup + steps):
        sync()
        t0 = time.perf_counter()
        tree = state.propose(slots, last, contexts=contexts if suffix else None)
        sync()
        t1 = time.perf_counter()
        # stand-in for the model: random targets from the active vocabulary (not timed)
        target = torch.randint(active_vocab, (tree.total_nodes,), generator=gen).to(device)
        sync()
        t2 = time.perf_counter()
        result = state.commit(slots, tree, target)
        last = result.emitted.gather(1, (result.num_emitted - 1)[:, None])[:, 0]
        sync()
        t3 = time.perf_counter()
        for b, (em, n) in enumerate(zip(result.emitted.tolist(), result.num_emitted.tolist())):
            contexts[b] = np.concatenate([contexts[b], np.array(em[:n], dtype=np.int64)])
        if step == warmup:
            PHASES.clear()
        if step >= warmup:
            times.append((t1 - t0) + (t3 - t2))
            nodes.append(tree.total_nodes / batch)
            cands.append(int(tree.is_trie.sum()) / batch)
            emitted.append(float(result.num_emitted.float().mean()))
    return {
        "B": batch, "median_ms": 1e3 * statistics.median(times),
        "p90_ms": 1e3 * sorted(times)[int(0.9 * len(times))],
        "nodes_per_seq": statistics.mean(nodes), "trie_nodes_per_seq": statistics.mean(cands),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--window", type=int, default=15)
    ap.add_argument("--ngram", type=int, default=5)
    ap.add_argument("--guess", type=int, default=15)
    ap.add_argument("--settings", nargs="+", default=None, metavar="W,N,G",
                    help="several (W, N, G) settings, overriding --window/--ngram/--guess")
    ap.add_argument("--active-vocab", type=int, default=64)
    ap.add_argument("--suffix", type=int, default=8,
                    help="suffix_tokens K: the context suffix-match candidate (0 = off)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--device", default="cpu",
                    help="where the proposer's tensors live (cuda: host + device time, synchronized)")
    ap.add_argument("--breakdown", action="store_true",
                    help="also print the median time of each phase (adds timer overhead)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    settings = [tuple(int(x) for x in s.split(",")) for s in args.settings] if args.settings \
        else [(args.window, args.ngram, args.guess)]
    for W, N, G in settings:
        print(f"torch {torch.__version__}, threads={torch.get_num_threads()}, W={W} N={N} G={G} "
              f"K={args.suffix}, "
              f"{args.device}, median over {args.steps} steps after {args.warmup}")
        for pfp in (False, True):
            for b in args.batches:
                r = bench(b, W, N, G, args.steps, args.warmup, args.active_vocab, pfp,
                          breakdown=args.breakdown, suffix=args.suffix, device=args.device)
                print(f"B={r['B']:3d} pool_from_prompt={int(pfp)}: median {r['median_ms']:.3f} "
                      f"ms/step (p90 {r['p90_ms']:.3f}), {r['nodes_per_seq']:.1f} nodes/seq "
                      f"({r['trie_nodes_per_seq']:.1f} trie)")
                if args.breakdown:
                    print("    " + ", ".join(f"{k} {1e3 * statistics.median(v):.3f}"
                                             for k, v in PHASES.items()))
                    PHASES.clear()


if __name__ == "__main__":
    main()
