"""NgramPool vs a plain dict-of-lists model (including the documented key eviction)."""
from __future__ import annotations

import torch
from hypothesis import given, settings, strategies as st

from lade_vllm.proposer import NgramPool, ngrams_from_tokens

from .helpers import examples


class PoolModel:
    """Reference semantics, one row at a time; key eviction per insert call (see pool.py)."""

    def __init__(self, pool: NgramPool):
        self.pool = pool
        self.G = pool.guess_set_size
        self.lists = [dict() for _ in range(pool.max_seqs)]   # key -> [cont, ...] oldest first
        self.key_time = [dict() for _ in range(pool.max_seqs)]
        self.clock = 0

    def bucket(self, key: int) -> int:
        return int(self.pool.bucket_of(torch.tensor(key)))

    def reset(self, slot: int):
        self.lists[slot].clear()
        self.key_time[slot].clear()

    def insert(self, rows):
        touched = set()
        for slot, gram in rows:
            if slot < 0 or min(gram) < 0:
                continue
            key, cont = gram[0], tuple(gram[1:])
            lst = self.lists[slot].setdefault(key, [])
            if cont in lst:
                lst.remove(cont)
            lst.append(cont)
            if len(lst) > self.G:
                lst.pop(0)
            self.clock += 1
            self.key_time[slot][key] = self.clock
            touched.add(slot)
        for slot in touched:  # keep the key_ways most recently inserted keys of each bucket
            buckets: dict[int, list[int]] = {}
            for key in self.lists[slot]:
                buckets.setdefault(self.bucket(key), []).append(key)
            for keys in buckets.values():
                keys.sort(key=lambda k: -self.key_time[slot][k])
                for k in keys[self.pool.key_ways:]:
                    del self.lists[slot][k]
                    del self.key_time[slot][k]

    def lookup(self, slot: int, key: int):
        return list(self.lists[slot].get(key, []))


def ops_for(n: int):
    op = st.one_of(
        st.tuples(st.just("insert"), st.lists(
            st.tuples(st.integers(-1, 2), st.lists(st.integers(-1, 5), min_size=n, max_size=n)),
            min_size=0, max_size=30)),
        st.tuples(st.just("reset"), st.integers(0, 2)),
    )
    return st.lists(op, min_size=1, max_size=12)


@settings(max_examples=examples(100), deadline=None)
@given(st.sampled_from([2, 3, 4]).flatmap(lambda n: st.tuples(st.just(n), ops_for(n))),
       st.sampled_from([(1, 1), (2, 2), (4, 2), (8, 4), (64, 16)]), st.integers(1, 3))
def test_pool_matches_model(n_ops, keys_ways, G):
    N, ops = n_ops
    max_keys, ways = keys_ways
    pool = NgramPool(3, N, G, max_keys=max_keys, key_ways=ways)
    model = PoolModel(pool)
    for kind, arg in ops:
        if kind == "insert":
            model.insert(arg)
            if arg:
                pool.insert(torch.tensor([s for s, _ in arg]), torch.tensor([g for _, g in arg]))
            else:
                pool.insert(torch.zeros(0, dtype=torch.long), torch.zeros(0, N, dtype=torch.long))
        else:
            model.reset(arg)
            pool.reset(torch.tensor([arg]))
        slots = torch.tensor([s for s in range(3) for _ in range(7)])
        keys = torch.tensor([k for _ in range(3) for k in range(-1, 6)])
        cands, valid = pool.lookup(slots, keys)
        for i in range(slots.numel()):
            expect = model.lookup(int(slots[i]), int(keys[i])) if keys[i] >= 0 else []
            got = [tuple(c) for c, v in zip(cands[i].tolist(), valid[i].tolist()) if v]
            assert got == expect, (int(slots[i]), int(keys[i]))
            n = len(expect)
            assert valid[i, :n].all() and not valid[i, n:].any()
            assert (cands[i, n:] == -1).all()


def test_in_batch_duplicates_and_eviction_order():
    pool = NgramPool(2, 3, 3)
    rows = torch.tensor([[1, 2, 3], [1, 4, 5], [1, 2, 3], [1, 6, 7], [1, 8, 9], [1, 4, 5]])
    pool.insert(torch.zeros(6, dtype=torch.long), rows)
    cands, valid = pool.lookup(torch.tensor([0, 1]), torch.tensor([1, 1]))
    # one by one: [23] [23 45] [45 23] [45 23 67] [23 67 89] [67 89 45]
    assert cands[0].tolist() == [[6, 7], [8, 9], [4, 5]]
    assert not valid[1].any()


def test_many_sequences_vectorised_step():
    """W n-grams for each of B slots per call, as in decoding, against the model."""
    B, W, N, G = 6, 5, 4, 3
    pool = NgramPool(B, N, G, max_keys=8, key_ways=4)
    model = PoolModel(pool)
    gen = torch.Generator().manual_seed(0)
    for _ in range(30):
        grams = torch.randint(6, (B, W, N), generator=gen)
        slots = torch.arange(B)[:, None].expand(B, W).reshape(-1)
        pool.insert(slots, grams.reshape(-1, N))
        model.insert(list(zip(slots.tolist(), grams.reshape(-1, N).tolist())))
    keys = torch.arange(6).repeat(B)
    slots = torch.arange(B).repeat_interleave(6)
    cands, valid = pool.lookup(slots, keys)
    for i in range(keys.numel()):
        got = [tuple(c) for c, v in zip(cands[i].tolist(), valid[i].tolist()) if v]
        assert got == model.lookup(int(slots[i]), int(keys[i]))


def test_ngrams_from_tokens_and_sizes():
    assert ngrams_from_tokens(torch.arange(5), 3).tolist() == [[0, 1, 2], [1, 2, 3], [2, 3, 4]]
    assert ngrams_from_tokens(torch.arange(2), 3).shape == (0, 3)
    pool = NgramPool(2, 5, 15, max_keys=1024)
    assert pool.bytes_per_seq() == NgramPool.bytes_for(5, 15, 1024)
    state_bytes = sum(t.numel() * t.element_size()
                      for t in (pool.keys, pool.key_stamp, pool.conts, pool.cont_stamp, pool.cont_fp))
    assert abs(state_bytes - 2 * pool.bytes_per_seq()) < 1024  # + the dump rows


# ----------------------------------------------------------------------------- fast paths
# insert() resolves the common cases through fast paths (every key already stored; new keys and new
# continuations fitting into entries this call does not use; continuations compared through a
# 31-bit fingerprint) and falls back to the exact general path otherwise. The tests below check that
# both give the model's semantics, and that a fingerprint collision always ends in the exact path.

def _spy(monkeypatch, name):
    """Count calls of NgramPool.<name> and what they returned."""
    calls = []
    orig = getattr(NgramPool, name)

    def wrapper(self, *args, **kwargs):
        out = orig(self, *args, **kwargs)
        calls.append(out)
        return out
    monkeypatch.setattr(NgramPool, name, wrapper)
    return calls


def _run_against_model(pool, ops):
    model = PoolModel(pool)
    N = pool.ngram_size
    for kind, arg in ops:
        if kind == "insert":
            model.insert(arg)
            slots = torch.tensor([s for s, _ in arg], dtype=torch.long)
            grams = torch.tensor([g for _, g in arg], dtype=torch.long).reshape(-1, N)
            pool.insert(slots, grams)
        else:
            model.reset(arg)
            pool.reset(torch.tensor([arg]))
        for slot in range(pool.max_seqs):
            keys = torch.arange(-1, 8)
            cands, valid = pool.lookup(torch.full_like(keys, slot), keys)
            for i, key in enumerate(keys.tolist()):
                got = [tuple(c) for c, v in zip(cands[i].tolist(), valid[i].tolist()) if v]
                assert got == (model.lookup(slot, key) if key >= 0 else []), (slot, key)


def _weak_fingerprint(cont, mult):
    """A fingerprint that collides all the time: the parity of the first token."""
    return (cont[:, 0] % 2).to(torch.int32)


@settings(max_examples=examples(60), deadline=None)
@given(st.sampled_from([2, 3, 4]).flatmap(lambda n: st.tuples(st.just(n), ops_for(n))),
       st.sampled_from([(1, 1), (4, 2), (64, 16)]), st.integers(1, 3))
def test_pool_matches_model_with_colliding_fingerprints(n_ops, keys_ways, G):
    import lade_vllm.proposer.pool as pool_mod
    N, ops = n_ops
    orig = pool_mod._fingerprint
    pool_mod._fingerprint = _weak_fingerprint
    try:
        _run_against_model(NgramPool(3, N, G, max_keys=keys_ways[0], key_ways=keys_ways[1]), ops)
    finally:
        pool_mod._fingerprint = orig


def test_fingerprint_collision_takes_the_exact_path(monkeypatch):
    import lade_vllm.proposer.pool as pool_mod
    monkeypatch.setattr(pool_mod, "_fingerprint", _weak_fingerprint)
    fast = _spy(monkeypatch, "_insert_conts_fast")
    pool = NgramPool(1, 3, 3)
    # (1 | 2 4) and (1 | 2 6) share the fingerprint: stored entry vs a new row
    _run_against_model(pool, [("insert", [(0, [1, 2, 4])]), ("insert", [(0, [1, 2, 6])])])
    assert fast == [True, False]
    # two distinct rows of one call colliding with each other (and no stored entry)
    fast.clear()
    _run_against_model(NgramPool(1, 3, 3), [("insert", [(0, [1, 2, 4]), (0, [1, 4, 4])])])
    assert fast == [False]
    # equal rows in one call are no collision: the fast path de-duplicates them
    fast.clear()
    _run_against_model(NgramPool(1, 3, 3), [("insert", [(0, [1, 2, 4]), (0, [1, 2, 4])])])
    assert fast == [True]


def test_fast_and_exact_paths_are_exercised_and_agree(monkeypatch):
    """Random decoding-like traffic through small pools: every path is taken, all match the model."""
    fast = _spy(monkeypatch, "_insert_conts_fast")
    new_keys = _spy(monkeypatch, "_place_new_keys")
    exact_keys = _spy(monkeypatch, "_insert_keys_exact")
    gen = torch.Generator().manual_seed(3)
    pool = NgramPool(3, 3, 2, max_keys=4, key_ways=2)
    ops = []
    for step in range(60):
        n = int(torch.randint(1, 12, (1,), generator=gen))
        slots = torch.randint(-1, 3, (n,), generator=gen).tolist()
        grams = torch.randint(0, 6, (n, 3), generator=gen)
        grams[:, 0] %= 3 if step % 2 else 6   # few keys: lists overflow inside a call
        grams = grams.tolist()
        ops.append(("insert", list(zip(slots, grams))))
        if step % 17 == 16:
            ops.append(("reset", step % 3))
    _run_against_model(pool, ops)
    assert True in fast and False in fast
    assert True in new_keys and False in new_keys and exact_keys


def test_fingerprints_track_stored_continuations():
    """Invariant of the fast path: cont_fp is the fingerprint of each stored continuation, -1 where
    the entry is empty (after inserts, key evictions and resets)."""
    gen = torch.Generator().manual_seed(0)
    pool = NgramPool(2, 4, 3, max_keys=4, key_ways=2)
    for step in range(40):
        pool.insert(torch.randint(0, 2, (6,), generator=gen), torch.randint(0, 7, (6, 4), generator=gen))
        if step % 13 == 12:
            pool.reset(torch.tensor([step % 2]))
        stored = pool.cont_stamp >= 0
        stored[-1] = False  # dump row
        fp = pool._fingerprint(pool.conts.view(-1, 3).long()).view(pool.cont_fp.shape)
        assert torch.equal(pool.cont_fp[stored], fp[stored])
        assert (pool.cont_fp[:-1][~stored[:-1]] == -1).all()


def test_catching_up_several_slots_at_once_equals_one_slot_at_a_time():
    """LookaheadState.catch_up inserts every slot's output n-grams in one pool insert; the pools
    and histories are those of one insert per slot, in the same order."""
    import random

    from lade_vllm.proposer import LookaheadState

    rng = random.Random(3)
    prompts = [torch.tensor([rng.randrange(30) for _ in range(40)]) for _ in range(3)]
    tails = [torch.tensor([rng.randrange(30) for _ in range(n)]) for n in (25, 9, 17)]
    states = []
    for batched in (True, False):
        st = LookaheadState(4, 3, 4, 3, max_keys=16, pool_from_prompt=True)
        for slot, p in enumerate(prompts):
            st.start(slot, p, seed=0)
        slots, new = [0, 2, 1], [22, 6, 14]
        if batched:
            st.catch_up(slots, tails, new)
        else:
            for s, t, n in zip(slots, tails, new):
                st.catch_up([s], [t], [n])
        states.append(st)
    a, b = states
    assert (a.pool.keys >= 0).sum() > 0
    for name in ("keys", "key_stamp", "conts", "cont_stamp", "cont_fp"):
        assert torch.equal(getattr(a.pool, name), getattr(b.pool, name)), name
    assert torch.equal(a.history, b.history)
