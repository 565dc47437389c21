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


def _reference_resolve(sh, rows, slots, nums, token_ids):
    """The array formulation of ``ShadowChains.resolve`` (numpy), the kernel's reference."""
    pend = sh.length[slots] > 0
    if not pend.any():
        return None
    rows, slots, nums = rows[pend], slots[pend], nums[pend]
    m, n0 = sh.length[slots], sh.start[slots]
    known = np.maximum(nums - n0, 0)
    lim = np.minimum(m, known)
    depth = np.arange(sh.max_len)
    at = np.minimum(n0[:, None] + depth, token_ids.shape[1] - 1)
    same = (token_ids[rows[:, None], at] == sh.chain[slots]) & (depth < lim[:, None])
    accepted = np.cumprod(same, axis=1).sum(1)
    done = (accepted < lim) | (known >= m)
    if not done.any():
        return None
    sh.length[slots[done]] = 0
    return m[done].tolist(), accepted[done].tolist(), sh.cls[slots[done]].tolist()


def _reference_begin(sh, slots, nums, cands, classes, caps):
    has = np.array([c is not None for c in classes]) & (sh.length[slots] == 0)
    if not has.any():
        return
    k = min(cands.shape[1], sh.max_len)
    lengths = np.minimum((cands[:, :k] >= 0).sum(1), np.minimum(caps, k))
    has &= lengths > 0
    s = slots[has]
    sh.chain[s] = -1
    sh.chain[s, :k] = cands[has, :k]
    sh.length[s] = lengths[has]
    sh.start[s] = nums[has]
    sh.cls[s] = [classes[b] for b in np.flatnonzero(has)]


def test_the_compiled_loops_equal_the_array_formulation():
    """Random shadow traffic (tiny vocabulary, so drafts match often; chains longer and shorter
    than max_len; caps; slots without a candidate): the same results and per-slot arrays."""
    import copy
    rng = np.random.default_rng(3)
    for case in range(60):
        S, L = int(rng.integers(1, 6)), int(rng.integers(1, 7))
        sh, ref = ShadowChains(S, L), None
        ref = copy.deepcopy(sh)
        width = 40
        ctx = rng.integers(0, 3, size=(S, width)).astype(np.int32)
        nums = rng.integers(1, 10, size=S)
        for step in range(12):
            B = int(rng.integers(1, S + 1))
            slots = rng.permutation(S)[:B].astype(np.int64)
            rows = np.arange(B, dtype=np.int64)
            nums[slots] = np.minimum(nums[slots] + rng.integers(0, 4, size=B), width)
            token_ids = ctx[slots]
            n = nums[slots].astype(np.int64)
            assert sh.resolve(rows, slots, n, token_ids) == \
                _reference_resolve(ref, rows, slots, n, token_ids)
            K = int(rng.integers(0, L + 3))
            cands = rng.integers(0, 3, size=(B, K))
            cut = rng.integers(0, K + 1, size=B)
            cands[np.arange(K)[None, :] >= cut[:, None]] = -1
            classes = [None if rng.random() < 0.3 else int(rng.integers(0, 4)) for _ in range(B)]
            caps = rng.integers(0, L + 2, size=B)
            sh.begin(slots, n, cands, classes, caps)
            _reference_begin(ref, slots, n, cands, classes, caps)
            for name in ("chain", "length", "start", "cls"):
                assert np.array_equal(getattr(sh, name), getattr(ref, name)), (case, step, name)
