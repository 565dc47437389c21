"""JacobiWindows: seeded init, warm-up, harvest and shift against a hand-written model."""
from __future__ import annotations

import torch
from hypothesis import given, settings, strategies as st

from lade_vllm.proposer import JacobiWindows

from .helpers import examples


def test_init_is_reproducible_and_draws_from_prompt():
    prompt = torch.arange(100, 140)
    a = JacobiWindows(4, 8, 5)
    b = JacobiWindows(4, 8, 5)
    a.init([0, 2], [prompt, prompt], seed=[11, 12])
    b.init([2], [prompt], seed=12)          # same seed, alone, another slot -> same window
    b.init([1], [prompt], seed=11)
    assert torch.equal(a.levels[0], b.levels[1]) and torch.equal(a.levels[2], b.levels[2])
    assert not torch.equal(a.levels[0, 0], a.levels[2, 0])
    lv, filled, width = a.window_inputs(torch.tensor([0, 2]))
    assert filled.tolist() == [1, 1] and width.tolist() == [8, 8]
    assert (lv[:, 0, 0] == -1).all() and (lv[:, 1:] == -1).all()
    assert ((lv[:, 0, 1:] >= 100) & (lv[:, 0, 1:] < 140)).all()
    assert a.filled[1] == 0


class WindowModel:
    """Lists of lists; row 0 column 0 is a placeholder (t is passed to update)."""

    def __init__(self, levels: list[list[int]], width: int, L: int):
        self.levels = [row[:width] for row in levels[:1]]
        self.width, self.L = width, L

    def update(self, t: int, top: list[int]):
        top = top[:self.width]
        if len(self.levels) < self.L:
            self.levels.append(top)
            return []
        grams = []
        for c in range(self.width):
            row0 = t if c == 0 else self.levels[0][c]
            grams.append([row0] + [self.levels[l][c] for l in range(1, self.L)] + [top[c]])
        new_row0 = [-1] + (self.levels[1][1:] if self.L > 1 else top[1:])
        self.levels = [new_row0] + self.levels[2:] + ([top] if self.L > 1 else [])
        return grams


@settings(max_examples=examples(60), deadline=None)
@given(st.integers(1, 3), st.integers(1, 6), st.integers(2, 5), st.integers(0, 2**31 - 1),
       st.integers(1, 8))
def test_warmup_harvest_shift_match_model(B, W, N, seed, steps):
    L = N - 1
    gen = torch.Generator().manual_seed(seed)
    win = JacobiWindows(B + 1, W, N)
    widths = torch.randint(1, W + 1, (B,), generator=gen).tolist()
    slots = torch.arange(1, B + 1)  # leave slot 0 unstarted
    prompts = [torch.randint(50, (7,), generator=gen) for _ in range(B)]
    win.init(slots, prompts, seed=seed % 1000, width=widths)
    models = [WindowModel(win.levels[s].tolist(), widths[i], L) for i, s in enumerate(slots.tolist())]
    for step in range(steps):
        t = torch.randint(50, (B,), generator=gen)
        top = torch.randint(50, (B, W), generator=gen)
        grams = win.update(slots, t, top)
        assert grams.shape == (B, W, N)
        lv, filled, width = win.window_inputs(slots)
        for i, m in enumerate(models):
            expect = m.update(int(t[i]), top[i].tolist())
            got = [g for g in grams[i].tolist() if g[0] >= 0]
            assert got == expect
            assert int(filled[i]) == len(m.levels) == min(L, step + 2)
            for l, row in enumerate(m.levels):
                w = widths[i]
                assert lv[i, l, :w].tolist()[1 if l == 0 else 0:] == row[1 if l == 0 else 0:]
                assert (lv[i, l, w:] == -1).all()
        # warm-up takes N-2 updates, the first harvest is in update N-1
        assert bool((grams >= 0).any()) == (step >= N - 2)
    assert win.filled[0] == 0


def test_unstarted_slot_is_left_alone():
    win = JacobiWindows(2, 3, 3)
    grams = win.update(torch.tensor([0]), torch.tensor([1]), torch.tensor([[1, 2, 3]]))
    assert (grams == -1).all() and win.filled[0] == 0 and (win.levels[0] == -1).all()


def test_mixed_warmup_and_full_windows_in_one_batch():
    """A batch mixing full windows (the shift path) with warming-up and unstarted slots."""
    W, N = 4, 4
    L = N - 1
    gen = torch.Generator().manual_seed(5)
    win = JacobiWindows(4, W, N)
    prompt = torch.arange(10, 30)
    models = {}
    for step in range(8):
        if step in (0, 2, 3):  # start a slot now and then
            slot = {0: 0, 2: 2, 3: 3}[step]
            win.init([slot], [prompt], seed=step, width=W - (slot % 2))
            models[slot] = WindowModel(win.levels[slot].tolist(), W - (slot % 2), L)
        slots = torch.tensor([3, 0, 1, 2])  # slot 1 never started
        t = torch.randint(50, (4,), generator=gen)
        top = torch.randint(50, (4, W), generator=gen)
        grams = win.update(slots, t, top)
        for i, s in enumerate(slots.tolist()):
            got = [g for g in grams[i].tolist() if g[0] >= 0]
            if s not in models:
                assert got == [] and win.filled[s] == 0
                continue
            assert got == models[s].update(int(t[i]), top[i].tolist())
            assert int(win.filled[s]) == len(models[s].levels)
