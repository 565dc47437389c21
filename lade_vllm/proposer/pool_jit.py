"""Numba CPU kernels for ``NgramPool.insert`` / ``NgramPool.lookup`` (see pool.py for the semantics).

They work in place on numpy views of the pool's CPU tensors and are compiled on first use through
``lade_vllm.proposer.jit`` (numba is not imported when this module loads).

``insert`` in one call, with every kept row stamped ``clock, clock + 1, ...`` in row order:

1. keys, forward: every key already stored gets the stamp of its rows (the last one stays);
2. keys, backward (newest row first): a key not stored takes the entry of its bucket with the
   smallest stamp (empty = -1 first, then keys not inserted into by this call, then the least recent
   key of this call), if that stamp is older than the row's; else the row is dropped. Going newest
   first, a new key is met first at its latest insert, and a bucket keeps its ``key_ways`` keys with
   the most recent inserts (a running "top key_ways" by stamp) -- the per-call eviction of pool.py.
   A key taken over loses its continuations;
3. continuations, the same two passes per key entry (stored ones refreshed forward, new ones placed
   newest first over the smallest stamp): each list keeps its G most recently inserted distinct
   continuations, which is what one-by-one insertion with refresh gives.

Continuations are found through their fingerprint (``cont_fp``, the same 31-bit value as
``pool._fingerprint``) and confirmed on the tokens; every written entry gets its fingerprint, so the
torch path can continue on a pool this kernel filled. Rows with a negative token or slot are skipped
and take no stamp.

``lookup``: per query, the key's entry in its bucket, then its stored continuations sorted by stamp
(oldest first, an insertion sort over G entries), -1 / False after them.
"""
from __future__ import annotations

import numpy as np

from .jit import Kernel


def _bucket(key, num_buckets):
    """Bucket of a key token (the multiplicative hash of ``NgramPool.bucket_of``)."""
    h = (key * 0x9E3779B1) & 0xFFFFFFFF
    return (h >> 12) % num_buckets


def _fingerprint(row, start, mult):
    """31-bit fingerprint of ``row[start:start+len(mult)]`` (pool._fingerprint: wrapping int64
    dot product with the multipliers, bits 33..63)."""
    h = np.int64(0)
    for j in range(mult.shape[0]):
        h += np.int64(row[start + j]) * mult[j]
    return (h >> 33) & 0x7FFFFFFF


def _find_key(key_row, key):
    """Way of ``key`` in a bucket's key row, -1 if absent."""
    for w in range(key_row.shape[0]):
        if key_row[w] == key:
            return w
    return -1


def _argmin(stamps):
    """Index of the smallest stamp (the first one on ties)."""
    best = 0
    for j in range(1, stamps.shape[0]):
        if stamps[j] < stamps[best]:
            best = j
    return best


def _find_cont(fps, conts, gram, fp):
    """Index of continuation ``gram[1:]`` (fingerprint ``fp``) in one key entry's list, -1 if
    absent. Empty entries have fingerprint -1 and never match."""
    for j in range(fps.shape[0]):
        if fps[j] == fp:
            same = True
            for d in range(conts.shape[1]):
                if conts[j, d] != gram[1 + d]:
                    same = False
                    break
            if same:
                return j
    return -1


def _row_stamps(slots, grams, clock):
    """Stamp of each row (-1: skipped, a negative slot or token) and the number of kept rows."""
    M = grams.shape[0]
    stamp = np.empty(M, dtype=np.int64)
    kept = 0
    for r in range(M):
        ok = slots[r] >= 0
        for d in range(grams.shape[1]):
            if grams[r, d] < 0:
                ok = False
        if ok:
            stamp[r] = clock + kept
            kept += 1
        else:
            stamp[r] = -1
    return stamp, kept


def _insert(slots, grams, clock, num_buckets, keys, key_stamp, conts, cont_stamp, cont_fp,
           mult):
    """Insert rows ``grams`` [M, N] into the pools of ``slots`` [M]; returns the number of
    rows stamped (the pool's clock advances by it)."""
    M = grams.shape[0]
    A = keys.shape[1]
    stamp, kept = _row_stamps(slots, grams, clock)
    if kept == 0:
        return 0
    group = np.empty(M, dtype=np.int64)
    for r in range(M):
        group[r] = slots[r] * num_buckets + _bucket(grams[r, 0], num_buckets) \
            if stamp[r] >= 0 else -1
    # 1. keys already stored: refresh (forward, so each ends with its latest stamp)
    for r in range(M):
        if stamp[r] >= 0:
            w = _find_key(keys[group[r]], grams[r, 0])
            if w >= 0:
                key_stamp[group[r], w] = stamp[r]
    # 2. new keys, newest row first: take the bucket's oldest entry if older than this row
    for r in range(M - 1, -1, -1):
        if stamp[r] < 0:
            continue
        g = group[r]
        if _find_key(keys[g], grams[r, 0]) >= 0:
            continue
        w = _argmin(key_stamp[g])
        if key_stamp[g, w] < stamp[r]:
            keys[g, w] = grams[r, 0]
            key_stamp[g, w] = stamp[r]
            e = g * A + w
            cont_stamp[e, :] = -1
            cont_fp[e, :] = -1
    # key entry (-1: the key did not stay) and fingerprint of each row
    entry = np.empty(M, dtype=np.int64)
    fp = np.empty(M, dtype=np.int64)
    for r in range(M):
        entry[r] = -1
        if stamp[r] >= 0:
            w = _find_key(keys[group[r]], grams[r, 0])
            if w >= 0:
                entry[r] = group[r] * A + w
                fp[r] = _fingerprint(grams[r], 1, mult)
    # 3a. continuations already stored: refresh (forward)
    for r in range(M):
        e = entry[r]
        if e >= 0:
            j = _find_cont(cont_fp[e], conts[e], grams[r], fp[r])
            if j >= 0:
                cont_stamp[e, j] = stamp[r]
    # 3b. new continuations, newest row first: over the list's oldest entry if older
    for r in range(M - 1, -1, -1):
        e = entry[r]
        if e < 0 or _find_cont(cont_fp[e], conts[e], grams[r], fp[r]) >= 0:
            continue
        j = _argmin(cont_stamp[e])
        if cont_stamp[e, j] < stamp[r]:
            for d in range(conts.shape[2]):
                conts[e, j, d] = grams[r, 1 + d]
            cont_fp[e, j] = fp[r]
            cont_stamp[e, j] = stamp[r]
    return kept


def _lookup(slots, qkeys, num_buckets, keys, conts, cont_stamp, cands, valid):
    """Fill ``cands`` [B, G, D] / ``valid`` [B, G] with the stored continuations of each
    query key, oldest first (-1 / False after them; a negative key or slot finds nothing)."""
    A = keys.shape[1]
    G = cont_stamp.shape[1]
    order = np.empty(G, dtype=np.int64)
    for b in range(qkeys.shape[0]):
        cands[b] = -1
        valid[b] = False
        key = qkeys[b]
        if key < 0 or slots[b] < 0:
            continue
        g = slots[b] * num_buckets + _bucket(key, num_buckets)
        w = _find_key(keys[g], key)
        if w < 0:
            continue
        e = g * A + w
        # stored entries, insertion-sorted by stamp
        n = 0
        for j in range(G):
            s = cont_stamp[e, j]
            if s >= 0:
                i = n
                while i > 0 and cont_stamp[e, order[i - 1]] > s:
                    order[i] = order[i - 1]
                    i -= 1
                order[i] = j
                n += 1
        for i in range(n):
            valid[b, i] = True
            for d in range(conts.shape[2]):
                cands[b, i, d] = conts[e, order[i], d]


#: ``insert(slots, grams, clock, num_buckets, keys, key_stamp, conts, cont_stamp, cont_fp, mult)``
insert_kernel = Kernel(globals(), "_bucket", "_fingerprint", "_find_key", "_argmin", "_find_cont",
                       "_row_stamps", "_insert")
#: ``lookup(slots, qkeys, num_buckets, keys, conts, cont_stamp, cands, valid)``
lookup_kernel = Kernel(globals(), "_bucket", "_find_key", "_lookup")
