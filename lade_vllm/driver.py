"""The worker-side lookahead step: what happens around the ONE model forward of each engine step.

One engine step, top to bottom (vLLM 0.32 V1 runner; hooks installed by lade_vllm.adapter.runtime):

1. ``LadeDriver.propose`` (called by vLLM as the custom_class drafter, after the previous step's
   bookkeeping): pool lookup + Jacobi window -> a token tree per request (proposer.LookaheadState).
   The tree's nodes except the root go to the scheduler as this request's "draft tokens", in
   storage order [trie candidates | window] so that a scheduler truncation drops window nodes first
   (lade_vllm.proposal: the Proposal / StepPlan records and that ordering).
2. ``LadeDriver.before_forward`` (wraps ``GPUModelRunner._prepare_inputs``): for each request whose
   scheduled drafts are the tree we proposed, rewrite its RoPE positions to p + depth and publish the
   tree masks for the attention backend (lade_vllm.attention).
3. The model forward (vLLM's), with tree-masked attention for tree requests; logits at every node.
4. ``LadeDriver.verify`` (inside ``LadeRejectionSampler.forward``): per-node targets (argmax, or
   independent samples for sampled requests, lade_vllm.sampling), tree
   verification, window harvest/shift and pool update, emitted tokens written into vLLM's sampler
   output, and the accepted path's KV moved to the canonical slots p+1..p+a.
"""
from __future__ import annotations

import logging
import time

import numpy as np
import torch

from lade_vllm.attention import TreeLayout, set_step_layout
from lade_vllm.config import LadeConfig
from lade_vllm.eligibility import is_eligible
from lade_vllm.kv_move import KVMover
from lade_vllm.policy import CHAIN, FULL, LOOKUP, OFF, AdaptivePolicy
from lade_vllm.request_options import parse_request_options
from lade_vllm.proposal import Proposal, StepPlan, ancestor_mask, storage_order
from lade_vllm.proposer import LookaheadState
from lade_vllm.sampling import (RequestRows, TreeOutput, emitted_logprobs, node_targets,
                                verify_subtree)

logger = logging.getLogger("vllm.lade_vllm")  # under vllm: its handler and level


class LadeDriver:
    """Per-runner lookahead state: request slots, the pending proposal, the current step plan."""

    def __init__(self, cfg: LadeConfig, runner):
        self.cfg = cfg
        self.runner = runner
        max_seqs = 2 * runner.input_batch.max_num_reqs
        self.state = LookaheadState(max_seqs, cfg.window_size, cfg.ngram_size,
                                    cfg.guess_set_size, max_keys=cfg.pool_max_keys,
                                    pool_from_prompt=cfg.pool_from_prompt)
        self.slot_of: dict[str, int] = {}
        self.free_slots = list(range(max_seqs - 1, -1, -1))
        # committed tokens each slot's state has seen (catch-up after steps without a tree)
        self.synced = np.zeros(max_seqs, dtype=np.int64)
        # per-request caps (SamplingParams.extra_args["lade"]): candidates and their length
        self.slot_cands = torch.full((max_seqs,), cfg.guess_set_size, dtype=torch.long)
        self.slot_cand_len = torch.full((max_seqs,), cfg.ngram_size - 1, dtype=torch.long)
        self.capped_slots: set[int] = set()
        self.policy = AdaptivePolicy(
            full_nodes=cfg.max_draft_nodes, lookup_nodes=cfg.guess_set_size * (cfg.ngram_size - 1),
            chain_nodes=cfg.ngram_size - 1, enabled=cfg.adaptive, explore_every=cfg.adaptive_explore_every,
            explore_margin=float(cfg.adaptive_explore_margin))
        # per request, window nodes scheduled this step (not "drafted" in vLLM's metrics)
        self.window_counts: dict[str, int] = {}
        # counters for tests and benchmarks; host_seconds = lade's own CPU work per step
        # (proposal, tree layout, verification and state update), steps = steps with lade requests
        self.stats = {"tree_steps": 0, "trie_nodes": 0, "window_nodes": 0, "steps": 0,
                      "host_seconds": 0.0}
        self._step_t0: float | None = None
        self._step_tokens = 0
        self._step_tree = False
        self.eligible: dict[str, bool] = {}
        self.pinned: dict[str, bool] = {}   # seeded sampled requests: full tree every step
        self.proposal: Proposal | None = None
        self.plan: StepPlan | None = None
        self.kv = KVMover(runner)
        # sliding-window models: trees only while the whole sequence fits inside the window (the
        # window then masks nothing); longer requests decode normally through vLLM's kernel
        window = runner.model_config.get_sliding_window()
        self.max_tree_len = (int(window) - 2 - cfg.max_draft_nodes) if window else None

    # ---- request lifetime -------------------------------------------------------------------
    def release(self, req_ids) -> None:
        freed = [self.slot_of.pop(r) for r in req_ids if r in self.slot_of]
        for r in req_ids:
            self.eligible.pop(r, None)
            self.pinned.pop(r, None)
        if freed:
            self.state.free(torch.tensor(freed))
            self.free_slots.extend(freed)
            for slot in freed:
                if slot in self.capped_slots:
                    self.capped_slots.discard(slot)
                    self.slot_cands[slot] = self.cfg.guess_set_size
                    self.slot_cand_len[slot] = self.cfg.ngram_size - 1

    def _slot_for(self, req_id: str, row: int, num_tokens: int) -> int | None:
        slot = self.slot_of.get(req_id)
        if slot is None:
            if not self.free_slots:
                return None
            slot = self.free_slots.pop()
            self.slot_of[req_id] = slot
            tokens = torch.from_numpy(
                self.runner.input_batch.token_ids_cpu[row, :num_tokens].astype(np.int64))
            width = self._apply_request_caps(req_id, slot)
            self.state.start(slot, tokens, seed=self.cfg.seed, width=width)
            self.synced[slot] = num_tokens
        return slot

    def _apply_request_caps(self, req_id: str, slot: int) -> int | None:
        """Per-request window/ngram/guess caps from extra_args["lade"] (validated at admission by
        lade_vllm.request_options); returns the window width for the slot."""
        req = self.runner.requests.get(req_id)
        extra = getattr(getattr(req, "sampling_params", None), "extra_args", None)
        if not extra or extra.get("lade") in (None, True):
            return None
        opts = parse_request_options(extra, self.cfg)  # dict or its JSON text (HTTP vllm_xargs)
        if opts.guess_set_size is not None or opts.ngram_size is not None:
            self.capped_slots.add(slot)
            if opts.guess_set_size is not None:
                self.slot_cands[slot] = opts.guess_set_size
            if opts.ngram_size is not None:
                self.slot_cand_len[slot] = opts.ngram_size - 1
        return opts.window_size

    def _is_pinned(self, req_id: str) -> bool:
        """Seeded sampled requests decode with the full tree every step, whatever the adaptive
        policy picks for the others: how many random draws a step consumes from the request's
        generator depends on its tree, so a timing-driven tree choice would make the same seed
        give different text run to run."""
        pinned = self.pinned.get(req_id)
        if pinned is None:
            req = self.runner.requests.get(req_id)
            sp = getattr(req, "sampling_params", None)
            pinned = (self.policy.enabled and sp is not None and sp.seed is not None
                      and sp.temperature > 0)
            self.pinned[req_id] = pinned
        return pinned

    def _is_eligible(self, req_id: str) -> bool:
        ok = self.eligible.get(req_id)
        if ok is None:
            req = self.runner.requests.get(req_id)
            ok = req is not None and is_eligible(req.sampling_params, self.cfg)
            self.eligible[req_id] = ok
        return ok

    # ---- 1. propose -------------------------------------------------------------------------
    def propose(self, sampled_token_ids: list[list[int]], num_tokens_no_spec: np.ndarray
                ) -> list[list[int]]:
        t0 = time.perf_counter()
        try:
            return self._propose(sampled_token_ids, num_tokens_no_spec)
        finally:
            self.stats["host_seconds"] += time.perf_counter() - t0

    def _propose(self, sampled_token_ids, num_tokens_no_spec) -> list[list[int]]:
        batch = self.runner.input_batch
        if self._step_t0 is not None:  # the step that just ended: tokens fed -> seconds
            self.policy.observe_step(self._step_tokens, time.perf_counter() - self._step_t0,
                                     tree=self._step_tree)
            self._step_t0 = None
        live = set(self.runner.requests)
        stale = [r for r in self.slot_of if r not in live]
        if stale:
            self.release(stale)
        out: list[list[int]] = [[] for _ in sampled_token_ids]
        rows, req_ids, slots, lasts, nums = [], [], [], [], []
        for i, sampled in enumerate(sampled_token_ids):
            if not sampled:
                continue
            req_id = batch.req_ids[i]
            if req_id is None or not self._is_eligible(req_id):
                continue
            num = int(num_tokens_no_spec[i])
            if self.max_tree_len is not None and num > self.max_tree_len:
                if req_id in self.slot_of:
                    self.release([req_id])
                continue
            slot = self._slot_for(req_id, i, num)
            if slot is None:
                continue
            rows.append(i)
            nums.append(num)
            req_ids.append(req_id)
            slots.append(slot)
            lasts.append(sampled[-1])
        self.proposal = None
        if not rows:
            return out
        self.stats["steps"] += 1
        level = self.policy.choose(len(rows), batch.num_reqs - len(rows))
        pinned = [self._is_pinned(r) for r in req_ids]
        if level == OFF:
            if not any(pinned):
                return out  # plain decoding this step; the slots catch up when trees resume
            keep = [k for k, p in enumerate(pinned) if p]
            rows, req_ids, slots, lasts, nums = ([x[k] for k in keep]
                                                 for x in (rows, req_ids, slots, lasts, nums))
            pinned = [True] * len(keep)
        self._catch_up(rows, slots, nums)
        slots_t, lasts_t = torch.tensor(slots), torch.tensor(lasts)
        tree_args = self._tree_args(slots_t, level, torch.tensor(pinned, dtype=torch.bool))
        tree = self.state.propose(slots_t, lasts_t, **tree_args)
        prop = storage_order(req_ids, slots_t, lasts_t, tree)
        prop.level = FULL if all(pinned) else (level if not any(pinned) else None)
        prop.tree_args = tree_args
        for row, drafts in zip(rows, prop.drafts):
            out[row] = drafts
        self.proposal = prop
        return out

    def _catch_up(self, rows, slots, nums) -> None:
        """Slots whose last steps were decoded without a verified tree (policy OFF, a truncated
        tree) learn the tokens committed meanwhile: history and output n-grams."""
        token_ids = self.runner.input_batch.token_ids_cpu
        keep = self.cfg.ngram_size - 1
        for i, slot, num in zip(rows, slots, nums):
            known = int(self.synced[slot])
            if known != num:
                tail = token_ids[i, max(min(known, num) - keep, 0):num].astype(np.int64)
                self.state.catch_up(slot, torch.from_numpy(tail), max(num - known, 0))
                self.synced[slot] = num

    def _tree_args(self, slots: torch.Tensor, level: int, pinned: torch.Tensor) -> dict:
        args = {}
        if level in (CHAIN, LOOKUP):
            args["use_window"] = pinned.clone()  # pinned requests keep their full tree
        if self.capped_slots or level == CHAIN:
            cands = self.slot_cands[slots]
            args["num_cands"] = torch.where(pinned, cands, 1) if level == CHAIN else cands
            args["cand_len"] = self.slot_cand_len[slots]
        return args

    # ---- 2. before the forward --------------------------------------------------------------
    def before_forward(self, scheduler_output) -> None:
        self._step_t0 = time.perf_counter()
        try:
            self._before_forward(scheduler_output)
        finally:
            self.stats["host_seconds"] += time.perf_counter() - self._step_t0

    def _before_forward(self, scheduler_output) -> None:
        runner = self.runner
        self._step_tokens = int(scheduler_output.total_num_scheduled_tokens)
        self._step_tree = False
        if scheduler_output.finished_req_ids:
            self.release(scheduler_output.finished_req_ids)
        self.plan = None
        self.window_counts = {}
        prop = self.proposal
        if prop is None:
            set_step_layout(None)
            return
        batch = runner.input_batch
        qsl = runner.query_start_loc.np
        sched = scheduler_output.scheduled_spec_decode_tokens
        plan = StepPlan()
        layout = TreeLayout(req_indices=[], tree_masks=[])
        # one slot mapping per KV-cache group (several for hybrid sliding-window models)
        tables = [bt.slot_mapping.gpu for bt in batch.block_table.block_tables]
        for k, req_id in enumerate(prop.req_ids):
            i = batch.req_id_to_index.get(req_id)
            drafts = sched.get(req_id)
            if i is None or not drafts:
                continue
            n_sched = scheduler_output.num_scheduled_tokens.get(req_id, 0)
            mine = prop.drafts[k]
            if n_sched != len(drafts) + 1 or drafts != mine[:len(drafts)]:
                continue  # not our tree (e.g. a resumed request): plain causal chain
            n = len(drafts) + 1
            start = int(qsl[i])
            p = int(batch.num_computed_tokens_cpu[i])
            depth = prop.depth[k][:n]
            runner.positions[start:start + n] = torch.from_numpy(p + depth)
            if not np.array_equal(depth, np.arange(n)):
                layout.req_indices.append(i)
                layout.tree_masks.append(ancestor_mask(prop.parent[k][:n]))
            window = max(n - 1 - prop.num_trie[k], 0)   # storage order: [root | trie | window]
            self.window_counts[req_id] = window
            self.stats["tree_steps"] += 1
            self.stats["trie_nodes"] += n - 1 - window
            self.stats["window_nodes"] += window
            plan.batch_idx.append(i)
            plan.prop_idx.append(k)
            plan.num_nodes.append(n)
            plan.full.append(n == len(mine) + 1)
            plan.slot_mapping.append(torch.stack([t[start:start + n] for t in tables]))
        set_step_layout(layout if layout.req_indices else None)
        self._step_tree = bool(layout.req_indices)
        self.plan = plan if plan.batch_idx else None

    # ---- 4. verification --------------------------------------------------------------------
    def verify(self, metadata, logits: torch.Tensor, sampling_metadata, sampler
               ) -> TreeOutput | None:
        """Verify this step's trees from ``logits`` [num_logits, V] (vLLM's logits rows: per
        request its scheduled nodes in storage order, ``metadata.cu_num_sampled_tokens``); commit the lookahead
        state and move the accepted path's KV. Returns the emitted tokens (and their logprobs)
        of the tree requests, which the caller writes over vLLM's output rows.

        Per-node targets come from ``lade_vllm.sampling.node_targets``: argmax for greedy
        requests, an independent sample of the request's processed distribution for sampled ones
        at the root and trie nodes (window nodes keep the argmax: they feed the n-gram pool, never
        acceptance)."""
        t0 = time.perf_counter()
        try:
            return self._verify(metadata, logits, sampling_metadata, sampler)
        finally:
            self.stats["host_seconds"] += time.perf_counter() - t0

    def _verify(self, metadata, logits, sampling_metadata, sampler) -> TreeOutput | None:
        plan, prop = self.plan, self.proposal
        self.plan = None
        self.proposal = None
        set_step_layout(None)
        if plan is None:
            return None
        cu = metadata.cu_num_sampled_tokens.cpu().numpy()
        reqs: list[RequestRows] = []
        offset: list[int] = []        # first row of request j in the concatenated node rows
        o = 0
        for j, i in enumerate(plan.batch_idx):
            n = plan.num_nodes[j]
            reqs.append(RequestRows(i, int(cu[i]) - (metadata.num_draft_tokens[i] + 1), n))
            offset.append(o)
            o += n
        min_p_of = []
        for k in plan.prop_idx:
            req = self.runner.requests.get(prop.req_ids[k])
            min_p_of.append(float(getattr(req.sampling_params, "min_p", 0.0) or 0.0)
                            if req is not None else 0.0)
        want_lp = sampling_metadata.max_num_logprobs is not None
        keep_processed = want_lp and sampler.logprobs_mode in ("processed_logits",
                                                               "processed_logprobs")
        # root + trie rows (storage order [root | trie | window]): the rows acceptance reads
        trie_rows = []
        for j, k in enumerate(plan.prop_idx):
            lo = int(prop.tree.seq_start[k])
            st = prop.tree.is_trie[lo + torch.from_numpy(prop.order[k][:plan.num_nodes[j]])]
            st[0] = True
            trie_rows.append(st)
        nt = node_targets(logits, reqs, sampling_metadata, min_p_of, keep_processed,
                          need_sample=torch.cat(trie_rows))
        target, row_sampled = nt.target, nt.sampled
        moves_src, moves_dst = [], []
        emitted: dict[int, list[int]] = {}
        paths: dict[int, list[int]] = {}
        full = [j for j, f in enumerate(plan.full) if f]
        if full:
            ks = [plan.prop_idx[j] for j in full]
            if len(ks) == len(prop.req_ids):
                tree, sub_slots = prop.tree, prop.slots
            else:
                sel = torch.tensor(ks)
                sub_slots = prop.slots[sel]
                tree = self.state.propose(sub_slots, prop.last_tokens[sel],
                                          **{k: v[sel] for k, v in prop.tree_args.items()})
            tree_target = torch.empty(tree.total_nodes, dtype=torch.long)
            for b, j in enumerate(full):
                k, n, o = plan.prop_idx[j], plan.num_nodes[j], offset[j]
                at = int(tree.seq_start[b]) + torch.from_numpy(prop.order[k][:n])
                tree_target[at] = target[o:o + n]
            res = self.state.commit(sub_slots, tree, tree_target)
            num_em = res.num_emitted.tolist()
            em = res.emitted.tolist()
            acc = res.accepted_nodes.tolist()
            np.add.at(self.synced, sub_slots.numpy(), res.num_emitted.numpy())
            if prop.level is not None:
                self.policy.observe_level(prop.level, sum(num_em) / len(num_em),
                                          float(tree.num_nodes.sum()) / len(num_em) - 1.0)
            for b, j in enumerate(full):
                k = plan.prop_idx[j]
                lo = int(tree.seq_start[b])
                inv = np.empty_like(prop.order[k])
                inv[prop.order[k]] = np.arange(len(prop.order[k]))
                emitted[j] = em[b][:num_em[b]]
                paths[j] = [int(inv[a - lo]) for a in acc[b][:num_em[b] - 1]]
        for j, f in enumerate(plan.full):
            if f:
                continue
            i, k, n, o = plan.batch_idx[j], plan.prop_idx[j], plan.num_nodes[j], offset[j]
            tokens = np.array([int(prop.last_tokens[k])] + prop.drafts[k][:n - 1])
            tgt = target[o:o + n].numpy()
            # sampled: the trie only (see verify_subtree); window targets are argmaxes anyway
            acceptable = trie_rows[j].numpy() if bool(row_sampled[o]) else None
            path = verify_subtree(prop.parent[k][:n], tokens, tgt, acceptable)
            paths[j] = path
            emitted[j] = [int(tokens[s]) for s in path] + [int(tgt[path[-1] if path else 0])]
        out = TreeOutput()
        lp_rows, lp_prows, lp_tokens = [], [], []
        for j, i in enumerate(plan.batch_idx):
            out.batch_idx.append(i)
            out.tokens.append(emitted[j])
            lp_rows += [reqs[j].start] + [reqs[j].start + s for s in paths[j]]
            lp_prows += [offset[j]] + [offset[j] + s for s in paths[j]]
            lp_tokens += emitted[j]
            for depth, s in enumerate(paths[j], start=1):
                if s != depth:
                    moves_src.append(plan.slot_mapping[j][:, s])
                    moves_dst.append(plan.slot_mapping[j][:, depth])
        if moves_src:
            self.kv.move(torch.stack(moves_src, 1), torch.stack(moves_dst, 1))
        if want_lp:
            out.logprobs = emitted_logprobs(sampler, logits, nt.processed, lp_rows, lp_prows,
                                            lp_tokens, sampling_metadata.max_num_logprobs)
        return out
