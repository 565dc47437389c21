"""Batched torch helpers of NgramPool's torch path (lade_vllm.proposer.pool): continuation
fingerprints, list-slot selection, ranks inside sorted runs, row de-duplication and the exact
"keep the most recent items" merge. No vLLM import."""
from __future__ import annotations

import torch

_FP_BITS = 31


_INT64_MAX = torch.iinfo(torch.int64).max


def _fingerprint(cont: torch.Tensor, mult: torch.Tensor) -> torch.Tensor:
    """Fingerprint of each row of ``cont`` [R, D] (int64 tokens >= 0): a linear combination with odd
    64-bit multipliers (wrapping int64 arithmetic), folded to 31 bits. Equal rows give equal
    fingerprints; distinct rows may collide (callers check the tokens)."""
    if cont.device.type == "cpu":
        h = cont @ mult
    else:
        h = (cont * mult).sum(1)
    return ((h >> 33) & ((1 << _FP_BITS) - 1)).to(torch.int32)


def _take_slots(stamps: torch.Tensor, rank: torch.Tensor, stamp0: int,
                skip: torch.Tensor | None = None) -> torch.Tensor | None:
    """Slot [R] of each new item in its list: the ``rank[r]``-th entry of ``stamps[r]`` [R, C] in
    ascending stamp order (empty entries, -1, first). None when that entry was inserted into by the
    current call (stamp >= ``stamp0``) or does not exist, for a row not in ``skip``: then the list
    overflows inside the call and the exact path must decide."""
    kmax = int(rank.max())
    if kmax >= stamps.shape[1]:
        return None
    val, slot = stamps.min(1)             # rank 0 (the common case): empty first, then oldest
    if kmax > 0:                          # the few rows of rank >= 1: sort their lists
        sub = torch.nonzero(rank > 0).squeeze(1)
        sv, si = stamps.index_select(0, sub).sort(1)
        r = rank.index_select(0, sub)[:, None]
        val = val.index_put((sub,), sv.gather(1, r)[:, 0])
        slot = slot.index_put((sub,), si.gather(1, r)[:, 0])
    ok = val < stamp0
    if skip is not None:
        ok = ok | skip
    return slot if bool(ok.all()) else None


def _rank_in_runs(sorted_ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Rank [R] of each element inside its run of equal values of ``sorted_ids`` [R] (counting only
    elements with ``mask``, when given; meaningful for those)."""
    first = torch.searchsorted(sorted_ids, sorted_ids)          # start of each element's run
    if mask is None:
        return torch.arange(sorted_ids.numel(), device=sorted_ids.device) - first
    cnt = mask.cumsum(0)                                        # inclusive count of masked elements
    return cnt - 1 - (cnt - mask.long()).index_select(0, first)


_HASH_BITS = 40


def _hash_mults(n: int) -> list[int]:
    """n odd 64-bit multipliers (as signed int64 values) for the row hash."""
    out = []
    for k in range(n):
        m = ((0x9E3779B97F4A7C15 * (2 * k + 1)) ^ (0xBF58476D1CE4E5B9 >> k)) & ((1 << 64) - 1) | 1
        out.append(m - (1 << 64) if m >= 1 << 63 else m)
    return out


def _unique_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.unique(rows, dim=0, return_inverse=True)`` for rows [M, 1+D] of non-negative int64
    whose first column is < 2**23, sorted by that column (not fully lexicographically).

    Fast path: a 40-bit hash of the other columns (a linear combination with odd 64-bit multipliers,
    then one xor-shift) is packed under the first column and de-duplicated in 1-D; a hash collision
    is detected exactly and falls back to the slow ``unique(dim=0)``.
    """
    mult = torch.tensor(_hash_mults(rows.shape[1] - 1), device=rows.device)
    h = ((rows[:, 1:] + 1) * mult).sum(1)  # int64 arithmetic wraps around
    h = h ^ (h >> 29)
    packed = (rows[:, 0] << _HASH_BITS) | (h & ((1 << _HASH_BITS) - 1))
    upacked, inv = torch.unique(packed, return_inverse=True)
    first = torch.full_like(upacked, rows.shape[0]).scatter_reduce_(
        0, inv, torch.arange(rows.shape[0], device=rows.device), "amin")
    urows = rows.index_select(0, first)
    if bool((urows.index_select(0, inv) == rows).all()):
        return urows, inv
    return torch.unique(rows, dim=0, return_inverse=True)


def _rows_equal(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(a == b).all(-1)`` for int32 token rows (compared as int64 pairs when D is even)."""
    if a.shape[-1] % 2 == 0 and a.dtype == torch.int32 and a.is_contiguous() and b.is_contiguous():
        a = a.reshape(-1).view(torch.int64).reshape(*a.shape[:-1], a.shape[-1] // 2)
        b = b.reshape(-1).view(torch.int64).reshape(*b.shape[:-1], b.shape[-1] // 2)
    if a.shape[-1] == 1:
        return (a == b)[..., 0]
    return (a == b).all(-1)


def _merge_recent(items: torch.Tensor, stamps: torch.Tensor, group: torch.Tensor,
                  new_items: torch.Tensor, new_stamps: torch.Tensor,
                  extra: tuple[torch.Tensor, torch.Tensor] | None = None):
    """Batched "keep the C most recent distinct items" update, in place.

    items [Q+1, C, D] / stamps [Q+1, C] (-1 = empty): Q lists of capacity C and a dump row Q.
    ``group`` [R] (sorted ascending), ``new_items`` [R, D], ``new_stamps`` [R]: distinct
    (group, item) rows, each stamped with its latest insert time (newer than anything stored).
    Afterwards each touched list holds the C most recent items of (old items, with refreshed stamps)
    + (new rows). Entries that stay keep their index; new items go to freed or empty entries.

    ``extra``: (table [Q+1, C], values [R]) written along with the new items (fingerprints).

    Returns ``entry`` [R] (entry of each row after the update, -1 if it did not fit) and ``placed``
    [R] (bool, the row is a new item written to ``entry``).
    """
    C = stamps.shape[1]
    dump = (stamps.shape[0] - 1) * C
    old_stamps = stamps.index_select(0, group)                                      # [R, C]
    match = _rows_equal(items.index_select(0, group), new_items[:, None, :]) & (old_stamps >= 0)
    hit = match.any(1)
    entry = torch.where(hit, match.to(torch.uint8).argmax(1), -1)
    flat_stamps = stamps.view(-1)
    flat_stamps.scatter_(0, torch.where(hit, group * C + entry, dump), new_stamps)  # refresh
    if bool(hit.all()):
        return entry, torch.zeros_like(hit)
    # new rows compete with the (refreshed) stored items of their list for the C entries
    new = torch.nonzero(~hit).squeeze(1)
    ngroup = group[new]
    ugroup, ginv, counts = torch.unique_consecutive(ngroup, return_inverse=True, return_counts=True)
    rank = torch.arange(new.numel(), device=group.device) - (counts.cumsum(0) - counts)[ginv]
    pad = torch.full((ugroup.numel(), int(counts.max())), -2, dtype=stamps.dtype, device=stamps.device)
    pad[ginv, rank] = new_stamps[new]
    both = torch.cat([stamps.index_select(0, ugroup), pad], 1)                     # [U, C+width]
    keep = torch.zeros_like(both, dtype=torch.bool)
    keep.scatter_(1, both.argsort(dim=1, descending=True)[:, :C], True)
    keep &= both >= 0
    freed_first = keep[:, :C].to(torch.int8).argsort(dim=1, stable=True)          # freed entries first
    new_kept = keep[:, C:]
    target = freed_first.gather(1, (new_kept.long().cumsum(1) - 1).clamp(min=0))
    placed_new = new_kept[ginv, rank]
    # a refreshed row can still be pushed out by newer new rows of its list
    pos = torch.searchsorted(ugroup, group.contiguous()).clamp(max=ugroup.numel() - 1)
    evicted = hit & (ugroup[pos] == group) & ~keep[pos, entry.clamp(min=0)]
    entry = torch.where(evicted, -1, entry)
    entry[new] = torch.where(placed_new, target[ginv, rank], -1)
    placed = torch.zeros_like(hit)
    placed[new] = placed_new
    flat = torch.where(placed_new, ngroup * C + entry[new], dump)
    flat_stamps.scatter_(0, flat, new_stamps[new])
    items.view(-1, items.shape[-1]).index_copy_(0, flat, new_items[new])
    if extra is not None:
        extra[0].view(-1).scatter_(0, flat, extra[1][new])
    return entry, placed
