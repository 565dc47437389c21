"""The compiled CPU kernel of ``verify_tree`` (lade_vllm.proposer.verify_jit) gives every
``VerifyResult`` field of the torch path over random trees and targets."""
from __future__ import annotations

import pytest
import torch

from lade_vllm.proposer import build_step_trees, verify_tree

from .helpers import examples
from .test_tree_jit import random_batch

FIELDS = ("emitted", "num_emitted", "accepted_nodes", "num_accepted", "last_node")


def random_target(tree, gen, vocab: int) -> torch.Tensor:
    """Per node: mostly the token of one of its children (so paths get accepted), else random."""
    target = torch.randint(vocab, (tree.total_nodes,), generator=gen)
    child = tree.parent >= 0
    follow = child & (torch.rand(tree.total_nodes, generator=gen) < 0.8)
    target[tree.parent[follow]] = tree.tokens[follow]
    return target


@pytest.mark.parametrize("seed", range(3))
def test_kernel_matches_torch_on_random_trees(monkeypatch, seed):
    gen = torch.Generator().manual_seed(seed)
    deepest = 0
    for case in range(examples(300)):
        args, kwargs = random_batch(gen)
        tree = build_step_trees(*args, **kwargs)
        target = random_target(tree, gen, 4)
        got = {}
        for jit in ("0", "1"):
            monkeypatch.setenv("LADE_JIT", jit)
            got[jit] = verify_tree(tree, target)
        for name in FIELDS:
            a, b = getattr(got["0"], name), getattr(got["1"], name)
            assert a.dtype == b.dtype and a.shape == b.shape, (name, seed, case)
            assert torch.equal(a, b), (name, seed, case, a, b)
        deepest = max(deepest, int(got["1"].num_accepted.max()))
    assert deepest >= 3   # the targets follow the trees: long paths were verified
