"""Recycled successors (lade_vllm.proposer.recycle): the latest target per input token, and the
chains walked from it."""
import numpy as np

from lade_vllm.proposer.recycle import Successors


def test_latest_target_wins_and_bad_ids_are_ignored():
    s = Successors(10)
    s.update(np.array([1, 2, 1, 3, 12, -1]), np.array([5, 6, 7, 99, 4, 4]))
    # token 1: rows 0 and 2, the later one wins; 3 -> 99 and 12 -> 4 lie outside the vocabulary
    assert s.table[:10].tolist() == [-1, 7, 6, -1, -1, -1, -1, -1, -1, -1]
    s.update(np.array([1]), np.array([2]))
    assert int(s.table[1]) == 2


def test_chains_follow_successors_until_one_is_missing():
    s = Successors(10)
    s.update(np.array([1, 2, 3]), np.array([2, 3, 1]))   # a cycle 1 -> 2 -> 3 -> 1
    s.update(np.array([4]), np.array([5]))               # 4 -> 5, 5 has none
    out = s.chains(np.array([1, 4, 7]), 4)
    assert out.tolist() == [[2, 3, 1, 2], [5, -1, -1, -1], [-1, -1, -1, -1]]
    assert s.chains(np.array([1]), 0).shape == (1, 0)
