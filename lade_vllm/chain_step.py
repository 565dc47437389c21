"""A CHAIN step without a tree (no vLLM import): each request's context match (or, without one,
its chain of recycled successors), cut to its chain class's length, laid out as a chain (depth =
index, parent = index - 1), walked to the first mismatch and reported to the policy. The
lookahead state is left alone: the slots catch up on the committed tokens when trees resume, as
after plain steps."""
from __future__ import annotations

import numpy as np
import torch

from lade_vllm.chains import CHAIN_CLASSES, RECYCLED, match_class
from lade_vllm.policy import CHAIN
from lade_vllm.proposal import Proposal, StepPlan
from lade_vllm.shadow_jit import begin_kernel, resolve_kernel


def chain_candidates(suffix, recycled: np.ndarray | None) -> tuple[np.ndarray, list[int | None]]:
    """Per request its chain candidate ``[B, K]`` (-1 padded) and chain class (None: nothing to
    draft): the context match (``suffix``: candidates, match lengths) by its match length, else
    the recycled successors' chain (``recycled`` [B, K'] or None) as class ``RECYCLED``."""
    cands, match_len = suffix[0].numpy(), suffix[1].tolist()
    classes: list[int | None] = [match_class(n) if n else None for n in match_len]
    if recycled is not None:
        rec = recycled
        free = [b for b, c in enumerate(classes) if c is None and rec[b, 0] >= 0]
        if free:
            cands = cands.copy()
            k = min(cands.shape[1], rec.shape[1])
            cands[free] = -1
            cands[free, :k] = rec[free, :k]
            for b in free:
                classes[b] = RECYCLED
    return cands, classes


def count_matches(classes: list[int | None]) -> list[int]:
    """Requests with a chain candidate, per chain class."""
    counts = [0] * CHAIN_CLASSES
    for c in classes:
        if c is not None:
            counts[c] += 1
    return counts


def propose_chains(req_ids, slots: torch.Tensor, lasts: torch.Tensor, cands: np.ndarray,
                   classes: list[int | None], cut: list[int], slot_cap: torch.Tensor) -> Proposal:
    """Per request its chain candidate (``cands`` [B, K], -1 padded; ``classes``: its chain
    class, None: no candidate) cut to ``cut[class]`` and to the request's own cap ``slot_cap``."""
    cap = [min(s, cut[c]) if c is not None else 0 for s, c in zip(slot_cap.tolist(), classes)]
    lengths = list(map(min, (cands >= 0).sum(1).tolist(), cap))  # a -1 padded prefix
    drafts = [cands[b, :m].tolist() for b, m in enumerate(lengths)]
    steps = [np.arange(m + 1) for m in lengths]
    return Proposal(req_ids, slots, lasts, None, drafts, order=steps,
                    parent=[a - 1 for a in steps], depth=steps, num_trie=lengths,
                    level=CHAIN, tree_args={"cand_len": cap,
                                            "classes": [c or 0 for c in classes]})


def walk_chain(drafts: list[int], target: list[int]) -> tuple[list[int], list[int]]:
    """Emitted tokens and accepted storage indices of a chain whose node targets are ``target``:
    drafts are accepted up to the first that differs from its parent's target (what
    ``verify_subtree`` does on a chain, without the tree)."""
    a = 0
    while a < len(drafts) and drafts[a] == target[a]:
        a += 1
    return drafts[:a] + [target[a]], list(range(1, a + 1))


def observe_chains(policy, plan: StepPlan, prop: Proposal, emitted: dict[int, list[int]]) -> None:
    """The policy learns from the chains scheduled whole: drafts and accepted drafts, the length
    each was cut to and its match class."""
    full = [j for j, f in enumerate(plan.full) if f]
    if not full:
        return
    ks = [plan.prop_idx[j] for j in full]
    drafted = [plan.num_nodes[j] - 1 for j in full]
    accepted = [len(emitted[j]) - 1 for j in full]
    policy.observe_level(CHAIN, 1.0 + sum(accepted) / len(full), sum(drafted) / len(full),
                         len(full))
    policy.observe_chain(drafted, accepted, [int(prop.tree_args["cand_len"][k]) for k in ks],
                         [prop.tree_args["classes"][k] for k in ks])


class ShadowChains:
    """Chain candidates that were not drafted, checked against the tokens their request commits
    next: per chain class the acceptance a drafted chain would have had, learned from plain
    steps at no forward cost (greedy: the same first mismatch; sampled: a draft equals the
    sampled token with the probability rejection sampling accepts it). One pending chain per
    slot, resolved at its first mismatch or once every draft was checked."""

    def __init__(self, max_seqs: int, max_len: int):
        self.max_len = max(int(max_len), 1)
        self.chain = np.full((max_seqs, self.max_len), -1, dtype=np.int64)
        self.length = np.zeros(max_seqs, dtype=np.int64)   # drafts pending (0: none)
        self.start = np.zeros(max_seqs, dtype=np.int64)    # committed tokens when proposed
        self.cls = np.zeros(max_seqs, dtype=np.int64)

    def drop(self, slots) -> None:
        self.length[list(slots)] = 0

    def resolve(self, rows: np.ndarray, slots: np.ndarray, nums: np.ndarray,
                token_ids: np.ndarray) -> tuple[list[int], list[int], list[int]] | None:
        """Pending chains of ``slots`` (batch ``rows``, ``nums`` committed tokens in
        ``token_ids``) that can be decided now (a draft differs from the committed token, or
        every draft was checked): their drafts, accepted drafts and classes; those chains end.
        A compiled loop (lade_vllm.shadow_jit)."""
        out = np.empty((slots.shape[0], 3), dtype=np.int64)
        done = resolve_kernel(rows, slots, nums, token_ids, self.chain, self.length, self.start,
                              self.cls, out)
        if not done:
            return None
        return out[:done, 0].tolist(), out[:done, 1].tolist(), out[:done, 2].tolist()

    def begin(self, slots: np.ndarray, nums: np.ndarray, cands: np.ndarray,
              classes: list[int | None], caps: np.ndarray) -> None:
        """Record the chain candidates (``cands`` [B, K], -1 padded, cut to ``caps``) of the
        slots without a pending chain; rows whose class is None have none."""
        begin_kernel(slots, nums, np.ascontiguousarray(cands, dtype=np.int64),
                     np.array([-1 if c is None else c for c in classes], dtype=np.int64),
                     np.ascontiguousarray(caps, dtype=np.int64), self.chain, self.length,
                     self.start, self.cls)

    def report(self, policy, rows: list[tuple], token_ids: np.ndarray) -> None:
        """Resolve the pending chains of the engine's ``rows`` (row, request, slot, last, num)
        against ``token_ids`` and tell ``policy`` (``observe_shadow``)."""
        seen = self.resolve(*row_arrays(rows), token_ids)
        if seen is not None:
            policy.observe_shadow(*seen)

    def record(self, rows: list[tuple], chains, cut, slot_cap: torch.Tensor) -> None:
        """Begin the shadows of this step's chain candidates (``chains``: candidates, classes)
        that are not drafted: all of them, or at CHAIN (``cut``: the policy's per-class
        lengths; falsy otherwise) those of classes cut to 0."""
        _, slots, nums = row_arrays(rows)
        classes = chains[1] if not cut else \
            [c if c is not None and not cut[c] else None for c in chains[1]]
        self.begin(slots, nums, chains[0], classes, slot_cap.numpy()[slots])


def row_arrays(rows: list[tuple]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Batch rows, slots and committed token counts of the engine's rows."""
    return (np.array([r[0] for r in rows], dtype=np.int64),
            np.array([r[2] for r in rows], dtype=np.int64),
            np.array([r[4] for r in rows], dtype=np.int64))
