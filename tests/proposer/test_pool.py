"""NgramPool vs a plain dict-of-lists model (including the documented key eviction), on both CPU
paths (numba kernels and torch code), and the two paths against each other."""
from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings, strategies as st

from lade_vllm.proposer import NgramPool, ngrams_from_tokens

from .helpers import examples


@pytest.fixture(autouse=True, scope="module", params=["1", "0"], ids=["jit", "torch"])
def jit_path(request):
    """Every test of this module runs with the numba kernels (LADE_JIT=1) and the torch code."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LADE_JIT", request.param)
        yield request.param


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
    monkeypatch.setenv("LADE_JIT", "0")  # spies on the torch fast paths
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
    monkeypatch.setenv("LADE_JIT", "0")  # spies on the torch fast paths
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


# ----------------------------------------------------------------------------- numba kernels
# On CPU insert/lookup run pool_jit's kernels unless LADE_JIT=0. Placement inside a bucket may
# differ from the torch code; lookups, clocks and key stamps (as a multiset per bucket) may not.

def _random_call(rng, pool, vocab):
    """A random insert call: duplicates inside the call, negative tokens and slots, few keys."""
    N = pool.ngram_size
    m = rng.choice([0, 1, 3, 8, 20, 40])
    slots = [rng.choice([-1] + list(range(pool.max_seqs)) * 4) for _ in range(m)]
    grams = [[rng.randrange(-1 if rng.random() < 0.05 else 0, vocab) for _ in range(N)]
             for _ in range(m)]
    for i in range(1, m):  # repeat earlier rows (in-call duplicates and refreshes)
        if rng.random() < 0.2:
            j = rng.randrange(i)
            slots[i], grams[i] = slots[j], list(grams[j])
    return torch.tensor(slots, dtype=torch.long), torch.tensor(grams, dtype=torch.long).reshape(-1, N)


def _assert_same_lookups(a: NgramPool, b: NgramPool, vocab: int):
    slots = torch.arange(a.max_seqs).repeat_interleave(vocab + 1)
    keys = torch.arange(-1, vocab).repeat(a.max_seqs)
    ca, va = a.lookup(slots, keys)
    cb, vb = b.lookup(slots, keys)
    assert ca.dtype == cb.dtype == torch.int64 and va.dtype == vb.dtype == torch.bool
    assert ca.shape == cb.shape and va.shape == vb.shape
    assert torch.equal(va, vb) and torch.equal(ca, cb)
    assert a._clock == b._clock
    # the same key stamps per bucket (entries may sit in other ways; the dump row is scratch)
    assert torch.equal(a.key_stamp[:-1].sort(1).values, b.key_stamp[:-1].sort(1).values)


def _call_with(pool: NgramPool, jit: bool, name: str, *args):
    """``pool.<name>(*args)`` through the kernels (jit) or the torch code."""
    pool.use_jit = jit
    return getattr(pool, name)(*args)


def _set_path(jit: bool, *pools):
    for pool in pools:
        pool.use_jit = jit


def test_lade_jit_selects_the_path(monkeypatch):
    monkeypatch.setenv("LADE_JIT", "0")
    assert not NgramPool(1, 3, 2).use_jit
    monkeypatch.setenv("LADE_JIT", "1")
    assert NgramPool(1, 3, 2).use_jit
    assert not NgramPool(1, 3, 2, device="meta").use_jit


@pytest.mark.parametrize("seed", range(6))
def test_jit_kernels_equal_the_torch_path(jit_path, seed):
    """Random insert / reset sequences (small vocabulary: keys repeat, buckets and lists overflow
    inside one call): the kernels' pool answers every lookup like the torch path's."""
    if jit_path == "0":
        pytest.skip("compares both paths itself")
    rng = random.Random(seed)
    N, G = rng.choice([(2, 1), (3, 2), (4, 3), (5, 15)])
    max_keys, ways = rng.choice([(1, 1), (4, 2), (8, 4), (64, 16)])
    vocab = rng.choice([4, 9, 30])
    jit, ref = (NgramPool(3, N, G, max_keys=max_keys, key_ways=ways) for _ in range(2))
    for _ in range(80):
        if rng.random() < 0.08:
            slots = torch.tensor([rng.randrange(3)])
            _call_with(jit, True, "reset", slots)
            _call_with(ref, False, "reset", slots)
        else:
            slots, grams = _random_call(rng, jit, vocab)
            _call_with(jit, True, "insert", slots, grams)
            _call_with(ref, False, "insert", slots, grams)
        _set_path(True, jit, ref)    # both pools looked up by the kernel
        _assert_same_lookups(jit, ref, vocab)
        _set_path(False, jit, ref)   # and by the torch code
        _assert_same_lookups(jit, ref, vocab)


@pytest.mark.parametrize("seed", range(4))
def test_alternating_paths_on_one_pool(jit_path, seed):
    """A pool driven by the kernels and the torch code in turn (each continuing on what the other
    wrote, fingerprints included) matches the model and a torch-only pool, lookups from both paths."""
    if jit_path == "0":
        pytest.skip("alternates both paths itself")
    rng = random.Random(100 + seed)
    N, G, vocab = 3, 2, 6
    mixed = NgramPool(3, N, G, max_keys=4, key_ways=2)
    ref = NgramPool(3, N, G, max_keys=4, key_ways=2)
    model = PoolModel(mixed)
    for step in range(120):
        jit = rng.random() < 0.5
        slots, grams = _random_call(rng, mixed, vocab)
        _call_with(mixed, jit, "insert", slots, grams)
        _call_with(ref, False, "insert", slots, grams)
        model.insert(list(zip(slots.tolist(), grams.tolist())))
        if step % 29 == 28:
            _call_with(mixed, jit, "reset", torch.tensor([step % 3]))
            _call_with(ref, False, "reset", torch.tensor([step % 3]))
            model.reset(step % 3)
        for look_jit in (True, False):
            _set_path(look_jit, mixed, ref)
            _assert_same_lookups(mixed, ref, vocab)
            cands, valid = mixed.lookup(torch.full((vocab,), step % 3), torch.arange(vocab))
            for key in range(vocab):
                got = [tuple(c) for c, v in zip(cands[key].tolist(), valid[key].tolist()) if v]
                assert got == model.lookup(step % 3, key)
        stored = mixed.cont_stamp[:-1] >= 0
        fp = mixed._fingerprint(mixed.conts.view(-1, N - 1).long()).view(mixed.cont_fp.shape)[:-1]
        assert torch.equal(mixed.cont_fp[:-1][stored], fp[stored])
        assert (mixed.cont_fp[:-1][~stored] == -1).all()


def test_jit_insert_with_colliding_fingerprints(monkeypatch, jit_path):
    """The kernel confirms every fingerprint match on the tokens: with a fingerprint that collides
    all the time (run as plain Python) it still matches the model."""
    if jit_path == "0":
        pytest.skip("kernel only")
    from lade_vllm.proposer import pool_jit as pj

    def weak(row, start, mult):
        return row[start] % 2
    # the kernel's Python function, calling the module's helpers by name: ``weak`` among them
    monkeypatch.setattr(pj, "_fingerprint", weak)
    monkeypatch.setattr(pj, "insert_kernel", getattr(pj._insert, "py_func", pj._insert))
    rng = random.Random(7)
    pool = NgramPool(2, 3, 3, max_keys=4, key_ways=2)
    ops = []
    for _ in range(40):
        slots, grams = _random_call(rng, pool, 5)
        ops.append(("insert", list(zip(slots.tolist(), grams.tolist()))))
    _run_against_model(pool, ops)


def test_warm_compiles_both_kernels(jit_path):
    from lade_vllm.proposer import pool_jit
    NgramPool(2, 5, 15).warm()   # a no-op with LADE_JIT=0
    if jit_path == "1":
        assert pool_jit.insert_kernel.fn is not None and pool_jit.lookup_kernel.fn is not None


def test_copied_pool_writes_its_own_tables():
    """A deep copy's kernels write the copy's tensors (the numpy views are not copied along)."""
    import copy
    pool = NgramPool(1, 3, 2)
    pool.insert(torch.zeros(1, dtype=torch.long), torch.tensor([[1, 2, 3]]))
    pool.lookup(torch.zeros(1, dtype=torch.long), torch.tensor([1]))   # views made
    other = copy.deepcopy(pool)
    other.insert(torch.zeros(1, dtype=torch.long), torch.tensor([[1, 4, 5]]))
    assert pool.lookup(torch.tensor([0]), torch.tensor([1]))[0][0].tolist() == [[2, 3], [-1, -1]]
    assert other.lookup(torch.tensor([0]), torch.tensor([1]))[0][0].tolist() == [[2, 3], [4, 5]]
