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
                      for t in (pool.keys, pool.key_stamp, pool.conts, pool.cont_stamp))
    assert abs(state_bytes - 2 * pool.bytes_per_seq()) < 1024  # + the dump rows
