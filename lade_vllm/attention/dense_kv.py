"""Dense copies of tree requests' committed K/V, extended step by step (pure torch, no vLLM).

A tree row attends to its request's whole prefix ``[0, p)``. Reading that prefix out of vLLM's
paged CPU cache is an element gather of ``2 * kvh * p * hd`` values per layer and step; keeping a
dense copy per request costs only the tokens committed since the request's last tree step, and
the step's own tree tokens are copied from the layer's ``key`` / ``value`` inputs.

Two halves, because all layers of one KV-cache group move in lockstep:

* :class:`PrefixLedger` (one per metadata builder) decides once per step, for each tree request,
  from which position its copies are still valid (``start``), and which copies to drop;
* :class:`DenseKV` (one per attention layer) holds that layer's copies. A layer whose copy does not
  end exactly at ``start`` rebuilds it from position 0, so a disagreement costs time, never
  correctness.

A copy stays valid while the request keeps its blocks: rows below ``p`` are committed and vLLM never
rewrites them (rejected tree nodes and the KV move touch positions ``>= p`` only). A request that
is finished, resumed from preemption (recomputed, possibly into the same block ids) or whose block
ids changed starts over.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

__all__ = ["PrefixLedger", "DenseKV", "capacity"]


def capacity(tokens: int) -> int:
    """Rows allocated for a copy that must hold ``tokens`` rows (amortised growth)."""
    return max(256, 1 << (int(tokens) - 1).bit_length())


@dataclass
class _Entry:
    length: int            # committed rows copied: [0, length)
    blocks: torch.Tensor   # block ids covering [0, length)
    rows: int              # capacity(...) rows each layer holds for it


class PrefixLedger:
    """Builder-side record of which committed rows every layer has copied, per request key.

    ``budget_rows`` bounds the rows all copies of one layer may hold together; the least recently
    used requests are dropped first.
    """

    def __init__(self, budget_rows: int):
        self.budget_rows = int(budget_rows)
        self._entries: OrderedDict[str, _Entry] = OrderedDict()

    def plan(self, keys: list[str], prefix_lens: list[int], tree_lens: list[int],
             block_rows: torch.Tensor, block_size: int, stale=()) -> tuple[list[int], list[str]]:
        """For this step's tree requests: per request the position its copies are valid up to
        (0 = rebuild), and the keys every layer must drop. Records the step as done."""
        dropped = [k for k in stale if self._entries.pop(k, None) is not None]
        starts = []
        for r, (key, p, t) in enumerate(zip(keys, prefix_lens, tree_lens)):
            row = block_rows[r]
            e = self._entries.pop(key, None)
            start = 0
            if e is not None:
                nblk = -(-e.length // block_size)
                if e.length <= p and torch.equal(e.blocks[:nblk], row[:nblk].to(e.blocks.dtype)):
                    start = e.length
            starts.append(start)
            nblk = -(-p // block_size)
            self._entries[key] = _Entry(p, row[:nblk].clone(), capacity(p + t))
        used = sum(e.rows for e in self._entries.values())
        live = set(keys)
        for key in list(self._entries):
            if used <= self.budget_rows:
                break
            if key not in live:
                used -= self._entries.pop(key).rows
                dropped.append(key)
        return starts, dropped

    def __len__(self) -> int:
        return len(self._entries)


class DenseKV:
    """One layer's dense K/V copies: per key, ``k`` and ``v`` ``[kvh, rows, hd]`` and the number of
    committed rows they hold."""

    def __init__(self):
        self._copies: dict[str, list] = {}

    def drop(self, keys) -> None:
        for k in keys:
            self._copies.pop(k, None)

    def length(self, key: str) -> int:
        c = self._copies.get(key)
        return -1 if c is None else c[2]

    def extend(self, key: str, start: int, new_k: torch.Tensor, new_v: torch.Tensor,
               tree_k: torch.Tensor, tree_v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write committed rows ``[start, start + m)`` (``new_k``/``new_v`` ``[kvh, m, hd]``) and
        the step's tree rows after them (``tree_k``/``tree_v`` ``[T, kvh, hd]``); return K and V
        ``[kvh, p + T, hd]`` (views) with ``p = start + m``. Requires ``start == length(key)``
        or ``start == 0``."""
        kvh, m, hd = new_k.shape
        p, T = start + m, tree_k.shape[0]
        c = self._copies.get(key)
        if c is not None and start not in (0, c[2]):
            raise ValueError(f"dense K/V copy of {key!r} holds {c[2]} rows, asked to extend "
                             f"from {start}")
        if c is None or c[0].shape[1] < p + T or c[0].dtype != new_k.dtype:
            rows = capacity(p + T)
            k = new_k.new_empty(kvh, rows, hd)
            v = new_v.new_empty(kvh, rows, new_v.shape[-1])
            if c is not None and start > 0:
                k[:, :start] = c[0][:, :start]
                v[:, :start] = c[1][:, :start]
            c = self._copies[key] = [k, v, 0]
        k, v = c[0], c[1]
        k[:, start:p] = new_k
        v[:, start:p] = new_v
        k[:, p:p + T] = tree_k.transpose(0, 1)
        v[:, p:p + T] = tree_v.transpose(0, 1)
        c[2] = p
        return k[:, :p + T], v[:, :p + T]

    def __len__(self) -> int:
        return len(self._copies)
