"""Verification of a lookahead step (no vLLM import): the third stage of lade_vllm.engine.

After the forward the adapter asks ``acceptance_rows`` / ``min_p`` / ``node_depths`` /
``node_paths`` which logits rows need a target and how to draw it (lade_vllm.adapter.sampling),
then ``accept(ctx, target, ...)``: whole trees are committed to the lookahead state (verify,
harvest the window, update the pool), truncated trees and chains are only walked. The returned
:class:`Accepted` holds the emitted tokens, accepted paths and the KV moves the adapter performs.
"""
from __future__ import annotations

import itertools

import numpy as np
import torch

from lade_vllm.chain_step import observe_chains, walk_chain
from lade_vllm.policy import CHAIN
from lade_vllm.proposal import select_trees
from lade_vllm.proposer.verify import verify_subtree
from lade_vllm.step_records import Accepted, StepContext


class StepVerifier:
    """The verify half of :class:`lade_vllm.engine.LadeEngine` (uses its ``step``, ``state``,
    ``policy``, ``successors``, ``synced`` and ``requests``)."""

    def take_plan(self) -> StepContext | None:
        """The step to verify, if a tree was scheduled; clears the plan and the pending trees."""
        ctx = self.step
        if ctx.plan is None:
            return None
        self.pending = None
        verified = StepContext(proposal=ctx.proposal, plan=ctx.plan)
        ctx.plan = None
        return verified

    def acceptance_rows(self, ctx: StepContext) -> torch.Tensor | None:
        """[M] bool over the concatenated rows of the plan's requests: the root and trie nodes,
        the rows acceptance reads (window rows only feed the pool); None: every row (chains)."""
        prop, plan = ctx.proposal, ctx.plan
        if prop.tree is None:        # chains: every node is a candidate's
            return None
        # storage order is [root | trie | window]: a request's first 1 + num_trie rows
        rows = np.zeros(sum(plan.num_nodes), dtype=bool)
        o = 0
        for k, n in zip(plan.prop_idx, plan.num_nodes):
            rows[o:o + min(n, 1 + prop.num_trie[k])] = True
            o += n
        return torch.from_numpy(rows)

    def node_depths(self, ctx: StepContext) -> np.ndarray:
        """[M] depth in its tree of each row of the plan's requests (rows concatenated)."""
        prop, plan = ctx.proposal, ctx.plan
        return np.concatenate([prop.depth[k][:n] for k, n in zip(plan.prop_idx, plan.num_nodes)])

    def node_paths(self, ctx: StepContext) -> list[list[int]]:
        """Per row of the plan's requests (concatenated): the drafted tokens from the root's child
        down to the row's node (empty for the root), the tokens a node's logits follow."""
        prop, plan = ctx.proposal, ctx.plan
        out: list[list[int]] = []
        for k, n in zip(plan.prop_idx, plan.num_nodes):
            parent, drafts = prop.parent[k], prop.drafts[k]
            paths: list[list[int]] = [[]]
            for i in range(1, n):       # storage order is topological
                paths.append(paths[int(parent[i])] + [int(drafts[i - 1])])
            out.extend(paths)
        return out

    def min_p(self, ctx: StepContext) -> list[float]:
        """min_p of each plan request (0 when off)."""
        infos = (self.requests.get(ctx.proposal.req_ids[k]) for k in ctx.plan.prop_idx)
        return [info.min_p if info is not None else 0.0 for info in infos]

    def accept(self, ctx: StepContext, target: torch.Tensor, row_sampled: torch.Tensor,
               acceptable: torch.Tensor) -> Accepted:
        """Verify every plan request from per-row ``target`` [M] (rows concatenated in plan
        order; ``row_sampled`` [M]: the row's request samples; ``acceptable``: acceptance_rows).
        Whole trees are committed to the lookahead state, truncated ones only walked; chains
        are walked and observed by the policy."""
        plan = ctx.plan
        offsets = list(itertools.accumulate(plan.num_nodes[:-1], initial=0))
        if self.successors is not None:
            self._recycle(ctx, target, acceptable)
        emitted: dict[int, list[int]] = {}
        paths: dict[int, list[int]] = {}
        if ctx.proposal.tree is None:
            for j, (k, n) in enumerate(zip(plan.prop_idx, plan.num_nodes)):
                o = offsets[j]
                emitted[j], paths[j] = walk_chain(ctx.proposal.drafts[k][:n - 1],
                                                  target[o:o + n].tolist())
            observe_chains(self.policy, plan, ctx.proposal, emitted)
        else:
            full = [j for j, f in enumerate(plan.full) if f]
            if full:
                self._commit(ctx, full, offsets, target, emitted, paths)
            for j, f in enumerate(plan.full):
                if not f:
                    emitted[j], paths[j] = self._walk(ctx, j, int(offsets[j]), target,
                                                      row_sampled, acceptable)
        order = range(len(plan.batch_idx))
        moves = [(j, s, depth) for j in order for depth, s in enumerate(paths[j], start=1)
                 if s != depth]
        return Accepted([emitted[j] for j in order], [paths[j] for j in order], moves)

    def _recycle(self, ctx, target: torch.Tensor, acceptable: torch.Tensor) -> None:
        """Each read row's target is the model's prediction after the row's input token."""
        prop, plan = ctx.proposal, ctx.plan
        tokens = np.array([t for k, n in zip(plan.prop_idx, plan.num_nodes)
                           for t in [int(prop.last_tokens[k])] + prop.drafts[k][:n - 1]])
        if acceptable is None:
            self.successors.verified(tokens, target.numpy())
            return
        ok = acceptable.numpy()
        self.successors.verified(tokens[ok], target.numpy()[ok])

    def _commit(self, ctx, full, offsets, target, emitted, paths) -> None:
        """Commit the whole trees ``full`` (plan indices): verify, harvest, update the pool."""
        prop, plan = ctx.proposal, ctx.plan
        ks = [plan.prop_idx[j] for j in full]
        if len(ks) == len(prop.req_ids):
            tree, slots = prop.tree, prop.slots
        else:
            sel = torch.tensor(ks)
            tree, slots = select_trees(prop.tree, sel), prop.slots[sel]
        tree_target = torch.empty(tree.total_nodes, dtype=torch.long)
        for b, j in enumerate(full):
            k, n, o = plan.prop_idx[j], plan.num_nodes[j], int(offsets[j])
            at = int(tree.seq_start[b]) + torch.from_numpy(prop.order[k][:n])
            tree_target[at] = target[o:o + n]
        res = self.state.commit(slots, tree, tree_target)
        num_em, em = res.num_emitted.tolist(), res.emitted.tolist()
        acc = res.accepted_nodes.tolist()
        np.add.at(self.synced, slots.numpy(), res.num_emitted.numpy())
        self.policy.observe_level(prop.level, sum(num_em) / len(num_em),
                                  float(tree.num_nodes.sum()) / len(num_em) - 1.0, len(num_em))
        if prop.level == CHAIN:
            self.policy.observe_chain((tree.num_nodes - 1).tolist(), [n - 1 for n in num_em],
                                      int(prop.tree_args["cand_len"].max()))
        for b, j in enumerate(full):
            k = plan.prop_idx[j]
            lo = int(tree.seq_start[b])
            inv = np.empty_like(prop.order[k])
            inv[prop.order[k]] = np.arange(len(prop.order[k]))
            emitted[j] = em[b][:num_em[b]]
            paths[j] = [int(inv[a - lo]) for a in acc[b][:num_em[b] - 1]]

    def _walk(self, ctx, j, o, target, row_sampled, acceptable) -> tuple[list[int], list[int]]:
        """Verify the truncated tree of plan request ``j`` (rows from ``o``) without committing."""
        prop, plan = ctx.proposal, ctx.plan
        k, n = plan.prop_idx[j], plan.num_nodes[j]
        tokens = np.array([int(prop.last_tokens[k])] + prop.drafts[k][:n - 1])
        tgt = target[o:o + n].numpy()
        # sampled: the trie only (see verify_subtree); window targets are argmaxes anyway
        ok = acceptable[o:o + n].numpy() if bool(row_sampled[o]) else None
        path = verify_subtree(prop.parent[k][:n], tokens, tgt, ok)
        return [int(tokens[s]) for s in path] + [int(tgt[path[-1] if path else 0])], path
