"""Recycled successors: per token, the token the model predicted after it the last time a row had
it as input (Token Recycling, arXiv 2408.08696, top-1). No vLLM import.

Every verification computes a target for each row it reads (the root and the candidates'
nodes): the argmax for greedy requests, a sample for sampled ones; every committed token is the
target after the token before it, plain steps included. Those are free predictions; the table
keeps, per input token, the latest one. A request with no context match drafts the chain
``table[last]``, ``table[table[last]]``, ... (the policy's ``RECYCLED`` chain class decides
whether and how long). One table per engine, shared by its requests: int32 ``[vocab + 1]`` (the
last entry a -1 sentinel), 4 bytes per vocabulary entry, no growth. Plain numpy: a step touches a
few entries, where a torch op's overhead would dominate; the smallest cases (a batch-1 step's few
rows, a short chain) run as plain Python, cheaper still than numpy's per-call overhead.
"""
from __future__ import annotations

import numpy as np

from .jit import Kernel

#: at most this many rows (update) or chains (chains) take the plain-Python path
SMALL = 8


class Successors:
    """``table[t]``: the latest target seen for a row whose input token was ``t`` (-1: none)."""

    def __init__(self, vocab_size: int):
        self.vocab = int(vocab_size)
        self.table = np.full(self.vocab + 1, -1, dtype=np.int32)

    def update(self, tokens: np.ndarray, targets: np.ndarray) -> None:
        """Rows with input ``tokens`` [M] had ``targets`` [M]; later rows win on repeats."""
        tokens, targets = np.asarray(tokens), np.asarray(targets)
        v = self.vocab
        if tokens.size <= SMALL:   # in row order: later rows overwrite earlier ones
            table = self.table
            for t, g in zip(tokens.tolist(), targets.tolist()):
                if 0 <= t < v and 0 <= g < v:
                    table[t] = g
            return
        ok = (tokens >= 0) & (tokens < v) & (targets >= 0) & (targets < v)
        if not ok.all():
            tokens, targets = tokens[ok], targets[ok]
        if tokens.size > 1:   # the last row per token: first occurrence in the reversed rows
            _, first = np.unique(tokens[::-1], return_index=True)
            last = tokens.size - 1 - first
            tokens, targets = tokens[last], targets[last]
        self.table[tokens] = targets

    def chains(self, lasts: np.ndarray, length: int) -> np.ndarray:
        """``[B, length]`` int64: each row's chain of successors from ``lasts`` [B], -1 from the
        first token without one."""
        x = np.asarray(lasts, dtype=np.int64)
        out = np.full((x.size, max(int(length), 0)), -1, dtype=np.int64)
        v = self.vocab
        if x.size <= SMALL:
            table = self.table
            for b, t in enumerate(x.tolist()):
                for d in range(out.shape[1]):
                    if not 0 <= t < v:
                        break
                    t = int(table[t])
                    if t < 0:
                        break
                    out[b, d] = t
            return out
        x = np.where((x >= 0) & (x < v), x, v)      # v: the sentinel, whose successor is -1
        for d in range(out.shape[1]):
            x = self.table[x]
            out[:, d] = x
            x = np.where(x >= 0, x, v)
        return out


def _commit_pairs(token_ids, rows, slots, nums, upto, table):
    """``Recycler.committed``: table[t] = the token after t, over each slot's new tokens."""
    vocab = table.shape[0] - 1
    for i in range(rows.shape[0]):
        s, num = slots[i], nums[i]
        for p in range(upto[s], num):
            t, g = token_ids[rows[i], p - 1], token_ids[rows[i], p]
            if 0 <= t < vocab and 0 <= g < vocab:
                table[t] = g
        if num > upto[s]:
            upto[s] = num


commit_kernel = Kernel(globals(), "_commit_pairs")


class Recycler:
    """The engine's successor table and, per slot, how far its committed tokens were recycled."""

    def __init__(self, vocab_size: int, max_seqs: int):
        self.successors = Successors(vocab_size)
        self.upto = np.zeros(max_seqs, dtype=np.int64)   # committed tokens recycled per slot

    @property
    def table(self) -> np.ndarray:
        return self.successors.table

    def start(self, slot: int, num_tokens: int) -> None:
        """A slot starts with ``num_tokens`` committed: the last one (the prefill's prediction
        after the prompt) is recycled at the next proposal; the prompt's own pairs are text."""
        self.upto[slot] = max(num_tokens - 1, 1)

    def committed(self, token_ids: np.ndarray, rows: np.ndarray, slots: np.ndarray,
                  nums: np.ndarray) -> None:
        """Each token committed since a slot was last seen is the model's target after the token
        before it (plain steps and requests without drafts included): batch row ``rows[i]`` of
        ``token_ids`` holds slot ``slots[i]``'s ``nums[i]`` committed tokens. A compiled loop
        over the new pairs, in batch order (later pairs win)."""
        commit_kernel(token_ids, rows, slots, nums, self.upto, self.successors.table)

    def verified(self, tokens: np.ndarray, targets: np.ndarray) -> None:
        """Verified rows: input ``tokens``, their ``targets``."""
        self.successors.update(tokens, targets)

    def chains(self, lasts: np.ndarray, length: int) -> np.ndarray:
        return self.successors.chains(lasts, length)
