"""Shadow chains (lade_vllm.chain_step.ShadowChains): a chain candidate that was not drafted is
checked against the tokens its request commits next, exactly as verification would walk it."""
from __future__ import annotations

import numpy as np

from lade_vllm.chain_step import ShadowChains


def tokens(*rows, width=16):
    out = np.zeros((len(rows), width), dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out


def test_a_chain_resolves_at_its_first_mismatch_or_when_every_draft_was_checked():
    sh = ShadowChains(max_seqs=4, max_len=4)
    ctx = [[1, 2, 3, 4, 5], [6, 6, 6]]
    cands = np.array([[7, 8, 9, -1], [1, 2, -1, -1]])
    sh.begin(np.array([2, 0]), np.array([5, 3]), cands, [2, 3], np.array([4, 4]))
    rows, slots = np.array([0, 1]), np.array([2, 0])
    # one new token each, both matching the first draft: nothing decided yet
    assert sh.resolve(rows, slots, np.array([6, 4]), tokens(ctx[0] + [7], ctx[1] + [1])) is None
    # slot 2: 8 then 4 (9 drafted): two accepted of three; slot 0: 1, 2: both of two accepted
    got = sh.resolve(rows, slots, np.array([8, 5]),
                     tokens(ctx[0] + [7, 8, 4], ctx[1] + [1, 2]))
    assert got == ([3, 2], [2, 2], [2, 3])
    assert sh.resolve(rows, slots, np.array([9, 6]), tokens(ctx[0] + [7, 8, 4, 4],
                                                            ctx[1] + [1, 2, 0])) is None


def test_a_mismatch_on_the_first_draft_accepts_nothing():
    sh = ShadowChains(max_seqs=2, max_len=8)
    sh.begin(np.array([1]), np.array([3]), np.array([[4, 5, 6]]), [0], np.array([8]))
    got = sh.resolve(np.array([0]), np.array([1]), np.array([4]), tokens([1, 2, 3, 9]))
    assert got == ([3], [0], [0])


def test_begin_keeps_a_pending_chain_skips_rows_without_one_and_cuts_to_the_cap():
    sh = ShadowChains(max_seqs=3, max_len=4)
    sh.begin(np.array([0, 1, 2]), np.array([2, 2, 2]),
             np.array([[5, 6, 7, 8], [5, 6, 7, 8], [-1, -1, -1, -1]]), [1, None, 1],
             np.array([2, 4, 4]))
    assert sh.length.tolist() == [2, 0, 0]        # cut to 2; no class; no candidate
    sh.begin(np.array([0]), np.array([3]), np.array([[9, 9, 9, 9]]), [2], np.array([4]))
    assert sh.chain[0, :2].tolist() == [5, 6] and sh.start[0] == 2   # the pending one stays
    sh.drop([0])
    assert sh.length[0] == 0
    assert sh.resolve(np.array([0]), np.array([0]), np.array([4]), tokens([1, 2, 5, 6])) is None
