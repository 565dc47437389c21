"""Per-sequence n-gram pools, held as tensors for ``max_seqs`` sequence slots.

A pool maps a key token to up to G continuations of N-1 tokens (the rest of an n-gram whose first
token is the key). Continuations of a key are kept in insertion order; inserting a continuation that
is already there refreshes it to newest; when a key already holds G continuations, the oldest one is
evicted. This is the pool of the reference implementation.

Unlike the reference, the number of keys per sequence is bounded (the vocabulary is ~49k and a batch
can hold hundreds of sequences, so a [slots, vocab, ...] table is out of the question):

* each slot has ``max_keys`` key entries, split into ``max_keys // key_ways`` hash buckets of
  ``key_ways`` entries (``bucket_of(key)`` picks the bucket);
* when a new key arrives in a full bucket, the key of that bucket that was least recently inserted
  into (any insert of an n-gram with that key counts; lookups do not) is evicted with all its
  continuations.

Exact semantics of one ``insert`` call (this is what ``tests/proposer/test_pool.py`` checks against a
dict-of-lists model): rows are processed in row order for the continuation lists, i.e. the result
for every key that stays is exactly what one-by-one insertion would give. Key eviction is resolved
once per call: after the call, each bucket keeps the ``key_ways`` keys with the most recent inserts
(so a key is never evicted and re-created inside one call; one-by-one insertion could differ only
when a bucket would overflow in the middle of a call).

Memory: ``NgramPool.bytes_for(N, G, max_keys)`` bytes per slot (tokens are stored as int32, recency
stamps as int64, continuation fingerprints as int32): 442,368 bytes (432 KiB) for N=5, G=15,
max_keys=1024, so 108 MiB for 256 slots.

Speed: ``insert`` resolves the common cases through fast paths and keeps the general (exact) merge
for the rest: a key already stored is found by one compare per row; new keys and new continuations
take the empty or least recently inserted entries of their list when the list does not overflow
inside the call; continuations are compared through a 31-bit fingerprint per stored entry
(``cont_fp``), and every fingerprint match is confirmed on the tokens: a collision (two different
continuations with equal fingerprints, stored or in the call) sends the call to the exact path, so
fingerprints never change the result.

On CPU both ``insert`` and ``lookup`` run as numba kernels (``pool_jit.py``, same results; the
torch code is the CUDA path and the reference); ``LADE_JIT=0`` when a pool is made selects the torch
code on CPU too (``NgramPool.use_jit``; the two can be mixed on one pool).
"""
from __future__ import annotations

import numpy as np
import torch

from . import jit, pool_jit
from .pool_ops import (_FP_BITS, _INT64_MAX, _fingerprint, _hash_mults, _merge_recent,
                       _rank_in_runs, _take_slots, _unique_rows)

_EMPTY = -1
_KEY_SHIFT = 32  # (group << 32) | token packs a bucket id and a token (< 2**31) into one int64


def ngrams_from_tokens(tokens: torch.Tensor, n: int) -> torch.Tensor:
    """All sliding n-grams of ``tokens`` [L]: returns [max(L-n+1, 0), n] (int64)."""
    tokens = tokens.reshape(-1).long()
    if tokens.numel() < n:
        return tokens.new_empty((0, n))
    return tokens.unfold(0, n, 1).contiguous()


class NgramPool:
    """Bounded n-gram pools for ``max_seqs`` slots; see the module docstring for the semantics.

    Storage (flat, one extra trailing "dump" row that absorbs masked-out writes):
    ``keys`` / ``key_stamp`` [S*buckets + 1, key_ways], ``conts`` [S*max_keys + 1, G, N-1] and
    ``cont_stamp`` / ``cont_fp`` [S*max_keys + 1, G]. Key entry (s, bucket, way) is row
    ``(s*buckets + bucket)``, column ``way`` of the key tables and row
    ``(s*buckets + bucket)*key_ways + way`` of the continuation tables. Stamps are insert times
    (-1 = empty); ``cont_fp`` holds the fingerprint of each stored continuation (-1 = empty).
    """

    def __init__(self, max_seqs: int, ngram_size: int, guess_set_size: int, max_keys: int = 1024,
                 key_ways: int = 16, device: str | torch.device = "cpu"):
        if ngram_size < 2:
            raise ValueError(f"ngram_size must be >= 2, got {ngram_size}")
        if guess_set_size < 1:
            raise ValueError(f"guess_set_size must be >= 1, got {guess_set_size}")
        key_ways = min(key_ways, max_keys)
        if max_keys < 1 or max_keys % key_ways:
            raise ValueError(f"max_keys ({max_keys}) must be a positive multiple of key_ways ({key_ways})")
        if max_seqs * max_keys >= 1 << 23:
            raise ValueError(f"max_seqs * max_keys must be < 2**23, got {max_seqs} * {max_keys}")
        self.max_seqs = max_seqs
        self.ngram_size = ngram_size
        self.guess_set_size = guess_set_size
        self.max_keys = max_keys
        self.key_ways = key_ways
        self.num_buckets = max_keys // key_ways
        self.device = torch.device(device)
        S, A, G, D = max_seqs, key_ways, guess_set_size, ngram_size - 1
        dev = self.device
        nk = S * self.num_buckets
        self.keys = torch.full((nk + 1, A), _EMPTY, dtype=torch.int32, device=dev)
        self.key_stamp = torch.full((nk + 1, A), _EMPTY, dtype=torch.int64, device=dev)
        self.conts = torch.full((nk * A + 1, G, D), _EMPTY, dtype=torch.int32, device=dev)
        self.cont_stamp = torch.full((nk * A + 1, G), _EMPTY, dtype=torch.int64, device=dev)
        # fingerprint of each stored continuation (-1 where empty), see ``_fingerprint``
        self.cont_fp = torch.full((nk * A + 1, G), _EMPTY, dtype=torch.int32, device=dev)
        self._fp_mult = torch.tensor(_hash_mults(D), dtype=torch.int64, device=dev)
        self._key_dump = nk
        self._cont_dump = nk * A
        self._clock = 0
        self._np = None  # numpy views of the tables for the CPU kernels, made on first use
        # insert / lookup run the numba kernels: on CPU, unless LADE_JIT=0 when the pool is made
        # (read once: os.environ costs ~6 us per call after a model forward)
        self.use_jit = self.device.type == "cpu" and jit.enabled()

    # ------------------------------------------------------------------ sizes
    @staticmethod
    def bytes_for(ngram_size: int, guess_set_size: int, max_keys: int = 1024) -> int:
        """Bytes of pool state per sequence slot."""
        per_key = 4 + 8 + guess_set_size * ((ngram_size - 1) * 4 + 8 + 4)
        return max_keys * per_key

    def bytes_per_seq(self) -> int:
        return self.bytes_for(self.ngram_size, self.guess_set_size, self.max_keys)

    # ------------------------------------------------------------------ helpers
    def bucket_of(self, keys: torch.Tensor) -> torch.Tensor:
        """Bucket index [..] of key tokens [..] (multiplicative hash)."""
        h = (keys.long() * 0x9E3779B1) & 0xFFFFFFFF
        return (h >> 12) % self.num_buckets

    def reset(self, slots: torch.Tensor) -> None:
        """Forget everything stored for ``slots`` [k]."""
        slots = torch.as_tensor(slots, dtype=torch.long, device=self.device).reshape(-1)
        nb, A = self.num_buckets, self.key_ways
        rows = (slots[:, None] * nb + torch.arange(nb, device=self.device)).reshape(-1)
        self.keys.index_fill_(0, rows, _EMPTY)
        self.key_stamp.index_fill_(0, rows, _EMPTY)
        crows = (rows[:, None] * A + torch.arange(A, device=self.device)).reshape(-1)
        self.cont_stamp.index_fill_(0, crows, _EMPTY)
        self.cont_fp.index_fill_(0, crows, _EMPTY)

    # ------------------------------------------------------------------ CPU kernels
    def _tables(self):
        """numpy views (shared memory) of the tables, in the kernels' argument order; made again
        when a table was replaced."""
        src = (self.keys, self.key_stamp, self.conts, self.cont_stamp, self.cont_fp, self._fp_mult)
        if self._np is None or any(a is not b for a, b in zip(self._np[0], src)):
            self._np = (src, tuple(t.numpy() for t in src))
        return self._np[1]

    def __getstate__(self):
        # copies (deepcopy, pickle) make their own views: copied arrays would not share memory
        # with the copied tensors
        state = self.__dict__.copy()
        state["_np"] = None
        return state

    def warm(self) -> None:
        """Compile the CPU kernels now (numba, once per process) on a throw-away pool."""
        if not self.use_jit:
            return
        tiny = NgramPool(1, self.ngram_size, 1, max_keys=1, key_ways=1)
        tiny.insert(torch.zeros(1, dtype=torch.long), torch.zeros(1, self.ngram_size,
                                                                   dtype=torch.long))
        tiny.lookup(torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long))

    def _lookup_jit(self, slots, keys):
        keys_t, _, conts, stamps, _, _ = self._tables()
        keys = _int64_numpy(keys, (-1,))
        G, D = self.guess_set_size, self.ngram_size - 1
        cands = np.empty((keys.shape[0], G, D), dtype=np.int64)
        valid = np.empty((keys.shape[0], G), dtype=np.bool_)
        pool_jit.lookup_kernel(_int64_numpy(slots, (-1,)), keys, self.num_buckets, keys_t, conts,
                               stamps, cands, valid)
        return torch.from_numpy(cands), torch.from_numpy(valid)

    def _insert_jit(self, slots, ngrams):
        grams = _int64_numpy(ngrams, (-1, self.ngram_size))
        if grams.shape[0]:
            self._clock += pool_jit.insert_kernel(_int64_numpy(slots, (-1,)), grams, self._clock,
                                                  self.num_buckets, *self._tables())

    # ------------------------------------------------------------------ lookup
    def lookup(self, slots: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Continuations of ``keys`` [B] in the pools of ``slots`` [B].

        Returns ``cands`` [B, G, N-1] (int64, -1 where invalid) and ``valid`` [B, G] (bool), oldest
        first with the valid ones packed at the front.
        """
        if self.use_jit:
            return self._lookup_jit(slots, keys)
        A, G, D = self.key_ways, self.guess_set_size, self.ngram_size - 1
        keys = keys.long()
        # a negative key becomes -2, which matches no entry (empty entries hold -1)
        keys = torch.where(keys >= 0, keys, -2)
        group = slots.long() * self.num_buckets + self.bucket_of(keys)
        found, way = (self.keys.index_select(0, group) == keys[:, None]).max(1)      # [B]
        kidx = group * A + way
        stamps = torch.where(found[:, None], self.cont_stamp.index_select(0, kidx), _EMPTY)
        order_key, order = torch.where(stamps >= 0, stamps, _INT64_MAX).sort(1)      # [B, G]
        valid = order_key != _INT64_MAX
        cands = self.conts.view(-1, D).index_select(0, (order + kidx[:, None] * G).view(-1))
        cands = torch.where(valid[:, :, None], cands.view(-1, G, D).long(), _EMPTY)
        return cands, valid

    # ------------------------------------------------------------------ insert
    def insert(self, slots: torch.Tensor, ngrams: torch.Tensor) -> None:
        """Insert n-grams ``ngrams`` [M, N] into the pools of ``slots`` [M], as if row by row.

        ``ngrams[:, 0]`` is the key, ``ngrams[:, 1:]`` the continuation. Rows with a negative token
        or a negative slot are ignored.
        """
        if self.use_jit:
            self._insert_jit(slots, ngrams)
            return
        slots = slots.reshape(-1).long()
        ngrams = ngrams.reshape(-1, self.ngram_size).long()
        if ngrams.shape[0] == 0:
            return
        if bool(torch.minimum(ngrams.min(), slots.min()) < 0):
            ok = (ngrams >= 0).all(1) & (slots >= 0)
            slots, ngrams = slots[ok], ngrams[ok]
            if ngrams.shape[0] == 0:
                return
        m = ngrams.shape[0]
        stamp0 = self._clock
        self._clock += m
        stamp = torch.arange(stamp0, stamp0 + m, device=self.device)
        kflat = self._insert_keys(slots, ngrams[:, 0], stamp, stamp0)
        self._insert_conts(kflat, ngrams[:, 1:], stamp, stamp0)

    def _insert_keys(self, slots, key, stamp, stamp0):
        """Key level of ``insert``: returns the key entry [M] of each row (-1: key evicted)."""
        A = self.key_ways
        group = slots * self.num_buckets + self.bucket_of(key)
        key32 = key.to(torch.int32)
        found, way = (self.keys.index_select(0, group) == key32[:, None]).max(1)
        kstamp = self.key_stamp.view(-1)
        if bool(found.all()):  # steady state: every key is already there
            kflat = group * A + way
            kstamp.scatter_reduce_(0, kflat, stamp, "amax")
            return kflat
        if not self._place_new_keys(group, key, stamp, stamp0, found, way):
            return self._insert_keys_exact(group, key, stamp)
        found, way = (self.keys.index_select(0, group) == key32[:, None]).max(1)
        kflat = group * A + way
        kstamp.scatter_reduce_(0, kflat, stamp, "amax")
        return kflat

    def _place_new_keys(self, group, key, stamp, stamp0, found, way) -> bool:
        """Fast path for new keys: write each distinct new key of a bucket into one of the entries
        of that bucket not inserted into by this call (empty first, then least recent). Returns
        False, having changed nothing but the stamps of found keys, when a bucket gets more new keys
        than it has such entries (then the exact path resolves the evictions)."""
        A = self.key_ways
        kstamp = self.key_stamp.view(-1)
        # refresh the keys that are there first: they must not be taken by a new key
        kstamp.scatter_(0, torch.where(found, group * A + way, self._key_dump * A), stamp)
        new = torch.unique(((group << _KEY_SHIFT) | key)[~found])                 # sorted by group
        ugroup = new >> _KEY_SHIFT
        rank = _rank_in_runs(ugroup)
        slot = _take_slots(self.key_stamp.index_select(0, ugroup), rank, stamp0)
        if slot is None:
            return False
        flat = ugroup * A + slot
        self.keys.view(-1).index_copy_(0, flat, (new & ((1 << _KEY_SHIFT) - 1)).to(torch.int32))
        kstamp.index_fill_(0, flat, stamp0)  # any stamp of this call; the caller sets the latest
        self.cont_stamp.index_fill_(0, flat, _EMPTY)
        self.cont_fp.index_fill_(0, flat, _EMPTY)
        return True

    def _insert_keys_exact(self, group, key, stamp):
        """Key level, general case (buckets overflowing inside one call)."""
        A = self.key_ways
        # one row per distinct (bucket, key), stamped with its latest insert
        ukey, inv = torch.unique((group << _KEY_SHIFT) | key, return_inverse=True)  # sorted by group
        ustamp = torch.full_like(ukey, _EMPTY).scatter_reduce_(0, inv, stamp, "amax")
        utok = (ukey & ((1 << _KEY_SHIFT) - 1)).to(torch.int32)
        ugroup = ukey >> _KEY_SHIFT
        way, placed = _merge_recent(self.keys[:, :, None], self.key_stamp, ugroup, utok[:, None],
                                    ustamp)
        # a new key took these entries: their old continuations are gone
        gone = torch.where(placed, ugroup * A + way, self._cont_dump)
        self.cont_stamp.index_fill_(0, gone, _EMPTY)
        self.cont_fp.index_fill_(0, gone, _EMPTY)
        row_way = way[inv]
        return torch.where(row_way >= 0, group * A + row_way, -1)

    def _insert_conts(self, kflat, cont, stamp, stamp0):
        """Continuation level of ``insert``: rows with key entry ``kflat`` [M] (-1: dropped)."""
        if bool((kflat < 0).any()):
            kept = kflat >= 0
            kflat, cont, stamp = kflat[kept], cont[kept], stamp[kept]
            if kflat.numel() == 0:
                return
        if not self._insert_conts_fast(kflat, cont, stamp, stamp0):
            rows = torch.cat([kflat[:, None], cont], 1)
            urows, inv = _unique_rows(rows)                                     # sorted by kidx
            ustamp = torch.full((urows.shape[0],), _EMPTY, dtype=torch.int64, device=self.device)
            ustamp.scatter_reduce_(0, inv, stamp, "amax")
            ucont = urows[:, 1:]
            _merge_recent(self.conts, self.cont_stamp, urows[:, 0], ucont.to(torch.int32), ustamp,
                          extra=(self.cont_fp, self._fingerprint(ucont)))

    def _insert_conts_fast(self, kflat, cont, stamp, stamp0) -> bool:
        """Continuation level through fingerprints. Returns False when the exact path must run; by
        then at most the stamps of continuations already stored have been refreshed (which the exact
        path repeats)."""
        G, D = self.guess_set_size, self.ngram_size - 1
        fp = self._fingerprint(cont)                                                # [M] int32
        vals, perm = torch.sort((kflat << _FP_BITS) | fp, stable=True)
        same = vals[1:] == vals[:-1]
        if bool(same.any()):
            # equal (entry, fingerprint): the rows must really be equal, the latest one stays
            sc = cont.index_select(0, perm)
            if bool((same & (sc[1:] != sc[:-1]).any(1)).any()):
                return False                                      # fingerprint collision
            last = torch.cat([~same, same.new_ones(1)])
            perm, vals = perm[last], vals[last]
        kidx = vals >> _FP_BITS                                                     # sorted
        fp = fp.index_select(0, perm)
        cont = cont.index_select(0, perm)
        stamp = stamp.index_select(0, perm)
        hit, entry = (self.cont_fp.index_select(0, kidx) == fp[:, None]).max(1)
        cflat = kidx * G + entry
        if bool(hit.any()):
            stored = self.conts.view(-1, D).index_select(0, cflat)
            if bool((hit & (stored != cont).any(1)).any()):
                return False                                      # fingerprint collision
            self.cont_stamp.view(-1).scatter_(0, torch.where(hit, cflat, self._cont_dump * G), stamp)
            if bool(hit.all()):  # steady state: nothing new
                return True
            new = ~hit
            rank = _rank_in_runs(kidx, new)
        else:
            new = None
            rank = _rank_in_runs(kidx)
        # the k-th new continuation of an entry takes its k-th empty / least recent slot
        slot = _take_slots(self.cont_stamp.index_select(0, kidx), rank, stamp0, hit)
        if slot is None:
            return False
        flat = kidx * G + slot
        if new is not None:
            flat = torch.where(new, flat, self._cont_dump * G)
        self.cont_stamp.view(-1).scatter_(0, flat, stamp)
        self.cont_fp.view(-1).scatter_(0, flat, fp)
        self.conts.view(-1, D).index_copy_(0, flat, cont.to(torch.int32))
        return True

    def _fingerprint(self, cont: torch.Tensor) -> torch.Tensor:
        """31-bit fingerprint [R] (int32, >= 0) of continuations [R, D] of non-negative tokens."""
        return _fingerprint(cont, self._fp_mult)


def _int64_numpy(t: torch.Tensor, shape: tuple) -> np.ndarray:
    """A CPU tensor as a C-contiguous int64 numpy array of ``shape`` (no copy when it is one)."""
    if t.dtype != torch.int64 or not t.is_contiguous():
        t = t.long().contiguous()
    return t.numpy().reshape(shape)
