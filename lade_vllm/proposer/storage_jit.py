"""Compiled CPU kernel of ``lade_vllm.proposal.storage_order``: each sequence's step-tree nodes
reordered as [root | trie | window], as in vLLM's draft storage.

One stable counting sort over the key (sequence, group) with group 0 = the sequence's root,
1 = trie node, 2 = window node (the same order as ``argsort(node_seq * 3 + group,
stable=True)``), then per sequence range ``seq_start[b]..seq_start[b+1]`` of the sorted nodes:
local node index, local parent in storage order (-1 for the root), token, depth and the count of
trie nodes. Numba is imported on the first call (lade_vllm.proposer.jit).
"""
from __future__ import annotations

import time

import numpy as np

from .jit import Kernel


def _storage_perm(node_seq, is_trie, root_index):
    """order[i]: the tree node at storage index i (stable counting sort by sequence, group)."""
    T, B = node_seq.shape[0], root_index.shape[0]
    key = np.empty(T, dtype=np.int64)
    for i in range(T):
        key[i] = node_seq[i] * 3 + (1 if is_trie[i] else 2)
    for b in range(B):
        key[root_index[b]] = node_seq[root_index[b]] * 3
    start = np.zeros(3 * B + 1, dtype=np.int64)
    for i in range(T):
        start[key[i] + 1] += 1
    for k in range(3 * B):
        start[k + 1] += start[k]
    order = np.empty(T, dtype=np.int64)
    for i in range(T):
        order[start[key[i]]] = i
        start[key[i]] += 1
    return order


def _storage(node_seq, is_trie, root_index, parent, tokens, depth, seq_start):
    T, B = node_seq.shape[0], root_index.shape[0]
    order = _storage_perm(node_seq, is_trie, root_index)
    inv = np.empty(T, dtype=np.int64)
    for i in range(T):
        inv[order[i]] = i
    local = np.empty(T, dtype=np.int64)       # tree node, local to its sequence
    parent_s = np.empty(T, dtype=np.int64)    # storage-order parent, local (-1: root)
    tokens_s = np.empty(T, dtype=np.int64)
    depth_s = np.empty(T, dtype=np.int64)
    num_trie = np.zeros(B, dtype=np.int64)
    for b in range(B):
        lo = seq_start[b]
        for i in range(lo, seq_start[b + 1]):
            node = order[i]
            local[i] = node - lo
            p = parent[node]
            parent_s[i] = inv[p] - lo if p >= 0 else -1
            tokens_s[i] = tokens[node]
            depth_s[i] = depth[node]
            if is_trie[node]:
                num_trie[b] += 1
    return local, parent_s, tokens_s, depth_s, num_trie


def _ancestor_mask(parent):
    """[n, n] bool: row i marks node i and its ancestors; ``parent`` [n] in storage order
    (-1 for the root, a parent before its children), so row i is its parent's row plus i."""
    n = parent.shape[0]
    mask = np.zeros((n, n), dtype=np.bool_)
    for i in range(n):
        p = parent[i]
        if p >= 0:
            mask[i, :p + 1] = mask[p, :p + 1]
        mask[i, i] = True
    return mask


#: ``_storage`` compiled (lade_vllm.proposer.jit)
storage_kernel = Kernel(globals(), "_storage_perm", "_storage")
#: ``_ancestor_mask`` compiled
ancestor_kernel = Kernel(globals(), "_ancestor_mask")


def storage_arrays(tree):
    """(local order, storage parent, tokens, depth [T] in storage order, trie nodes [B]) of a
    CPU ``StepTree``, as numpy arrays (``storage_order`` slices them per sequence)."""
    return storage_kernel(tree.node_seq.numpy(), tree.is_trie.numpy(), tree.root_index.numpy(),
                          tree.parent.numpy(), tree.tokens.numpy(), tree.depth.numpy(),
                          tree.seq_start.numpy())


def warm() -> float:
    """Compile the kernel on a one-node tree (imports numba); returns the seconds it took."""
    t0 = time.perf_counter()
    one, zero = np.ones(1, dtype=np.int64), np.zeros(1, dtype=np.int64)
    storage_kernel(zero, np.zeros(1, dtype=np.bool_), zero, -one, one, zero,
                   np.array([0, 1], dtype=np.int64))
    ancestor_kernel(-one)
    return time.perf_counter() - t0
