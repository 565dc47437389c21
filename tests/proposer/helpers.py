"""Shared test helpers: brute-force oracles written for clarity, not speed."""
from __future__ import annotations

import os

import torch

from lade_vllm.proposer import StepTree

# LADE_TEST_EXAMPLES_SCALE=20 runs every property test with 20x more hypothesis examples
_SCALE = float(os.environ.get("LADE_TEST_EXAMPLES_SCALE", "1"))


def examples(n: int) -> int:
    """Hypothesis ``max_examples`` for a property test (scaled by LADE_TEST_EXAMPLES_SCALE)."""
    return max(1, int(n * _SCALE))


def ancestors_brute(tree: StepTree, i: int) -> list[int]:
    """Node i and its ancestors, walking ``parent`` one step at a time."""
    out = [i]
    while tree.parent[out[-1]] >= 0:
        out.append(int(tree.parent[out[-1]]))
    return out


def node_path(tree: StepTree, i: int) -> tuple[int, ...]:
    """Tokens from the root to node i (root token first)."""
    return tuple(int(tree.tokens[j]) for j in reversed(ancestors_brute(tree, i)))


def targets_from_prefix(tree: StepTree, fn) -> torch.Tensor:
    """Per-node target = fn(tokens from the root to that node), computed by walking ancestors."""
    return torch.tensor([fn(node_path(tree, i)) for i in range(tree.total_nodes)], dtype=torch.long)
