"""Exact verification of the candidate trie of a ``StepTree``.

Input: one target token per node, ``target`` [T]. Greedy: the argmax of the target logits at that
node. Sampling: one token drawn from the target's (processed) distribution at that node, with noise
independent across depths (nodes at one depth may share it: lade_vllm.adapter.sampling gives every node at
depth d the noise of output position d).

Rule: starting at the root, repeatedly move to the child trie node whose token equals the target token
of the current node; stop when there is none. Emit the tokens of the accepted nodes plus the target
token of the last accepted node (or of the root): 1..D+1 tokens.

Greedy: this is "longest candidate prefix matching the argmax chain". Sampling: trie children have
distinct tokens and drafts are deterministic, so multi-draft rejection sampling (try each child token
x in turn, accept with probability p(x) renormalised over the not-yet-rejected tokens, else zero it;
if all reject, sample the residual) picks child x exactly with probability p(x) and otherwise samples
from p restricted to non-children: the same law as drawing y ~ p and following the child equal to y.
So emitted tokens follow the target distribution exactly. Sharing noise within a depth changes
nothing: the accepted path holds one node per depth, the node at depth d is decided by the noise of
depths < d only, and the noise of depth d then draws its target as a fresh sample.

On a tree built with ``merge=False`` (siblings may repeat tokens) the earliest longest candidate wins.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .tree import StepTree
from . import jit
from .verify_jit import verify_kernel


@dataclass
class VerifyResult:
    emitted: torch.Tensor         # [B, D+1] emitted tokens, -1 pad
    num_emitted: torch.Tensor     # [B] 1..D+1
    accepted_nodes: torch.Tensor  # [B, D] accepted trie nodes in path order (flattened index), -1 pad
    num_accepted: torch.Tensor    # [B] = num_emitted - 1
    last_node: torch.Tensor       # [B] node whose target gave the bonus token (root if none accepted)


def verify_tree(tree: StepTree, target: torch.Tensor) -> VerifyResult:
    """Accept the deepest trie path whose tokens equal the target at their parent (see module doc).
    On the CPU by a compiled kernel (lade_vllm.proposer.verify_jit; ``LADE_JIT=0``: torch ops)."""
    target = target.long()
    if target.is_cpu and tree.tokens.is_cpu and jit.enabled():
        emitted, num_acc, accepted, last = (torch.from_numpy(a) for a in verify_kernel(
            tree.tokens.numpy(), tree.parent.numpy(), tree.cand_node_index.contiguous().numpy(),
            target.numpy(), tree.root_index.numpy()))
        return VerifyResult(emitted=emitted, num_emitted=num_acc + 1, accepted_nodes=accepted,
                            num_accepted=num_acc, last_node=last)
    B, D = tree.num_seqs, tree.cand_len
    dev = target.device
    cni = tree.cand_node_index                                                # [B, G, D]
    if cni.numel():
        node_ok = tree.tokens == target[tree.parent.clamp(min=0)]             # [T]
        ok = (cni >= 0) & node_ok[cni.clamp(min=0)]
        length = ok.long().cumprod(-1).sum(-1)                                # [B, G]
        num_acc, best = length.max(1)                                         # first max wins
        path = cni[torch.arange(B, device=dev), best]                         # [B, D]
    else:
        num_acc = torch.zeros(B, dtype=torch.long, device=dev)
        path = torch.full((B, D), -1, dtype=torch.long, device=dev)
    cols = torch.arange(D, device=dev)[None, :]
    accepted = torch.where(cols < num_acc[:, None], path, -1)
    if D == 0:   # no candidate token fed: the root's target only
        last = tree.root_index.clone()
    else:
        last = torch.where(num_acc > 0, path.gather(1, (num_acc - 1).clamp(min=0)[:, None])[:, 0],
                           tree.root_index)
    emitted = torch.full((B, D + 1), -1, dtype=torch.long, device=dev)
    emitted[:, :D] = torch.where(accepted >= 0, tree.tokens[accepted.clamp(min=0)], -1)
    emitted.scatter_(1, num_acc[:, None], target[last][:, None])
    return VerifyResult(emitted=emitted, num_emitted=num_acc + 1, accepted_nodes=accepted,
                        num_accepted=num_acc, last_node=last)


def verify_subtree(parent: np.ndarray, tokens: np.ndarray, target: np.ndarray,
                   acceptable: np.ndarray | None = None) -> list[int]:
    """Accepted storage indices (path order, root excluded) of one (possibly truncated) tree whose
    nodes are in topological order: a node is accepted when its parent is and its token equals its
    parent's target; the deepest accepted node wins (earliest on ties).

    ``acceptable`` [n] bool restricts acceptance to some nodes. Sampled requests pass the trie
    only: its siblings have distinct tokens, whereas a window node may repeat a trie sibling's
    token, and choosing between two equal-token children by how deep they go would pick by the
    children's own samples, biasing the next emitted token."""
    n = parent.shape[0]
    ok = np.zeros(n, dtype=bool)
    ok[0] = True
    for i in range(1, n):
        ok[i] = ok[parent[i]] and tokens[i] == target[parent[i]] and (
            acceptable is None or bool(acceptable[i]))
    depth = np.zeros(n, dtype=np.int64)
    for i in range(1, n):
        depth[i] = depth[parent[i]] + 1
    best = int(np.argmax(np.where(ok, depth, -1)))
    path = []
    while best > 0:
        path.append(best)
        best = int(parent[best])
    return path[::-1]
