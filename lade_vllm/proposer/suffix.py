"""Context suffix match: a candidate continuation copied from the request's own context.

For each sequence, find the longest suffix of its committed tokens (prompt + output), between
``min_n`` and ``MAX_MATCH`` tokens, that also occurs earlier in the context; the candidate is
what followed its earliest occurrence, up to ``k`` tokens (as vLLM's ngram proposer takes; on
HumanEval chains from the earliest occurrence are accepted further than from the most recent:
2.02 vs 1.72 tokens/step at batch 1), and the match length says
how far to trust it (the policy keeps chain statistics per match length). This is vLLM's prompt
lookup (``ngram``) as one candidate source of the lookahead tree; its length ``k`` is independent
of the n-gram size N. Compiled with numba on first use (lade_vllm.proposer.jit).
"""
from __future__ import annotations

import numpy as np
import torch

from .jit import Kernel

MIN_MATCH = 2       # suffix_candidates' default shortest match
MAX_MATCH = 8


def _match_one(tokens, min_n, max_n, k, out):
    """Fill ``out[:m]`` with the continuation of the longest earlier match; returns the match's
    length n (0: none)."""
    L = tokens.shape[0]
    for n in range(min(max_n, L - 1), min_n - 1, -1):
        # earliest occurrence of tokens[L-n:], ending before the suffix itself
        for start in range(0, L - n):
            hit = True
            for j in range(n):
                if tokens[start + j] != tokens[L - n + j]:
                    hit = False
                    break
            if hit:
                m = min(k, L - (start + n))
                for j in range(m):
                    out[j] = tokens[start + n + j]
                return n
    return 0


def _match_batch(flat, offsets, min_n, max_n, k, out, lengths):
    """``_match_one`` over every context ``flat[offsets[b]:offsets[b + 1]]``."""
    for b in range(offsets.shape[0] - 1):
        lengths[b] = _match_one(flat[offsets[b]:offsets[b + 1]], min_n, max_n, k, out[b])


#: ``_match_batch`` compiled (lade_vllm.proposer.jit)
match_kernel = Kernel(globals(), "_match_one", "_match_batch")


def suffix_match(contexts: list[np.ndarray], k: int, min_n: int = MIN_MATCH,
                 max_n: int = MAX_MATCH) -> tuple[torch.Tensor, torch.Tensor]:
    """One candidate per context: ``[B, k]`` int64, -1 after its end (all -1: no match), and
    ``[B]`` the length of the suffix it was matched on (0: no match)."""
    B = len(contexts)
    out = np.full((B, max(k, 0)), -1, dtype=np.int64)
    lengths = np.zeros(B, dtype=np.int64)
    if B == 0 or k <= 0:
        return torch.from_numpy(out), torch.from_numpy(lengths)
    lens = np.fromiter((len(c) for c in contexts), dtype=np.int64, count=B)
    offsets = np.zeros(B + 1, dtype=np.int64)
    np.cumsum(lens, out=offsets[1:])
    flat = np.concatenate(contexts).astype(np.int64, copy=False) if offsets[-1] else \
        np.zeros(0, dtype=np.int64)
    match_kernel(flat, offsets, min_n, max_n, k, out, lengths)
    return torch.from_numpy(out), torch.from_numpy(lengths)


def suffix_candidates(contexts: list[np.ndarray], k: int, min_n: int = MIN_MATCH,
                      max_n: int = MAX_MATCH) -> torch.Tensor:
    """``suffix_match``'s candidates alone."""
    return suffix_match(contexts, k, min_n, max_n)[0]
