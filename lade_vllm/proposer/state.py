"""``LookaheadState``: pool + windows for ``max_seqs`` slots, one decoding step top to bottom.

    tree = state.propose(slots, last_tokens)     # pool lookup -> step tree
    target = <model forward over tree, argmax or sample per node>   # outside, [tree.total_nodes]
    result = state.commit(slots, tree, target)   # verify -> harvest into pool -> shift windows
                                                 #   -> output n-grams into pool (pool_from_prompt)
"""
from __future__ import annotations

import numpy as np
import torch

from . import storage_jit, tree_jit, verify_jit
from .pool import NgramPool, ngrams_from_tokens
from .suffix import suffix_match
from .tree import StepTree, build_step_trees
from .verify import VerifyResult, verify_tree
from .window import JacobiWindows

_EMPTY = -1
#: a tree takes context matches of at least this many tokens (chains take any match)
TREE_MIN_MATCH = 2


class LookaheadState:
    """Per-slot lookahead state (n-gram pool, Jacobi window, last N-1 committed tokens)."""

    def __init__(self, max_seqs: int, window_size: int, ngram_size: int, guess_set_size: int,
                 max_keys: int = 1024, pool_from_prompt: bool = False,
                 device: str | torch.device = "cpu", suffix_tokens: int = 0):
        self.max_seqs = max_seqs
        self.suffix_tokens = suffix_tokens  # length of the context suffix-match candidate (0: off)
        self.window_size = window_size
        self.ngram_size = ngram_size
        self.guess_set_size = guess_set_size
        self.device = torch.device(device)
        self.pool = NgramPool(max_seqs, ngram_size, guess_set_size, max_keys=max_keys, device=device)
        self.windows = JacobiWindows(max_seqs, window_size, ngram_size, device=device)
        self.pool_from_prompt = pool_from_prompt
        self.output_ngrams = torch.zeros(max_seqs, dtype=torch.bool, device=self.device)
        # last N-1 committed tokens per slot (the last one is t), -1 left padding
        self.history = torch.full((max_seqs, ngram_size - 1), _EMPTY, dtype=torch.long,
                                  device=self.device)

    def start(self, slot: int, tokens: torch.Tensor, seed: int,
              pool_from_prompt: bool | None = None, width: int | None = None) -> None:
        """Start ``slot`` from ``tokens`` [L] = every committed token so far (prompt, plus any token
        already generated); the last one is the t of the first ``propose``."""
        tokens = torch.as_tensor(tokens).reshape(-1).long().to(self.device)
        pfp = self.pool_from_prompt if pool_from_prompt is None else pool_from_prompt
        slot_t = torch.tensor([slot], device=self.device)
        self.pool.reset(slot_t)
        self.windows.init([slot], [tokens], seed, width=width)
        if pfp:
            grams = ngrams_from_tokens(tokens, self.ngram_size)
            self.pool.insert(slot_t.expand(grams.shape[0]), grams)
        self.output_ngrams[slot] = pfp
        hist = torch.full((self.ngram_size - 1,), _EMPTY, dtype=torch.long, device=self.device)
        tail = tokens[-(self.ngram_size - 1):]
        hist[hist.numel() - tail.numel():] = tail
        self.history[slot] = hist

    def catch_up(self, slots: list[int], tails: list, num_new: list[int]) -> None:
        """Tell ``slots`` about ``num_new`` tokens each, committed without ``commit`` (steps
        decoded without a verified tree). ``tails[i]`` [k]: slot i's last committed tokens, its
        new ones preceded by up to N-1 older ones. Refreshes the histories and adds the output
        n-grams, all slots in one pool insert (the same pools as one insert per slot)."""
        N = self.ngram_size
        rows, grams_all = [], []
        for slot, tail, new in zip(slots, tails, num_new):
            tail = torch.as_tensor(tail).reshape(-1).long().to(self.device)
            hist = torch.full((N - 1,), _EMPTY, dtype=torch.long, device=self.device)
            last = tail[-(N - 1):]
            hist[hist.numel() - last.numel():] = last
            self.history[slot] = hist
            if new > 0 and bool(self.output_ngrams[slot]):
                grams = ngrams_from_tokens(tail[-(new + N - 1):], N)
                if grams.shape[0]:
                    rows.append(torch.full((grams.shape[0],), slot, device=self.device))
                    grams_all.append(grams)
        if rows:
            self.pool.insert(torch.cat(rows), torch.cat(grams_all))

    def free(self, slots: torch.Tensor) -> None:
        """Forget ``slots`` [k] (request finished, aborted or preempted)."""
        slots = torch.as_tensor(slots, dtype=torch.long, device=self.device).reshape(-1)
        self.pool.reset(slots)
        self.windows.reset(slots)
        self.output_ngrams[slots] = False
        self.history[slots] = _EMPTY

    def propose(self, slots: torch.Tensor, last_tokens: torch.Tensor,
                enabled: torch.Tensor | None = None, max_cand_len: int | None = None,
                use_window: torch.Tensor | None = None, num_cands: torch.Tensor | None = None,
                cand_len: torch.Tensor | None = None, contexts: list | None = None,
                suffix_only: bool = False, suffix: torch.Tensor | None = None) -> StepTree:
        """Step tree for ``slots`` [B] whose last committed tokens are ``last_tokens`` [B].

        ``contexts``: per sequence its committed tokens (prompt + output, numpy int arrays, the
        last one is ``last_tokens``); with ``suffix_tokens`` > 0 their suffix match is one more
        candidate, placed newest (a one-candidate step takes it when there is one);
        ``suffix_only`` leaves the pool's candidates out (a sequence without a match gets a
        root-only tree), if the suffix match is on. ``suffix``: ``suffix_match(contexts)`` when
        the caller computed it already.

        ``enabled`` [B] bool: sequences with False get a root-only tree (plain decoding).
        ``use_window`` [B] bool: False leaves the window out of this step (it stays frozen; only
        pool candidates are verified). ``num_cands`` [B] / ``cand_len`` [B]: at most that many
        candidates, of at most that many tokens, per sequence."""
        slots = slots.long()
        cands, valid = self.pool.lookup(slots, last_tokens)
        if contexts is not None and self.suffix_tokens > 0:
            if suffix_only:
                valid = torch.zeros_like(valid)
            if suffix is None:
                suffix = self.suffix_match(contexts)
            cands, valid = self._with_suffix(cands, valid, suffix)
        levels, filled, width = self.windows.window_inputs(slots)
        if enabled is not None:
            filled = torch.where(enabled, filled, 0)
            valid = valid & enabled[:, None]
        if use_window is not None:
            filled = torch.where(use_window, filled, 0)
        return build_step_trees(last_tokens, levels, filled, cands, valid,
                                max_cand_len=max_cand_len, window_size=width,
                                num_cands=num_cands, cand_len=cand_len)

    def warm(self) -> None:
        """Load the numba kernels now (the suffix matcher when it is on; on CPU the pool's insert
        and lookup, the tree and storage-order builders), not in the first request's first step:
        well under a second from numba's disk cache, several seconds compiling them."""
        self.suffix_match([np.zeros(2, dtype=np.int64)])
        self.pool.warm()
        if self.device.type == "cpu":
            tree_jit.warm()
            storage_jit.warm()
            verify_jit.warm()

    def suffix_match(self, contexts: list) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Per context its suffix-match candidate, ``[B, suffix_tokens]`` (-1 padded; all -1: no
        match), matched on a suffix of 1 to 8 tokens, and ``[B]`` that length (0: no match); None
        when the suffix match is off."""
        if self.suffix_tokens <= 0:
            return None
        return suffix_match(contexts, self.suffix_tokens, min_n=1)

    def _with_suffix(self, cands, valid, suffix):
        """Append the suffix-match candidates after the pool's (padded to one length); a tree
        takes matches of at least ``TREE_MIN_MATCH`` tokens (a one-token match is the pool's
        lookup already). No match in the batch: the pool's candidates alone."""
        suf, lengths = suffix
        suf = torch.where((lengths >= TREE_MIN_MATCH)[:, None], suf, _EMPTY)
        longest = int((suf >= 0).sum(1).max()) if suf.numel() else 0
        if longest == 0:
            return cands, valid
        B, G, D = cands.shape
        suf = suf[:, :longest].to(cands.device)   # the tree gets no deeper than its longest match
        width = max(D, longest)
        out = torch.full((B, G + 1, width), _EMPTY, dtype=torch.long, device=cands.device)
        out[:, :G, :D] = cands
        out[:, G, :suf.shape[1]] = suf
        return out, torch.cat([valid, (suf[:, :1] >= 0)], 1)

    def commit(self, slots: torch.Tensor, tree: StepTree, target: torch.Tensor) -> VerifyResult:
        """Verify with per-node ``target`` [tree.total_nodes], then update pool and windows.

        Returns the ``VerifyResult`` (emitted tokens [B, D+1], -1 padded; the caller may still cut
        them at EOS / max_tokens)."""
        slots = slots.long()
        target = target.long()
        result = verify_tree(tree, target)
        W, N = self.window_size, self.ngram_size
        last = tree.tokens[tree.root_index]
        top_idx = tree.top_level_index
        top = torch.where(top_idx >= 0, target[top_idx.clamp(min=0)], _EMPTY)
        # sequences without a window this step (disabled) keep their window frozen
        wslots = torch.where(tree.window_levels > 0, slots, -1)
        active = wslots >= 0
        n_active = int(active.sum())
        if n_active == slots.numel():
            grams = self.windows.update(slots, last, top)
        elif n_active == 0:  # no window this step (candidates only): no window n-grams
            grams = torch.empty((0, W, N), dtype=torch.long, device=self.device)
            wslots = wslots[:0]
        else:
            grams = torch.full((slots.numel(), W, N), _EMPTY, dtype=torch.long, device=self.device)
            grams[active] = self.windows.update(slots[active], last[active], top[active])
        rows_slot = wslots[:, None].expand(-1, W)
        if bool(self.output_ngrams.any()):
            out_slot, out_grams = self._output_ngrams(slots, result)
            self.pool.insert(torch.cat([rows_slot.reshape(-1), out_slot]),
                             torch.cat([grams.reshape(-1, N), out_grams]))
        else:
            self._advance_history(slots, result)
            self.pool.insert(rows_slot.reshape(-1), grams.reshape(-1, N))
        return result

    def _advance_history(self, slots: torch.Tensor, result: VerifyResult) -> torch.Tensor:
        """Append the emitted tokens to ``history``; returns history ++ emitted [B, N-1 + D+1]."""
        seq = torch.cat([self.history[slots], result.emitted], 1)
        idx = result.num_emitted[:, None] + torch.arange(self.ngram_size - 1, device=self.device)
        self.history[slots] = seq.gather(1, idx)
        return seq

    def _output_ngrams(self, slots: torch.Tensor, result: VerifyResult):
        """N-grams ending at each emitted token, for slots with output n-grams on: ([M], [M, N])."""
        N = self.ngram_size
        seq = self._advance_history(slots, result)                              # [B, N-1+E]
        grams = seq.unfold(1, N, 1)                                              # [B, E, N]
        E = grams.shape[1]
        ok = (torch.arange(E, device=self.device)[None, :] < result.num_emitted[:, None]) \
            & self.output_ngrams[slots][:, None]
        rows_slot = torch.where(ok, slots[:, None], -1)
        return rows_slot.reshape(-1), grams.reshape(-1, N)
