"""Instrumentation for tests: a vLLM worker extension that counts model forwards per engine step.

    LLM(..., worker_extension_cls="tools.testing.ForwardCounter")
    llm.collective_rpc("lade_count_forwards")      # install counters
    ... generate ...
    llm.collective_rpc("lade_forward_counts")      # -> [{"steps": .., "per_step": {..}, ...}]

vLLM imports the class by name in its engine processes, so the repository root must be on their
path: pytest puts it on sys.path (pyproject's ``pythonpath``), which vLLM's engine processes
inherit, and tools.server puts it on a server subprocess's PYTHONPATH.
"""
from __future__ import annotations

import collections
import functools


class ForwardCounter:
    """Mixed into vLLM's worker class (``ParallelConfig.worker_extension_cls``)."""

    def lade_count_forwards(self) -> bool:
        runner = self.model_runner
        model = runner.model
        counts = {"forwards": 0, "per_step": collections.Counter(), "tree_steps": 0, "steps": 0}
        self._lade_counts = counts
        original_forward = model.forward
        original_execute = runner.execute_model

        @functools.wraps(original_forward)
        def forward(*args, **kwargs):
            counts["forwards"] += 1
            return original_forward(*args, **kwargs)

        @functools.wraps(original_execute)
        def execute_model(scheduler_output, *args, **kwargs):
            before = counts["forwards"]
            out = original_execute(scheduler_output, *args, **kwargs)
            if scheduler_output.total_num_scheduled_tokens > 0:
                counts["steps"] += 1
                counts["per_step"][counts["forwards"] - before] += 1
                driver = getattr(runner, "lade_driver", None)
                if driver is not None and driver.plan is not None:
                    counts["tree_steps"] += 1
            return out

        model.forward = forward
        runner.execute_model = execute_model
        return True

    def lade_forward_counts(self) -> dict:
        c = self._lade_counts
        return {"forwards": c["forwards"], "steps": c["steps"], "tree_steps": c["tree_steps"],
                "per_step": dict(c["per_step"])}

    def lade_live_slots(self) -> int:
        """Requests holding lookahead state (pool + window) in this worker."""
        driver = getattr(self.model_runner, "lade_driver", None)
        return -1 if driver is None else len(driver.slot_of)

    def lade_policy(self) -> dict:
        """Adaptive policy state: steps per level and current estimates."""
        driver = getattr(self.model_runner, "lade_driver", None)
        if driver is None:
            return {}
        pol = driver.policy
        # step cost against tokens fed: per bucket, where its samples lie -> robust mean ms
        costs = {name: {round(m.RATIO ** e.x, 1): round(e.value * 1000, 2)
                        for _, e in sorted(m.buckets.items())}
                 for name, m in (("plain_ms", pol.cost_plain), ("chain_ms", pol.cost_chain),
                                  ("tree_ms", pol.cost_tree))}
        return {"stats": dict(driver.stats), "history": list(pol.history),
                "tokens": [e.value for e in pol.tokens], "nodes": [e.value for e in pol.nodes],
                # per level: its tokens estimate comes from observed steps (not the prior)
                "measured": [e.measured for e in pol.tokens],
                "chain_len": pol.best_chain, "chain_lens": list(pol.best), **costs}

    def lade_state_sizes(self) -> dict:
        """Sizes of every lade structure that could grow with traffic: per-request maps (slots,
        request infos), the policy's cost buckets and sample windows, module caches. A server at
        rest after any traffic must report the idle values (0 requests; bounded caches)."""
        driver = getattr(self.model_runner, "lade_driver", None)
        if driver is None:
            return {}
        from lade_vllm.attention import kv_layout
        from lade_vllm.proposer import tree
        engine, pol = driver.engine, driver.policy
        buckets = [b for m in (pol.cost_plain, pol.cost_chain, pol.cost_tree)
                   for b in m.buckets.values()]
        return {"slots": len(engine.slot_of), "request_infos": len(engine.requests),
                "free_slots": len(engine.free_slots), "capacity": engine.state.max_seqs,
                "capped_slots": len(engine.capped_slots),
                "cost_buckets": len(buckets),
                "cost_samples": sum(len(b.samples.items) for b in buckets),
                "level_samples": sum(len(e.samples.items) for e in (*pol.tokens, *pol.nodes)),
                "batch_consts": sum(len(v[2]) + 1 for v in tree._BATCH_CONSTS.values()),
                "shape_consts": tree._shape_consts.cache_info().currsize,
                "kv_layouts": sum(f.cache_info().currsize for f in vars(kv_layout).values()
                                  if hasattr(f, "cache_info"))}

    def lade_heap(self, trim: bool = False) -> dict:
        """This worker's RSS (MiB), live Python objects and live torch tensors; with ``trim``,
        also the RSS after glibc's malloc_trim(0) (how much of it was freed heap held back)."""
        import ctypes
        import gc

        import psutil
        import torch
        gc.collect()
        objs = gc.get_objects()
        types = collections.Counter(type(o).__qualname__ for o in objs)
        out = {"rss_mib": psutil.Process().memory_info().rss / 2**20, "objects": len(objs),
               # type(o), not isinstance: isinstance reads __class__, which loads lazy proxies
               # (openai's pandas proxy) and would import packages into the worker
               "tensors": sum(1 for o in objs if issubclass(type(o), torch.Tensor)),
               "top_types": dict(types.most_common(12))}
        if trim:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
            out["rss_after_trim_mib"] = psutil.Process().memory_info().rss / 2**20
        return out
