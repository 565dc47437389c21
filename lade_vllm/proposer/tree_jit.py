"""Compiled CPU kernel of ``build_step_trees`` (lade_vllm.proposer.tree): the same ``StepTree``
fields, built by loops over each sequence instead of ~40 small torch ops.

Two passes over the batch in one call:

1. per sequence: its window shape (levels f, columns w), each candidate's fed length (tokens
   before the first negative one, cut at ``cand_len``; only the newest ``num_cands`` usable
   candidates), the fed candidates in trie order (merged: sorted lexicographically, a shorter
   candidate after the longer ones sharing its prefix, stable; unmerged: input order) and each
   one's common prefix with the previous one. Its node count follows: root + window grid +
   one trie node per token not shared with the previous candidate.
2. the node offsets (cumsum), then each sequence's nodes in the documented order: root, window
   grid level-major, trie depth-major (inside one depth in candidate order, i.e. lexicographic
   order of the node's prefix), with the node index of every fed candidate token.

The trie of sorted candidates needs no key packing: candidates sharing a depth-j prefix are
adjacent, so the first of them owns the node and the others take it from their predecessor.
Numba is imported on the first call (lade_vllm.proposer.jit); ``warm()`` compiles it early.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from .jit import Kernel

#: stands for an optional per-sequence input that was not given
_ABSENT = np.zeros(0, dtype=np.int64)


def _window_shape(num_filled, window_size, b, L, W):
    """(levels f, columns w) fed for sequence b: both 0 when either is 0."""
    f = min(max(num_filled[b], 0), L)
    w = W if window_size.shape[0] == 0 else min(max(window_size[b], 0), W)
    if f == 0 or w == 0:
        return 0, 0
    return f, w


def _fed_lengths(cands, cand_valid, b, D, num_cands, cand_len, elen):
    """elen[b, g]: tokens of candidate g fed (0: not fed). A candidate ends before its first
    negative token (one starting with it is not usable); of the usable ones only the newest
    ``num_cands[b]`` (the last in the input) are kept; at most ``cand_len[b]`` tokens each."""
    G = cands.shape[1]
    keep = G if num_cands.shape[0] == 0 else num_cands[b]
    cap = D if cand_len.shape[0] == 0 else min(max(cand_len[b], 0), D)
    usable = 0
    for g in range(G - 1, -1, -1):            # newest first
        n = 0
        if cand_valid[b, g]:
            while n < D and cands[b, g, n] >= 0:
                n += 1
        if n > 0:
            usable += 1
            if usable > keep:
                n = 0
        elen[b, g] = min(n, cap)


def _before(cands, b, g1, n1, g2, n2):
    """Candidate g1 (n1 tokens) sorts strictly before g2 (n2 tokens): lexicographically, a
    candidate that ends sorting after every token (so after the longer ones sharing its prefix)."""
    for j in range(min(n1, n2)):
        t1, t2 = cands[b, g1, j], cands[b, g2, j]
        if t1 != t2:
            return t1 < t2
    return n1 > n2


def _trie_order(cands, b, elen, merge, order, lcp):
    """order[b, :n]: the n fed candidates of sequence b in trie order (merged: lexicographic,
    stable insertion sort; else input order); lcp[b, i]: tokens that order[b, i] shares with
    order[b, i-1] from the start (0 for the first, and everywhere without merging).
    Returns n."""
    G = cands.shape[1]
    n = 0
    for g in range(G):
        e = elen[b, g]
        if e == 0:
            continue
        i = n
        if merge:
            while i > 0 and _before(cands, b, g, e, order[b, i - 1], elen[b, order[b, i - 1]]):
                order[b, i] = order[b, i - 1]
                i -= 1
        order[b, i] = g
        n += 1
    for i in range(n):
        k = 0
        if merge and i > 0:
            g1, g2 = order[b, i - 1], order[b, i]
            m = min(elen[b, g1], elen[b, g2])
            while k < m and cands[b, g1, k] == cands[b, g2, k]:
                k += 1
        lcp[b, i] = k
    return n


def _fill_sequence(b, s, f, w, last_tokens, levels, cands, elen, order, lcp, n,
                   tokens, depth, parent, node_seq, is_trie, top, cand_node):
    """Write sequence b's nodes from global index s: root, window grid, trie."""
    tokens[s], depth[s], parent[s], node_seq[s], is_trie[s] = last_tokens[b], 0, -1, b, False
    k = s + 1
    for l in range(f):
        for c in range(w):
            if l == 0 and c == 0:
                continue
            tokens[k] = levels[b, l, c]
            depth[k] = l + c
            # row 0 column c hangs off column c-1, level l off level l-1 (same column)
            parent[k] = s + c - 1 if l == 0 else s + (l - 1) * w + c
            node_seq[k] = b
            is_trie[k] = False
            k += 1
    for c in range(w):
        top[b, c] = s + (f - 1) * w + c
    D = cand_node.shape[2]
    for j in range(D):
        for i in range(n):
            g = order[b, i]
            if elen[b, g] <= j:
                continue
            if lcp[b, i] <= j:                # first candidate with this depth-j prefix: a node
                tokens[k] = cands[b, g, j]
                depth[k] = j + 1
                parent[k] = s if j == 0 else cand_node[b, g, j - 1]
                node_seq[k] = b
                is_trie[k] = True
                cand_node[b, g, j] = k
                k += 1
            else:                             # the previous candidate's node
                cand_node[b, g, j] = cand_node[b, order[b, i - 1], j]


def _build(last_tokens, levels, num_filled, cands, cand_valid, D, window_size, num_cands,
          cand_len, merge):
    B, L, W = levels.shape
    G = cands.shape[1]
    filled = np.zeros(B, dtype=np.int64)
    width = np.zeros(B, dtype=np.int64)
    elen = np.zeros((B, G), dtype=np.int64)
    order = np.zeros((B, G), dtype=np.int64)
    lcp = np.zeros((B, G), dtype=np.int64)
    nfed = np.zeros(B, dtype=np.int64)
    seq_start = np.zeros(B + 1, dtype=np.int64)
    # pass 1: shapes, fed candidates, node counts
    for b in range(B):
        f, w = _window_shape(num_filled, window_size, b, L, W)
        filled[b], width[b] = f, w
        _fed_lengths(cands, cand_valid, b, D, num_cands, cand_len, elen)
        n = _trie_order(cands, b, elen, merge, order, lcp)
        nfed[b] = n
        count = max(f * w, 1)
        for i in range(n):
            count += elen[b, order[b, i]] - lcp[b, i]
        seq_start[b + 1] = seq_start[b] + count
    # pass 2: the nodes
    T = seq_start[B]
    tokens = np.empty(T, dtype=np.int64)
    depth = np.empty(T, dtype=np.int64)
    parent = np.empty(T, dtype=np.int64)
    node_seq = np.empty(T, dtype=np.int64)
    is_trie = np.empty(T, dtype=np.bool_)
    top = np.full((B, W), -1, dtype=np.int64)
    cand_node = np.full((B, G, D), -1, dtype=np.int64)
    for b in range(B):
        _fill_sequence(b, seq_start[b], filled[b], width[b], last_tokens, levels, cands, elen,
                      order, lcp, nfed[b], tokens, depth, parent, node_seq, is_trie, top,
                      cand_node)
    num_nodes = seq_start[1:] - seq_start[:-1]
    return (tokens, depth, parent, node_seq, is_trie, seq_start, num_nodes, filled, width,
            top, cand_node)


#: ``_build`` compiled (lade_vllm.proposer.jit)
build_kernel = Kernel(globals(), "_window_shape", "_fed_lengths", "_before", "_trie_order",
                      "_fill_sequence", "_build")


def _array(t: torch.Tensor | None, dtype: torch.dtype) -> np.ndarray:
    """A C-contiguous numpy view (or copy) of ``t`` as ``dtype``; None -> the absent marker."""
    if t is None:
        return _ABSENT
    if t.dtype != dtype:
        t = t.to(dtype)
    a = t.numpy()
    return a if a.flags.c_contiguous else np.ascontiguousarray(a)


def step_tree_fields(last_tokens, window_levels, num_filled, cands, cand_valid, D: int,
                     window_size=None, num_cands=None, cand_len=None, merge: bool = True) -> dict:
    """``StepTree`` fields (but ``cand_len`` and ``max_depth``) of ``build_step_trees``' arguments,
    all on the CPU; ``D``: the candidate length fed (after ``max_cand_len``)."""
    out = build_kernel(_array(last_tokens, torch.int64), _array(window_levels, torch.int64),
                 _array(num_filled, torch.int64), _array(cands, torch.int64),
                 _array(cand_valid, torch.bool), D, _array(window_size, torch.int64),
                 _array(num_cands, torch.int64), _array(cand_len, torch.int64), bool(merge))
    (tokens, depth, parent, node_seq, is_trie, seq_start, num_nodes, filled, width, top,
     cand_node) = (torch.from_numpy(a) for a in out)
    return dict(tokens=tokens, depth=depth, parent=parent, node_seq=node_seq, is_trie=is_trie,
                seq_start=seq_start, num_nodes=num_nodes, root_index=seq_start[:-1],
                window_levels=filled, window_width=width, top_level_index=top,
                cand_node_index=cand_node)


def warm() -> float:
    """Compile the kernel on a tiny batch (imports numba); returns the seconds it took."""
    t0 = time.perf_counter()
    one = torch.ones(1, dtype=torch.long)
    step_tree_fields(one, torch.zeros((1, 1, 1), dtype=torch.long), one,
                     torch.zeros((1, 2, 1), dtype=torch.long), torch.ones((1, 2), dtype=torch.bool),
                     1, one, one, one, True)
    return time.perf_counter() - t0
