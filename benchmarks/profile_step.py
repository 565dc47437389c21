"""Where a decoding step's time goes, per method, measured in one process.

Runs the engine in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0) and wraps the runner's phases with
wall-clock timers, then prints milliseconds per engine step for each phase:

    .venv/bin/python benchmarks/profile_step.py [--methods vanilla,ngram,lade] [--batch 1]

Methods: tools.demo's (vanilla, ngram, lade) and vanilla-sync (vanilla with async scheduling off,
as vLLM runs every custom drafter: the baseline for lade's own cost on plain steps, ``--level off``).

Phases (vLLM 0.32 GPUModelRunner, nested ones indented):
  execute_model      whole forward part of a step (inputs + model)
    prepare_inputs   _prepare_inputs
      lade_before_forward  LadeRunnerAdapter.before_forward (positions, tree masks)
    model_forward    _model_forward (all layers, attention included)
      attention      the attention backend's forward, summed over layers
  sample_tokens      sampler/verification, bookkeeping and the next proposal
    sample           _sample (vLLM's RejectionSampler + lade verify)
      lade_verify    LadeRunnerAdapter.verify (tree verification, pool/window update, KV move)
    lade_propose     LadeRunnerAdapter.propose (pool lookup, window, tree build)

``--cprofile PREFIX`` also profiles lade's three hooks (cProfile, only while they run);
``--functions`` times lade's main host functions inside them (wall clock, no profiler overhead).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import defaultdict

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
for _k, _v in {"VLLM_TARGET_DEVICE": "cpu", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "VLLM_CPU_KVCACHE_SPACE": "2", "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(_k, _v)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # tools/: the repository's dev tooling (not installed)

TIMES: dict[str, float] = defaultdict(float)
CALLS: dict[str, int] = defaultdict(int)
ACTIVE: dict[str, bool] = defaultdict(bool)
PROFILER = None   # cProfile.Profile over lade's hooks only (--cprofile)


def _timed(cls, attr: str, name: str) -> None:
    original = getattr(cls, attr)

    profiled = name.startswith("lade_")

    def wrapper(*args, **kwargs):
        if ACTIVE[name]:   # nested (lade's attention forward calls vLLM's): timed once, outside
            return original(*args, **kwargs)
        ACTIVE[name] = True
        t = time.perf_counter()
        if profiled and PROFILER is not None:
            PROFILER.enable()
        try:
            return original(*args, **kwargs)
        finally:
            if profiled and PROFILER is not None:
                PROFILER.disable()
            TIMES[name] += time.perf_counter() - t
            CALLS[name] += 1
            ACTIVE[name] = False

    setattr(cls, attr, wrapper)


def _count_fed(cls) -> None:
    """Tokens fed per step (the scheduler's total scheduled tokens), summed in TIMES["fed"]."""
    original = cls.execute_model

    def wrapper(self, scheduler_output, *args, **kwargs):
        TIMES["fed"] += scheduler_output.total_num_scheduled_tokens
        return original(self, scheduler_output, *args, **kwargs)

    cls.execute_model = wrapper


def instrument() -> None:
    import lade_vllm  # noqa: F401  (applies the patch records first; timers wrap them)
    from lade_vllm.adapter.runner import LadeRunnerAdapter
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from lade_vllm.attention.cpu_tree import LadeCPUAttentionImpl
    lade_vllm.register()
    for attr, name in [("execute_model", "execute_model"), ("_prepare_inputs", "prepare_inputs"),
                       ("_model_forward", "model_forward"), ("sample_tokens", "sample_tokens"),
                       ("_sample", "sample")]:
        _timed(GPUModelRunner, attr, name)
    _count_fed(GPUModelRunner)
    _timed(CPUAttentionBackendImpl, "forward", "attention")
    _timed(LadeCPUAttentionImpl, "forward", "attention")
    _timed(LadeRunnerAdapter, "verify", "lade_verify")
    _timed(LadeRunnerAdapter, "propose", "lade_propose")
    _timed(LadeRunnerAdapter, "before_forward", "lade_before_forward")


ORDER = ["execute_model", "prepare_inputs", "lade_before_forward", "model_forward", "attention",
         "sample_tokens", "sample", "lade_verify", "lade_propose"]

#: ``--functions``: lade's host work inside the hooks, one timer each (module, class or None,
#: attribute); functions imported by name are timed where they are called
FUNCTIONS = [
    ("lade_vllm.engine", "LadeEngine", "propose"), ("lade_vllm.engine", "LadeEngine", "plan"),
    ("lade_vllm.engine", "LadeEngine", "_lade_rows"), ("lade_vllm.engine", "LadeEngine", "_build"),
    ("lade_vllm.policy", "AdaptivePolicy", "choose"),
    ("lade_vllm.policy", "AdaptivePolicy", "observe_step"),
    ("lade_vllm.proposer.state", "LookaheadState", "suffix_match"),
    ("lade_vllm.proposer.state", "LookaheadState", "propose"),
    ("lade_vllm.proposer.state", "LookaheadState", "commit"),
    ("lade_vllm.proposer.recycle", "Recycler", "committed"),
    ("lade_vllm.chain_step", "ShadowChains", "report"),
    ("lade_vllm.chain_step", "ShadowChains", "record"),
    ("lade_vllm.verify_step", "StepVerifier", "accept"),
    ("lade_vllm.engine", None, "propose_chains"), ("lade_vllm.engine", None, "storage_order"),
    ("lade_vllm.adapter.runner", None, "node_targets"),
]


def instrument_functions() -> list[str]:
    """Wall timers on FUNCTIONS (named ``<class or module>.<attribute>``); returns the names."""
    import importlib
    names = []
    for module, cls, attr in FUNCTIONS:
        mod = importlib.import_module(module)
        name = f"{cls or module.rsplit('.', 1)[1]}.{attr}"
        if cls is not None:
            _timed(getattr(mod, cls), attr, name)
        else:
            original = getattr(mod, attr)

            def wrapper(*args, _f=original, _name=name, **kwargs):
                t = time.perf_counter()
                try:
                    return _f(*args, **kwargs)
                finally:
                    TIMES[_name] += time.perf_counter() - t
                    CALLS[_name] += 1
            setattr(mod, attr, wrapper)
        names.append(name)
    return names
INDENT = {"prepare_inputs": 1, "lade_before_forward": 2, "model_forward": 1, "attention": 2,
          "sample": 1, "lade_verify": 2, "lade_propose": 1}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--methods", default="vanilla,ngram,lade")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--dataset", default="mtbench", choices=["mtbench", "humaneval"])
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--eager", action="store_true", help="enforce_eager (no torch.compile)")
    ap.add_argument("--level", choices=["off", "chain", "lookup", "full"],
                    help="force the adaptive policy's level every step (lade methods)")
    ap.add_argument("--spec", help="JSON speculative config overriding the method's")
    ap.add_argument("--full", action="store_true",
                    help="lade methods build trees every step (adaptive policy off)")
    ap.add_argument("--cprofile", metavar="PREFIX",
                    help="write a cProfile of lade's hooks (propose, before_forward, verify) per "
                         "method to PREFIX-<method>.pstats and print its top functions")
    ap.add_argument("--functions", action="store_true",
                    help="also time lade's host functions inside the hooks (FUNCTIONS), ms per "
                         "engine step each")
    ap.add_argument("--causal-trees", action="store_true",
                    help="timing only, outputs wrong: tree steps run vLLM's causal kernel (no tree "
                         "layout), i.e. a chain step of the same tokens; compare with a run "
                         "without it for a tree step's cost over an equal-token chain step")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        print("RESULT " + json.dumps(_profile_one(args)), flush=True)
        return
    rows = []
    for name in args.methods.split(","):
        cmd = [sys.executable, __file__, "--one", name] + [
            a for a in (argv if argv is not None else sys.argv[1:])]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if args.cprofile:
            print(proc.stderr[proc.stderr.find("   Ordered by"):][:6000])
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode or not line:
            sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
        r = json.loads(line[-1][7:])
        rows.append((name, r, r["per"]))
        print(f"{name}: {r['tok_s']:.1f} tok/s, {r['tokens_per_step']:.2f} tokens/step, "
              f"{r['steps']} steps", flush=True)

    print(f"\nms per engine step ({args.dtype}, max_num_seqs={args.batch}, "
          f"{'eager' if args.eager else 'compiled'})")
    print(f"{'phase':<24}" + "".join(f"{n:>12}" for n, *_ in rows))
    for k in ["step"] + ORDER:
        label = "  " * INDENT.get(k, 0) + k
        print(f"{label:<24}" + "".join(f"{per[k]:>12.2f}" for *_, per in rows))
    print(f"{'tokens/step':<24}" + "".join(f"{r['tokens_per_step']:>12.2f}" for _, r, _ in rows))
    print(f"{'tokens fed/step':<24}" + "".join(f"{r['fed_per_step']:>12.1f}" for _, r, _ in rows))
    print(f"{'levels o/c/l/f':<24}" + "".join(
        f"{'/'.join(map(str, r.get('levels', []))) or '-':>12}" for _, r, _ in rows))
    print(f"{'tok/s':<24}" + "".join(f"{r['tok_s']:>12.1f}" for _, r, _ in rows))
    if args.functions:
        print("\nlade host functions, ms per engine step (calls)")
        for _, r, per in rows:
            for k, (ms, calls) in r.get("functions", {}).items():
                print(f"  {k:<30}{ms:>8.3f}  ({calls})")


def _profile_one(args) -> dict:
    """One method in this process (vLLM cannot build a second in-process engine)."""
    instrument()
    functions = instrument_functions() if args.functions and args.one.startswith("lade") else []
    from vllm import LLM, SamplingParams

    from tools import measure, prompts
    from tools.demo import METHODS
    from tools.models import model_path

    name = args.one
    # vanilla-sync: vanilla with async scheduling off, as vLLM runs every custom drafter
    spec = None if name == "vanilla-sync" else METHODS[name]
    engine_args = {"async_scheduling": False} if name == "vanilla-sync" else {}
    if args.spec:
        spec = json.loads(args.spec)
    if args.level:
        os.environ["LADE_FORCE_LEVEL"] = args.level   # read when lade_vllm.engine builds its policy
    if args.causal_trees:   # the adapter publishes no tree layout: every row causal
        from lade_vllm.adapter import runner as lade_runner
        publish = lade_runner.set_step_layout
        lade_runner.set_step_layout = lambda layout: publish(None)
    if args.full and spec is not None and "lade" in str(spec):
        spec = {**({"method": "lade"} if spec == "lade" else spec), "adaptive": False}
    llm = LLM(model=model_path(), dtype=args.dtype, max_num_seqs=args.batch,
              max_model_len=2048, seed=0, speculative_config=spec,
              disable_log_stats=False, enforce_eager=args.eager,
              worker_extension_cls="tools.testing.ForwardCounter", **engine_args)
    ps = prompts.load(args.dataset, args.prompts, llm.get_tokenizer())
    measure.generate(llm, name, ps[:1], SamplingParams(temperature=0.0, max_tokens=8))
    TIMES.clear()
    CALLS.clear()
    global PROFILER
    if args.cprofile and name.startswith("lade"):   # the hooks profiled are lade's
        import cProfile
        PROFILER = cProfile.Profile()
    res = measure.generate(llm, name, ps, SamplingParams(temperature=0.0, max_tokens=args.max_tokens))
    if PROFILER is not None:
        import pstats
        path = f"{args.cprofile}-{name}.pstats"
        PROFILER.dump_stats(path)
        pstats.Stats(path, stream=sys.stderr).sort_stats("tottime").print_stats(25)
    steps = max(CALLS["execute_model"], 1)
    per = {k: 1000 * TIMES[k] / steps for k in ORDER}
    per["step"] = 1000 * res.seconds / steps
    out = {"per": per, "steps": steps, "tok_s": res.tokens_per_s,
           "tokens_per_step": res.tokens_per_step, "fed_per_step": TIMES["fed"] / steps,
           "functions": {k: (1000 * TIMES[k] / steps, CALLS[k]) for k in functions}}
    policy = llm.collective_rpc("lade_policy")[0]
    if policy:
        out["levels"] = policy["history"]
    return out


if __name__ == "__main__":
    main()
