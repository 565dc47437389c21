"""Compiled CPU kernel of ``verify_tree`` (lade_vllm.proposer.verify): the same
``VerifyResult``, by one loop over each sequence's candidates instead of ~20 small torch ops.

Per sequence: each candidate's accepted length is the count of its leading nodes whose token
equals the target at their parent; the first candidate of the longest length gives the accepted
path, and the target at its last node (the root when none is accepted) the bonus token. Numba is
imported on the first call (lade_vllm.proposer.jit).
"""
from __future__ import annotations

import numpy as np

from .jit import Kernel


def _verify(tokens, parent, cand_node, target, root_index):
    """(emitted [B, D+1], accepted length [B], accepted nodes [B, D], last node [B]), -1 padded."""
    B, G, D = cand_node.shape
    emitted = np.full((B, D + 1), -1, dtype=np.int64)
    num_acc = np.zeros(B, dtype=np.int64)
    accepted = np.full((B, D), -1, dtype=np.int64)
    last = np.empty(B, dtype=np.int64)
    for b in range(B):
        best, best_len = 0, 0
        for g in range(G):
            n = 0
            while n < D:
                node = cand_node[b, g, n]
                if node < 0 or tokens[node] != target[parent[node]]:
                    break
                n += 1
            if n > best_len:
                best, best_len = g, n
        last[b] = root_index[b]
        for j in range(best_len):
            node = cand_node[b, best, j]
            accepted[b, j] = node
            emitted[b, j] = tokens[node]
            last[b] = node
        num_acc[b] = best_len
        emitted[b, best_len] = target[last[b]]
    return emitted, num_acc, accepted, last


#: ``_verify`` compiled (lade_vllm.proposer.jit)
verify_kernel = Kernel(globals(), "_verify")


def warm() -> None:
    """Compile (or load) the kernel on a one-node tree."""
    zero = np.zeros(1, dtype=np.int64)
    verify_kernel(zero, -np.ones(1, dtype=np.int64), np.zeros((1, 0, 0), dtype=np.int64), zero,
                  zero)
