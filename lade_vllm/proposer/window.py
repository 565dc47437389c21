"""Jacobi lookahead windows for ``max_seqs`` sequence slots.

Representation: ``levels`` [S, L, W] with L = N-1 levels and W columns. Level l, column c holds the
guess for position p+l+c, where p is the position of the last committed token t (the root of the
step tree). Row 0 is [t, level0...]: ``levels[:, 0, 0]`` is a placeholder (-1, t is not stored here;
it is passed to every call), ``levels[:, 0, 1:]`` are the W-1 level-0 tokens. ``filled[s]`` counts the
filled levels (0 = slot not started, 1 = only row 0, L = full).

Per-slot widths (``width[s] <= W``) are supported: columns >= width are kept at -1 and ignored.

Step life cycle (fused lookahead + verification, one forward per step):

* ``init``: level 0 gets width-1 tokens drawn uniformly, with replacement, from the prompt
  (``torch.Generator`` seeded per slot, so reproducible); filled = 1.
* each step feeds levels 0..filled-1 (see ``tree.build_step_trees``). The *top* level is level
  filled-1; the target's argmax at its nodes (``top_outputs`` [B, W], column c = output at top-level
  column c; for filled == 1 column 0 is the output at t itself) is the guess one level further.
* ``update`` while warming up (filled < L): the outputs are appended as level ``filled`` and nothing
  is harvested. The window is not shifted, so a level appended during warm-up sits one position later
  per committed step than where it was computed; this only perturbs the (random) initial guesses.
  The window is full after L-1 = N-2 steps; the first harvest happens in step N-1.
* ``update`` when full: W n-grams are harvested, column c giving (row0[c], level1[c], ...,
  level_{L-1}[c], new[c]) with row0[0] = t, the last committed token *of the step that produced the
  outputs* (``last_tokens``); then the window shifts one level: level0 <- level1[1:],
  level_l <- level_{l+1}, top <- new. The shift is one column whatever the number of accepted tokens
  (as in the reference).
"""
from __future__ import annotations

from typing import Sequence

import torch

_EMPTY = -1


class JacobiWindows:
    """Window state for ``max_seqs`` slots; see the module docstring."""

    def __init__(self, max_seqs: int, window_size: int, ngram_size: int,
                 device: str | torch.device = "cpu"):
        if ngram_size < 2:
            raise ValueError(f"ngram_size must be >= 2, got {ngram_size}")
        if window_size < 1:
            raise ValueError(f"window_size must be >= 1, got {window_size}")
        self.max_seqs = max_seqs
        self.window_size = window_size
        self.ngram_size = ngram_size
        self.num_levels = ngram_size - 1
        self.device = torch.device(device)
        self.levels = torch.full((max_seqs, self.num_levels, window_size), _EMPTY, dtype=torch.long,
                                 device=self.device)
        self.filled = torch.zeros(max_seqs, dtype=torch.long, device=self.device)
        self.width = torch.full((max_seqs,), window_size, dtype=torch.long, device=self.device)
        self._cols = torch.arange(window_size, device=self.device)
        self._cols_b = torch.arange(max_seqs, device=self.device)

    def init(self, slots: Sequence[int] | torch.Tensor, prompts: Sequence[torch.Tensor],
             seed: int | Sequence[int], width: int | Sequence[int] | None = None) -> None:
        """Start the windows of ``slots`` (k of them) from ``prompts`` (k LongTensors [L_i], L_i >= 1).

        ``seed``: each slot draws from its own ``torch.Generator`` seeded with ``seed`` (an int) or
        ``seed[i]`` (a sequence), so the result does not depend on which slots are started together.
        ``width``: columns used (default W).
        """
        slots = [int(s) for s in torch.as_tensor(slots).reshape(-1).tolist()]
        seeds = [int(seed)] * len(slots) if isinstance(seed, int) else [int(x) for x in seed]
        if width is None:
            widths = [self.window_size] * len(slots)
        elif isinstance(width, int):
            widths = [width] * len(slots)
        else:
            widths = [int(x) for x in width]
        for slot, prompt, sd, w in zip(slots, prompts, seeds, widths, strict=True):
            if not 1 <= w <= self.window_size:
                raise ValueError(f"width must be in [1, {self.window_size}], got {w}")
            prompt = torch.as_tensor(prompt).reshape(-1).long().cpu()
            if prompt.numel() == 0:
                raise ValueError("cannot start a window from an empty prompt")
            gen = torch.Generator().manual_seed(sd)
            pick = torch.randint(prompt.numel(), (w - 1,), generator=gen)
            row = torch.full((self.num_levels, self.window_size), _EMPTY, dtype=torch.long)
            row[0, 1:w] = prompt[pick]
            self.levels[slot] = row.to(self.device)
            self.filled[slot] = 1
            self.width[slot] = w

    def reset(self, slots: torch.Tensor) -> None:
        """Forget ``slots`` [k] (filled = 0)."""
        slots = torch.as_tensor(slots, dtype=torch.long, device=self.device).reshape(-1)
        self.levels[slots] = _EMPTY
        self.filled[slots] = 0
        self.width[slots] = self.window_size

    def window_inputs(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(levels [B, L, W], filled [B], width [B])`` for ``slots`` [B] (copies).

        Only levels < filled and columns < width are meant to be fed; ``levels[:, 0, 0]`` is a
        placeholder for t.
        """
        slots = slots.long()
        return self.levels[slots], self.filled[slots], self.width[slots]

    def update(self, slots: torch.Tensor, last_tokens: torch.Tensor,
               top_outputs: torch.Tensor) -> torch.Tensor:
        """Advance the windows of ``slots`` [B] after one step.

        ``last_tokens`` [B]: t of the step (row 0 column 0). ``top_outputs`` [B, W]: target argmax at
        the top level's nodes (columns >= width ignored). Slots with filled == 0 are left alone.

        Returns the harvested n-grams [B, W, N] (int64); rows are -1 where nothing was harvested
        (warm-up, unused columns, slot not started), so they can go straight to ``NgramPool.insert``.
        """
        slots = slots.long()
        B, L, W = slots.numel(), self.num_levels, self.window_size
        lv = self.levels.index_select(0, slots)                                    # [B, L, W]
        filled = self.filled.index_select(0, slots)
        width = self.width.index_select(0, slots)
        col_ok = self._cols[None, :] < width[:, None]                             # [B, W]
        top = torch.where(col_ok, top_outputs.long(), _EMPTY)
        full = filled == L
        all_full = bool(full.all())

        # harvest: column c of [row0 (t at column 0) | levels 1.. | top]
        stacked = torch.cat([lv, top[:, None]], 1)                                 # [B, L+1, W]
        shifted = stacked[:, 1:]                   # the levels after the shift (a view: written last)
        stacked[:, 0, 0] = last_tokens
        ngrams = stacked.transpose(1, 2)                                           # [B, W, N]
        ok = col_ok & (ngrams.min(-1).values >= 0)
        if not all_full:
            ok &= full[:, None]
        ngrams = torch.where(ok[:, :, None], ngrams, _EMPTY)

        shifted[:, 0, 0] = _EMPTY
        if all_full:
            self.levels.index_copy_(0, slots, shifted)
            return ngrams
        started = filled > 0
        appended = lv.clone()
        appended[self._rows(B), filled.clamp(max=L - 1)] = top
        new = torch.where(full[:, None, None], shifted, appended)
        new = torch.where(started[:, None, None], new, lv)
        self.levels[slots] = new
        self.filled[slots] = torch.where(started & ~full, filled + 1, filled)
        return ngrams

    def _rows(self, B: int) -> torch.Tensor:
        return self._cols_b[:B] if B <= self._cols_b.numel() else torch.arange(B, device=self.device)
