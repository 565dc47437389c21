"""A CHAIN step without a tree (no vLLM import): each request's context match, cut to its match
class's length, laid out as a chain (depth = index, parent = index - 1), walked to the first
mismatch and reported to the policy. The lookahead state is left alone: the slots catch up on the
committed tokens when trees resume, as after plain steps."""
from __future__ import annotations

import numpy as np
import torch

from lade_vllm.chains import CHAIN_CLASSES, match_class
from lade_vllm.policy import CHAIN
from lade_vllm.proposal import Proposal, StepPlan


def count_matches(match_len: list[int]) -> list[int]:
    """Requests with a context match, per match class."""
    counts = [0] * CHAIN_CLASSES
    for n in match_len:
        if n:
            counts[match_class(n)] += 1
    return counts


def propose_chains(req_ids, slots: torch.Tensor, lasts: torch.Tensor, suffix, cut: list[int],
                   slot_cap: torch.Tensor) -> Proposal:
    """Per request its match (``suffix``: candidates [B, K], match lengths [B]) cut to
    ``cut[class]`` and to the request's own cap ``slot_cap`` [B]."""
    suf, match_len = suffix[0].numpy(), suffix[1].tolist()
    classes = [match_class(n) for n in match_len]
    cap = torch.minimum(slot_cap, torch.tensor([cut[c] for c in classes]))
    lengths = np.minimum((suf >= 0).sum(1), cap.numpy()).tolist()  # a match: a -1 padded prefix
    drafts = [suf[b, :m].tolist() for b, m in enumerate(lengths)]
    steps = [np.arange(m + 1) for m in lengths]
    return Proposal(req_ids, slots, lasts, None, drafts, order=steps,
                    parent=[a - 1 for a in steps], depth=steps, num_trie=lengths,
                    level=CHAIN, tree_args={"cand_len": cap, "classes": classes})


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
