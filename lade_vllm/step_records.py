"""The records the step engine (lade_vllm.engine) exchanges with its driver, one per stage of a
step: what the runner's batch holds when drafts are asked for (``ProposeBatch``), what the
scheduler scheduled (``ScheduledBatch``), the step in flight (``StepContext``) and its
verification (``Accepted``); ``RequestInfo`` per request. Plain data, no vLLM import."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Collection, Mapping

import numpy as np

from lade_vllm.attention import TreeLayout
from lade_vllm.proposal import Proposal, StepPlan


@dataclass(frozen=True)
class RequestInfo:
    """What the engine needs to know about a request, read once from its sampling params."""
    eligible: bool
    window_size: int | None = None         # per-request caps (extra_args["lade"])
    ngram_size: int | None = None
    guess_set_size: int | None = None
    min_p: float = 0.0


@dataclass
class ProposeBatch:
    """The runner's batch when vLLM asks for drafts (after a step's bookkeeping)."""
    req_ids: list                          # per batch row: request id or None
    sampled: list[list[int]]               # per row: tokens sampled in the step that ended
    num_tokens: np.ndarray                 # per row: committed tokens
    token_ids: np.ndarray                  # [rows, max_len] committed token ids
    live: Collection[str]                  # requests the runner holds
    num_reqs: int
    info_of: Callable[[str], RequestInfo]  # read a request's RequestInfo (first sight only)


@dataclass
class ScheduledBatch:
    """What the scheduler scheduled this step, as the runner laid it out."""
    total_tokens: int
    finished: Collection[str]
    index_of: Mapping[str, int]            # request id -> batch row
    drafts: Mapping[str, list[int]]        # request id -> scheduled draft tokens
    num_scheduled: Mapping[str, int]       # request id -> scheduled tokens (root included)
    query_start: np.ndarray                # per row: first token in the flattened batch
    num_computed: np.ndarray               # per row: p, tokens already in the KV cache
    resumed: Collection[str] = ()          # requests resumed from preemption (recomputed)


@dataclass
class StepContext:
    """One engine step, from ``plan`` to the next ``propose``."""
    proposal: Proposal | None = None
    plan: StepPlan | None = None           # None once verified, or when no tree was kept
    layout: TreeLayout | None = None       # ancestor masks of the non-chain trees
    positions: list[tuple[int, np.ndarray]] = field(default_factory=list)  # (first token, p+depth)
    window_counts: dict[str, int] = field(default_factory=dict)  # window nodes scheduled
    t0: float | None = None                # when the step's inputs were planned
    tokens: int = 0                        # tokens the step feeds
    tree: bool = False                     # the step uses tree attention
    drafts: bool = False                   # some request has drafts scheduled


@dataclass
class Accepted:
    """Verification of one step's trees, per plan request j."""
    emitted: list[list[int]]               # tokens to emit
    paths: list[list[int]]                 # accepted storage indices in path order (root excl.)
    moves: list[tuple[int, int, int]]      # (j, from storage index, to depth): KV to relocate
