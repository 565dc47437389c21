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


def test_the_small_path_agrees_with_the_batched_one():
    """Updates and chains of at most SMALL rows run as plain Python: same table, same chains."""
    from lade_vllm.proposer import recycle
    rng = np.random.default_rng(0)
    for _ in range(200):
        rows = int(rng.integers(1, 2 * recycle.SMALL))
        tokens = rng.integers(-2, 14, rows)
        targets = rng.integers(-2, 14, rows)
        small, big = Successors(12), Successors(12)
        big.table[:] = small.table[:] = rng.integers(-1, 12, 13)
        big.table[12] = small.table[12] = -1
        small.update(tokens, targets)
        for k in range(0, rows, 1 + recycle.SMALL):   # chunks > SMALL: the numpy path
            chunk = slice(k, k + 1 + recycle.SMALL)
            if tokens[chunk].size > recycle.SMALL:
                big.update(tokens[chunk], targets[chunk])
            else:
                for t, g in zip(tokens[chunk], targets[chunk]):
                    big.update(np.concatenate([[t], [-1] * recycle.SMALL]),
                               np.concatenate([[g], [-1] * recycle.SMALL]))
        assert small.table.tolist() == big.table.tolist()
        lasts = rng.integers(-2, 14, int(rng.integers(1, recycle.SMALL + 1)))
        padded = np.concatenate([lasts, np.full(recycle.SMALL + 1 - lasts.size, 3)])
        assert small.chains(lasts, 5).tolist() == small.chains(padded, 5)[:lasts.size].tolist()


def test_committed_pairs_of_each_slot_since_it_was_last_seen():
    """``Recycler.committed`` reads each slot's new tokens from its batch row: every new token
    is the successor of the one before it, later pairs win, ids outside the vocabulary are
    ignored, and a slot's next call starts where the last one ended."""
    from lade_vllm.proposer.recycle import Recycler
    rec = Recycler(10, max_seqs=3)
    rec.start(2, 3)   # 3 tokens so far: the last one (the prefill's prediction) is recycled next
    rec.start(0, 2)
    token_ids = np.array([[1, 2, 3, 4, 1, 5, 0], [7, 8, 12, 9, 0, 0, 0]], dtype=np.int32)
    rec.committed(token_ids, np.array([0, 1]), np.array([2, 0]), np.array([6, 4]))
    # slot 2 (row 0): pairs (2,3) (3,4) (4,1) (1,5); slot 0 (row 1): (7,8), then (8,12) and
    # (12,9) ignored
    assert rec.table[:10].tolist() == [-1, 5, 3, 4, 1, -1, -1, 8, -1, -1]
    token_ids[0, 6] = 6
    rec.committed(token_ids, np.array([0]), np.array([2]), np.array([7]))
    assert int(rec.table[5]) == 6 and rec.upto[2] == 7
