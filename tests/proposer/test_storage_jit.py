"""The compiled CPU kernel of ``storage_order`` (lade_vllm.proposer.storage_jit) gives every
``Proposal`` field of the torch path, over random step trees and selections of them."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lade_vllm.proposal import select_trees, storage_order
from lade_vllm.proposer import build_step_trees

from .helpers import examples
from .test_tree_jit import random_batch


def both_orders(monkeypatch, tree):
    """(torch Proposal, kernel Proposal) of one tree."""
    B = tree.num_seqs
    req_ids = [f"r{b}" for b in range(B)]
    slots, lasts = torch.arange(B), tree.tokens[tree.root_index]
    props = []
    for jit in ("0", "1"):
        monkeypatch.setenv("LADE_JIT", jit)
        props.append(storage_order(req_ids, slots, lasts, tree))
    return props


def assert_same(ref, got):
    assert ref.drafts == got.drafts and ref.num_trie == got.num_trie
    assert all(type(x) is int for d in got.drafts for x in d)
    assert all(type(x) is int for x in got.num_trie)
    for name in ("order", "parent", "depth"):
        a, b = getattr(ref, name), getattr(got, name)
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert x.dtype == y.dtype and np.array_equal(x, y), name
    assert ref.req_ids == got.req_ids and ref.tree is got.tree


@pytest.mark.parametrize("seed", range(2))
def test_kernel_matches_torch_on_random_trees(monkeypatch, seed):
    gen = torch.Generator().manual_seed(100 + seed)
    for _ in range(examples(200)):
        args, kwargs = random_batch(gen)
        monkeypatch.setenv("LADE_JIT", "1")
        tree = build_step_trees(*args, **kwargs)
        assert_same(*both_orders(monkeypatch, tree))
        # a selection of the trees, renumbered (as the engine's partial steps)
        sel = torch.nonzero(torch.rand(tree.num_seqs, generator=gen) < 0.5).view(-1)
        assert_same(*both_orders(monkeypatch, select_trees(tree, sel)))


def test_warm_compiles_and_reports_seconds():
    from lade_vllm.proposer import storage_jit
    assert storage_jit.warm() >= 0.0


def test_ancestor_mask_of_every_storage_order_tree():
    """``ancestor_mask`` of a request's storage-order parents marks exactly each node's
    ancestors and itself (checked by walking the parents)."""
    from lade_vllm.proposal import ancestor_mask
    gen = torch.Generator().manual_seed(7)
    seen = 0
    for _ in range(examples(100)):
        args, kwargs = random_batch(gen)
        prop = storage_order([f"r{b}" for b in range(args[0].numel())], None, None,
                             build_step_trees(*args, **kwargs))
        for parent in prop.parent:
            want = np.zeros((len(parent), len(parent)), dtype=bool)
            for i in range(len(parent)):
                j = i
                while j >= 0:
                    want[i, j] = True
                    j = parent[j]
            assert torch.equal(ancestor_mask(parent), torch.from_numpy(want))
            seen = max(seen, int(want.sum(1).max()))
    assert seen >= 4   # deep trees were among them
