"""The lookahead step engine: request slots, the adaptive policy and one context per step.

No vLLM import and no access to vLLM objects: lade_vllm.adapter reads vLLM's runner into the plain
records of lade_vllm.step_records, calls the engine, and writes what the engine returns
(positions, tree layout, KV moves, emitted tokens) back into vLLM. One step:

1. ``propose(ProposeBatch)``: per eligible request a token tree from the pool and the Jacobi window
   (lade_vllm.proposer.LookaheadState); its nodes except the root are the request's draft tokens,
   in storage order [trie | window] (lade_vllm.proposal). The trees wait in ``pending``. At the
   CHAIN level each request's context match is laid out as a chain, no tree (lade_vllm.chain_step).
   Chain candidates that are not drafted are kept and checked against the tokens committed
   next (shadow chains, lade_vllm.chain_step.ShadowChains): the policy learns their acceptance.
2. ``plan(ScheduledBatch)``: which pending trees the scheduler kept (whole or truncated), their
   positions p + depth and ancestor masks: a fresh :class:`StepContext` in ``step``.
3. after the forward, verification in three stages: ``acceptance_rows`` / ``min_p`` tell the adapter
   which logits rows need a target (it computes them: argmax or a sample, lade_vllm.adapter.sampling);
   ``accept(ctx, target)`` commits the whole trees to the lookahead state (the proposed trees
   themselves, restricted to the committed requests: never proposed twice) and walks the truncated
   ones (lade_vllm.verify_step); the returned :class:`Accepted` holds the emitted tokens, accepted
   paths and the KV moves the adapter performs.
"""
from __future__ import annotations

import os
import time

import numpy as np
import torch

from lade_vllm import shadow_jit
from lade_vllm.attention import TreeLayout
from lade_vllm.chain_step import ShadowChains, chain_candidates, count_matches, propose_chains, \
    row_arrays
from lade_vllm.config import LadeConfig
from lade_vllm.policy import CHAIN, LOOKUP, OFF, AdaptivePolicy, decision_log, forced_level
from lade_vllm.proposal import Proposal, StepPlan, ancestor_mask, storage_order
from lade_vllm.proposer import LookaheadState
from lade_vllm.proposer.state import TREE_MIN_MATCH
from lade_vllm.proposer.recycle import Recycler
from lade_vllm.step_cost import StepPeriod
from lade_vllm.step_records import ProposeBatch, RequestInfo, ScheduledBatch, StepContext
from lade_vllm.verify_step import StepVerifier

#: LADE_DENSE_KV=1: the CPU tree backend keeps per-layer dense copies of tree requests' prefix K/V
#: between steps (lade_vllm.attention.dense_kv). Off by default: with it the soak test's memory
#: grew 92 MiB from round 5 to 10 (bound 64) in one of three CI runs.
DENSE_KV = os.environ.get("LADE_DENSE_KV", "0") == "1"


def tree_suffix(suffix, cands: np.ndarray, classes: list) -> tuple:
    """The suffix-match candidates a tree merges (``suffix``: candidates, match lengths): each
    request's chain candidate (``cands`` / ``classes``, lade_vllm.chain_step.chain_candidates:
    the context match, else the recycled successors), as long a match as a tree takes, so a tree
    holds every chain CHAIN would draft."""
    has = torch.tensor([c is not None for c in classes])
    lengths = torch.where(has, suffix[1].clamp(min=TREE_MIN_MATCH), suffix[1])
    return torch.from_numpy(np.ascontiguousarray(cands[:, :suffix[0].shape[1]])), lengths


class LadeEngine(StepVerifier):
    """Lookahead state of one model runner: slots, per-request caps, the policy, the step."""

    def __init__(self, cfg: LadeConfig, max_seqs: int, max_tree_len: int | None = None,
                 vocab_size: int | None = None):
        self.cfg = cfg
        self.state = LookaheadState(max_seqs, cfg.window_size, cfg.ngram_size,
                                    cfg.guess_set_size, max_keys=cfg.pool_max_keys,
                                    pool_from_prompt=cfg.pool_from_prompt,
                                    suffix_tokens=cfg.suffix_tokens)
        self.slot_of: dict[str, int] = {}
        # the model's latest prediction after each token (chains for requests without a match)
        self.successors = Recycler(vocab_size, max_seqs) if cfg.recycle and vocab_size else None
        self.free_slots = list(range(max_seqs - 1, -1, -1))
        # committed tokens each slot's state has seen (catch-up after steps without a tree)
        self.synced = np.zeros(max_seqs, dtype=np.int64)
        # slots whose lookahead state starts with their first tree -> their window width
        self.unstarted: dict[int, int | None] = {}
        # per-request caps: candidates and their length
        self.slot_cands = torch.full((max_seqs,), cfg.guess_set_size, dtype=torch.long)
        self.cand_len = max(cfg.ngram_size - 1, cfg.suffix_tokens)   # longest candidate
        self.slot_cand_len = torch.full((max_seqs,), self.cand_len, dtype=torch.long)
        self.capped_slots: set[int] = set()
        self.policy = AdaptivePolicy(
            full_nodes=cfg.max_draft_nodes,
            lookup_nodes=cfg.guess_set_size * (cfg.ngram_size - 1) + cfg.suffix_tokens,
            chain_nodes=max(cfg.ngram_size - 1, cfg.suffix_tokens), enabled=cfg.adaptive,
            explore_every=cfg.adaptive_explore_every,
            explore_margin=float(cfg.adaptive_explore_margin), shadow=cfg.adaptive,
            forced=forced_level(), log=decision_log())
        # chain candidates not drafted, checked against the tokens committed next (the policy)
        self.shadow = ShadowChains(max_seqs, self.policy.chain.max_len) if cfg.adaptive else None
        # counters for tests and benchmarks; host_seconds = lade's own CPU work per step
        # (the adapter adds its hooks' time), steps = steps with lade requests
        self.stats = {"tree_steps": 0, "trie_nodes": 0, "window_nodes": 0, "steps": 0,
                      "host_seconds": 0.0}
        self.requests: dict[str, RequestInfo] = {}
        # sliding-window models: trees only while the whole sequence fits inside the window
        self.max_tree_len = max_tree_len
        self.pending: Proposal | None = None   # trees proposed for the next step
        self.step = StepContext()
        self.period = StepPeriod()   # whole steps, proposal to proposal, for the policy
        self.start_seconds = 0.0     # spent starting requests' lookahead state in this proposal
        # load the numba kernels now (suffix matcher, CPU pool and trees, shadow chains), not in
        # the first request's step
        self.state.warm()
        if self.shadow is not None:
            shadow_jit.warm()
        # finished / resumed requests, told to the attention backend with the next tree layout
        self.kv_stale: set[str] = set()

    # ---- request lifetime -------------------------------------------------------------------
    def release(self, req_ids) -> None:
        freed = [self.slot_of.pop(r) for r in req_ids if r in self.slot_of]
        for r in req_ids:
            self.requests.pop(r, None)
        if freed:
            self.state.free(torch.tensor(freed))
            if self.shadow is not None:
                self.shadow.drop(freed)
            self.free_slots.extend(freed)
            for slot in freed:
                self.unstarted.pop(slot, None)
                if slot in self.capped_slots:
                    self.capped_slots.discard(slot)
                    self.slot_cands[slot] = self.cfg.guess_set_size
                    self.slot_cand_len[slot] = self.cand_len

    def _info(self, req_id: str, batch: ProposeBatch) -> RequestInfo:
        info = self.requests.get(req_id)
        if info is None:
            info = self.requests[req_id] = batch.info_of(req_id)
        return info

    def _slot_for(self, req_id: str, info: RequestInfo, tokens: np.ndarray) -> int | None:
        slot = self.slot_of.get(req_id)
        if slot is None:
            if not self.free_slots:
                return None
            slot = self.free_slots.pop()
            self.slot_of[req_id] = slot
            if info.guess_set_size is not None or info.ngram_size is not None:
                self.capped_slots.add(slot)
                if info.guess_set_size is not None:
                    self.slot_cands[slot] = info.guess_set_size
                if info.ngram_size is not None:
                    self.slot_cand_len[slot] = info.ngram_size - 1
            # the lookahead state (pool from the prompt, window) starts with the slot's first
            # tree (``_build``): plain and chain steps never read it
            self.unstarted[slot] = info.window_size
            if self.successors is not None:
                self.successors.start(slot, tokens.shape[0])
        return slot

    # ---- 1. propose -------------------------------------------------------------------------
    def propose(self, batch: ProposeBatch) -> list[list[int]]:
        """Draft tokens per batch row (empty for rows without a tree this step)."""
        step = self.step
        seconds = self.period.step(time.perf_counter(), step.t0)
        if seconds is not None:  # the step that just ended: tokens fed -> seconds
            # less the requests started in it (a cost per request, whatever the level: at the
            # start of a batch-32 wave it would make that step's token count look dear)
            seconds = max(seconds - self.start_seconds, 0.0)
            self.policy.observe_step(step.tokens, seconds, tree=step.tree, drafts=step.drafts)
            step.t0 = None
        self.start_seconds = 0.0
        live = set(batch.live)
        # requests the runner no longer holds: their slot and info go (a finished request whose
        # notice this worker never received, e.g. aborted while preempted, included)
        stale = [r for r in self.slot_of.keys() | self.requests.keys() if r not in live]
        if stale:
            self.release(stale)
        out: list[list[int]] = [[] for _ in batch.sampled]
        self.pending = None
        rows = self._lade_rows(batch)
        if not rows:
            return out
        self.stats["steps"] += 1
        contexts = [batch.token_ids[i, :n] for i, *_, n in rows]
        if self.successors is not None:
            self.successors.committed(batch.token_ids, *row_arrays(rows))
        # the chain candidates are found first (the context match, else the recycled
        # successors): at CHAIN only they draft, by chain class
        suffix = self.state.suffix_match(contexts)   # (candidates [B, K], match lengths [B])
        chains = None
        if suffix is not None:
            lasts = np.array([r[3] for r in rows], dtype=np.int64)
            recycled = None if self.successors is None else \
                self.successors.chains(lasts, suffix[0].shape[1])
            chains = chain_candidates(suffix, recycled)
        matched = None if chains is None else count_matches(chains[1])
        shadow = self.shadow if chains is not None else None
        if shadow is not None:   # the chains not drafted earlier, against what was committed
            shadow.report(self.policy, rows, batch.token_ids)
        level = self.policy.choose(len(rows), batch.num_reqs - len(rows), matched)
        if shadow is not None:   # this step's chains that will not be drafted
            shadow.record(rows, chains, level == CHAIN and self.policy.cut, self.slot_cand_len)
        if level == OFF:
            return out  # plain decoding this step; the slots catch up when trees resume
        if level == CHAIN and chains is not None:
            _, req_ids, slots, _, _ = (list(x) for x in zip(*rows))
            slots_t = torch.tensor(slots)
            self.pending = prop = propose_chains(req_ids, slots_t, torch.from_numpy(lasts), *chains,
                                                 self.policy.cut, self.slot_cand_len[slots_t])
        else:
            self.pending = prop = self._build(rows, level, contexts,
                                              suffix if chains is None else
                                              tree_suffix(suffix, chains[0], chains[1]))
        for (row, *_), drafts in zip(rows, prop.drafts):
            out[row] = drafts
        return out

    def _lade_rows(self, batch: ProposeBatch) -> list[tuple]:
        """(row, request id, slot, last token, committed tokens) of the rows that get a tree,
        allocating slots for new requests."""
        rows = []
        for i, sampled in enumerate(batch.sampled):
            if not sampled:
                continue
            req_id = batch.req_ids[i]
            if req_id is None:
                continue
            info = self._info(req_id, batch)
            if not info.eligible:
                continue
            num = int(batch.num_tokens[i])
            if self.max_tree_len is not None and num > self.max_tree_len:
                if req_id in self.slot_of:
                    self.release([req_id])
                continue
            slot = self._slot_for(req_id, info, batch.token_ids[i, :num])
            if slot is None:
                continue
            rows.append((i, req_id, slot, sampled[-1], num))
        return rows

    def _build(self, rows: list[tuple], level: int, contexts: list[np.ndarray],
               suffix: tuple | None) -> Proposal:
        _, req_ids, slots, lasts, nums = (list(x) for x in zip(*rows))
        self._start(slots, contexts)
        self._catch_up(slots, nums, contexts)
        slots_t, lasts_t = torch.tensor(slots), torch.tensor(lasts)
        tree_args = self._tree_args(slots_t, level)
        tree = self.state.propose(slots_t, lasts_t, contexts=contexts, suffix=suffix, **tree_args)
        prop = storage_order(req_ids, slots_t, lasts_t, tree)
        prop.level = level
        prop.tree_args = tree_args
        return prop

    def _start(self, slots, contexts: list[np.ndarray]) -> None:
        """Start the lookahead state of the slots building their first tree, from every token
        committed so far (the pool gets the prompt's and the output's n-grams alike)."""
        if not self.unstarted:
            return
        t0 = time.perf_counter()
        for slot, context in zip(slots, contexts):
            if slot in self.unstarted:
                self.state.start(slot, torch.from_numpy(context.astype(np.int64)),
                                 seed=self.cfg.seed, width=self.unstarted.pop(slot))
                self.synced[slot] = context.shape[0]
        self.start_seconds += time.perf_counter() - t0

    def _catch_up(self, slots, nums, contexts: list[np.ndarray]) -> None:
        """Slots whose last steps were decoded without a verified tree (policy OFF, a truncated
        tree) learn the tokens committed meanwhile: history and output n-grams."""
        keep = self.cfg.ngram_size - 1
        behind, tails, new = [], [], []
        for slot, num, context in zip(slots, nums, contexts):
            known = int(self.synced[slot])
            if known != num:
                behind.append(slot)
                tails.append(torch.from_numpy(
                    context[max(min(known, num) - keep, 0):num].astype(np.int64)))
                new.append(max(num - known, 0))
                self.synced[slot] = num
        if behind:
            self.state.catch_up(behind, tails, new)

    def _tree_args(self, slots: torch.Tensor, level: int) -> dict:
        args = {}
        if level in (CHAIN, LOOKUP):
            args["use_window"] = torch.zeros(slots.numel(), dtype=torch.bool)
        if self.capped_slots or level == CHAIN:
            cands = self.slot_cands[slots]
            args["num_cands"] = torch.ones_like(cands) if level == CHAIN else cands
            args["cand_len"] = self.slot_cand_len[slots]
        if level == CHAIN:   # the suffix match only, cut to the length the policy chose
            args["cand_len"] = args["cand_len"].clamp(max=self.policy.chain_len)
            args["suffix_only"] = True
        return args

    # ---- 2. plan the forward ----------------------------------------------------------------
    def plan(self, sched: ScheduledBatch) -> StepContext:
        """The step's context: which pending trees were scheduled as proposed, their positions
        and masks. Requests whose scheduled drafts are not our tree decode as a causal chain."""
        ctx = self.step = StepContext(proposal=self.pending, t0=time.perf_counter(),
                                      tokens=int(sched.total_tokens),
                                      drafts=any(sched.drafts.values()))
        if sched.finished:
            self.release(sched.finished)
        if DENSE_KV:   # else no copies exist and the set would only grow
            self.kv_stale.update(sched.finished, sched.resumed)
        prop = ctx.proposal
        if prop is None:
            return ctx
        plan = StepPlan()
        layout = TreeLayout(req_indices=[], tree_masks=[], req_keys=[] if DENSE_KV else None)
        for k, req_id in enumerate(prop.req_ids):
            i = sched.index_of.get(req_id)
            drafts = sched.drafts.get(req_id)
            if i is None or not drafts:
                continue
            mine = prop.drafts[k]
            if sched.num_scheduled.get(req_id, 0) != len(drafts) + 1 \
                    or drafts != mine[:len(drafts)]:
                continue  # not our tree (e.g. a resumed request): plain causal chain
            n = len(drafts) + 1
            start = int(sched.query_start[i])
            depth = prop.depth[k][:n]
            ctx.positions.append((start, int(sched.num_computed[i]) + depth))
            if not np.array_equal(depth, np.arange(n)):
                layout.req_indices.append(i)
                layout.tree_masks.append(ancestor_mask(prop.parent[k][:n]))
                if layout.req_keys is not None:
                    layout.req_keys.append(req_id)
            self._count_nodes(ctx, req_id, n, prop.num_trie[k])
            plan.add(i, k, n, n == len(mine) + 1, start)
        if layout.req_indices:   # the backend's dense K/V copies of these requests go
            layout.stale, self.kv_stale = sorted(self.kv_stale), set()
        ctx.layout = layout if layout.req_indices else None
        ctx.tree = ctx.layout is not None
        ctx.plan = plan if plan.batch_idx else None
        return ctx

    def _count_nodes(self, ctx: StepContext, req_id: str, n: int, num_trie: int) -> None:
        window = max(n - 1 - num_trie, 0)   # storage order: [root | trie | window]
        ctx.window_counts[req_id] = window
        self.stats["tree_steps"] += 1
        self.stats["trie_nodes"] += n - 1 - window
        self.stats["window_nodes"] += window

    def take_window_counts(self) -> dict[str, int]:
        """Per request, the window nodes scheduled in the last planned step (once)."""
        counts, self.step.window_counts = self.step.window_counts, {}
        return counts
