"""Dense prefix K/V copies (pure torch): when a copy is reused, rebuilt or dropped."""
from __future__ import annotations

import pytest
import torch

from lade_vllm.attention.dense_kv import DenseKV, PrefixLedger, capacity

BS = 16


def _blocks(*ids):
    return torch.tensor([list(ids)], dtype=torch.int32)


def test_ledger_reuses_a_copy_while_the_request_keeps_its_blocks():
    led = PrefixLedger(budget_rows=10_000)
    assert led.plan(["a"], [20], [5], _blocks(3, 7), BS) == ([0], [])
    # two tokens committed, same blocks: every layer's copy is valid up to 20
    assert led.plan(["a"], [22], [5], _blocks(3, 7), BS) == ([20], [])
    # a block id under the copied rows changed (e.g. recomputed elsewhere): rebuild
    assert led.plan(["a"], [25], [4], _blocks(3, 8), BS) == ([0], [])
    # the sequence got shorter than the copy: rebuild
    assert led.plan(["a"], [10], [4], _blocks(3, 8), BS) == ([0], [])
    # a new block appended past the copy does not matter
    assert led.plan(["a"], [40], [4], _blocks(3, 8, 9), BS) == ([10], [])


def test_ledger_drops_stale_requests_and_the_least_recently_used_over_budget():
    led = PrefixLedger(budget_rows=2 * capacity(100))
    led.plan(["a"], [90], [5], _blocks(1, 2, 3, 4, 5, 6), BS)
    led.plan(["b"], [90], [5], _blocks(11, 12, 13, 14, 15, 16), BS)
    assert len(led) == 2
    # a third request: the oldest ("a") goes, every layer is told
    starts, dropped = led.plan(["c"], [90], [5], _blocks(21, 22, 23, 24, 25, 26), BS)
    assert starts == [0] and dropped == ["a"] and len(led) == 2
    # a stale request (finished / resumed) is dropped before planning
    starts, dropped = led.plan(["b"], [91], [5], _blocks(11, 12, 13, 14, 15, 16), BS,
                               stale=["b", "zzz"])
    assert starts == [0] and dropped == ["b"]
    # this step's own requests are never dropped, even over budget
    led = PrefixLedger(budget_rows=1)
    starts, dropped = led.plan(["x", "y"], [5, 5], [2, 2], torch.ones(2, 1, dtype=torch.int32),
                               BS)
    assert starts == [0, 0] and dropped == [] and len(led) == 2


def test_dense_copy_holds_committed_rows_then_the_step_rows():
    gen = torch.Generator().manual_seed(0)
    kvh, hd = 2, 4
    full_k = torch.randn(kvh, 600, hd, generator=gen)
    full_v = torch.randn(kvh, 600, hd, generator=gen)
    tree_k = torch.randn(7, kvh, hd, generator=gen)
    tree_v = torch.randn(7, kvh, hd, generator=gen)
    d = DenseKV()
    assert d.length("a") == -1
    k, v = d.extend("a", 0, full_k[:, :200], full_v[:, :200], tree_k[:5], tree_v[:5])
    assert d.length("a") == 200 and k.shape == (kvh, 205, hd)
    assert torch.equal(k[:, :200], full_k[:, :200]) and torch.equal(v[:, 200:], tree_v[:5].transpose(0, 1))
    # grows past its capacity (256 rows) keeping the committed rows; the old tree rows are
    # overwritten by committed ones
    k, v = d.extend("a", 200, full_k[:, 200:590], full_v[:, 200:590], tree_k, tree_v)
    assert d.length("a") == 590 and k.shape == (kvh, 597, hd)
    assert torch.equal(k[:, :590], full_k[:, :590]) and torch.equal(v[:, :590], full_v[:, :590])
    assert torch.equal(k[:, 590:], tree_k.transpose(0, 1))
    with pytest.raises(ValueError, match="holds 590 rows"):
        d.extend("a", 300, full_k[:, 300:301], full_v[:, 300:301], tree_k, tree_v)
    d.drop(["a", "b"])
    assert d.length("a") == -1 and len(d) == 0
