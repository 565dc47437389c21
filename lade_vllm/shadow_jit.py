"""Compiled CPU kernels of lade_vllm.chain_step.ShadowChains (``resolve`` and ``begin``): the
same updates of its per-slot arrays, by one loop over the batch instead of ~15 numpy ops on
[B, max_len] arrays (~0.2 ms per step at batch 32). Numba is imported on the first call
(lade_vllm.proposer.jit).
"""
from __future__ import annotations

import numpy as np

from lade_vllm.proposer.jit import Kernel


def _resolve(rows, slots, nums, token_ids, chain, length, start, cls, out):
    """Resolve the pending chains of ``slots`` (batch ``rows``, ``nums`` committed tokens in
    ``token_ids``) that can be decided: rows of ``out`` [B, 3] get (drafts, accepted drafts,
    class) in batch order, their chains are cleared. Returns how many were resolved."""
    last = token_ids.shape[1] - 1
    done = 0
    for i in range(slots.shape[0]):
        s = slots[i]
        m = length[s]
        if m <= 0:
            continue
        known = max(nums[i] - start[s], 0)
        lim = min(m, known)
        a = 0
        while a < lim and token_ids[rows[i], min(start[s] + a, last)] == chain[s, a]:
            a += 1
        if a < lim or known >= m:
            length[s] = 0
            out[done, 0], out[done, 1], out[done, 2] = m, a, cls[s]
            done += 1
    return done


def _begin(slots, nums, cands, classes, caps, chain, length, start, cls):
    """Record the chain candidates ``cands`` [B, K] (-1 padded, cut to ``caps``) of the slots
    without a pending chain whose class (``classes``, -1: none) is given."""
    k = min(cands.shape[1], chain.shape[1])
    for b in range(slots.shape[0]):
        s = slots[b]
        if classes[b] < 0 or length[s] != 0:
            continue
        n = 0
        for j in range(k):
            if cands[b, j] >= 0:
                n += 1
        n = min(n, caps[b], k)
        if n <= 0:
            continue
        chain[s, :] = -1
        chain[s, :k] = cands[b, :k]
        length[s] = n
        start[s] = nums[b]
        cls[s] = classes[b]


resolve_kernel = Kernel(globals(), "_resolve")
begin_kernel = Kernel(globals(), "_begin")


def warm() -> None:
    """Compile (or load) both kernels on one slot."""
    one = np.zeros(1, dtype=np.int64)
    table = np.full((1, 1), -1, dtype=np.int64)
    resolve_kernel(one, one, one, np.zeros((1, 1), dtype=np.int32), table, one.copy(), one.copy(),
                   one.copy(), np.zeros((1, 3), dtype=np.int64))
    begin_kernel(one, one, table, -np.ones(1, dtype=np.int64), one, table.copy(), one.copy(),
                 one.copy(), one.copy())
