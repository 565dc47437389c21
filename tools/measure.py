"""Side-by-side measurement helpers shared by the demo, the benchmarks and the tests."""
from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass


def spec_counters(llm) -> dict[str, float]:
    """Current values of this engine's spec-decode counters (0 when it does not speculate).

    Read from the engine's own Prometheus stat logger, not from ``LLM.get_metrics()``: that reads
    the process-wide registry, and every engine started later in the process unregisters all
    vLLM metrics from it (``PrometheusStatLogger.__init__`` -> ``unregister_vllm_metrics``, vLLM
    0.32), so an engine shared across tests would read counters that no longer move."""
    out = {"drafts": 0.0, "draft_tokens": 0.0, "accepted": 0.0}
    manager = getattr(llm.llm_engine, "logger_manager", None)
    for logger in getattr(manager, "stat_loggers", ()):
        prom = getattr(logger, "spec_decoding_prom", None)
        if prom is None:
            continue
        for key, attr in (("drafts", "counter_spec_decode_num_drafts"),
                          ("draft_tokens", "counter_spec_decode_num_draft_tokens"),
                          ("accepted", "counter_spec_decode_num_accepted_tokens")):
            for counter in getattr(prom, attr, {}).values():
                out[key] += counter._value.get()
    return out


@dataclass
class RunResult:
    method: str
    texts: list[str]
    token_ids: list[list[int]]
    seconds: float
    accepted: float  # draft tokens accepted by verification (vLLM's counter)
    drafts: float
    draft_tokens: float = 0.0  # tokens vLLM counted as drafted (lade: candidate nodes only)

    @property
    def num_tokens(self) -> int:
        return sum(len(t) for t in self.token_ids)

    @property
    def tokens_per_s(self) -> float:
        return self.num_tokens / self.seconds if self.seconds else 0.0

    @property
    def tokens_per_step(self) -> float:
        """Generated tokens per engine step of each request (the prefill step counts as one).

        Every step emits one token from the target plus the accepted draft tokens, so
        steps = tokens - accepted."""
        steps = self.num_tokens - self.accepted
        return self.num_tokens / steps if steps > 0 else 0.0


def generate(llm, method: str, prompts, sampling_params, progress: bool = False) -> RunResult:
    before = spec_counters(llm)
    start = time.perf_counter()
    outs = llm.generate(prompts, sampling_params, use_tqdm=progress)
    seconds = time.perf_counter() - start
    after = spec_counters(llm)
    return RunResult(method=method, texts=[o.outputs[0].text for o in outs],
                     token_ids=[list(o.outputs[0].token_ids) for o in outs], seconds=seconds,
                     accepted=after["accepted"] - before["accepted"],
                     drafts=after["drafts"] - before["drafts"],
                     draft_tokens=after["draft_tokens"] - before["draft_tokens"])


def shutdown(llm) -> None:
    """Stop an engine's background processes now rather than at interpreter exit."""
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:
        pass
    gc.collect()


def rows_from_child(script: str, method: str, argv: list[str], env: dict | None = None
                    ) -> list[dict] | None:
    """Run ``script --one METHOD argv`` in a fresh process (vLLM builds one engine per process;
    ``env``: its environment, default ours) and return the rows it printed as its last
    ``ROWS <json>`` line, or None if it failed."""
    cmd = [sys.executable, os.path.abspath(script), "--one", method, *argv]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env)
    got = [x for x in proc.stdout.splitlines() if x.startswith("ROWS ")]
    if proc.returncode or not got:
        print(f"  [{method}] FAILED (exit {proc.returncode})", file=sys.stderr, flush=True)
        return None
    return json.loads(got[-1][5:])
