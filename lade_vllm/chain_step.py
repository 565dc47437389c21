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
    cap = torch.minimum(slot_cap, torch.tensor([cut[c] if c is not None else 0 for c in classes]))
    lengths = np.minimum((cands >= 0).sum(1), cap.numpy()).tolist()  # a -1 padded prefix
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
    policy.observe_level(CHAIN, 1.0 + sum(accepted) / len(full), sum(drafted) / len(full))
    policy.observe_chain(drafted, accepted, [int(prop.tree_args["cand_len"][k]) for k in ks],
                         [prop.tree_args["classes"][k] for k in ks])
