"""Lookahead decoding algorithm core: pure torch, batched over sequences, any device, no vLLM.

One decoding step, top to bottom (``LookaheadState`` wires it up):
pool lookup (``NgramPool.lookup``) -> step tree (``build_step_trees``) -> model forward with the tree
mask (outside this package) -> ``verify_tree`` -> harvest + shift (``JacobiWindows.update``) ->
``NgramPool.insert`` (window n-grams, and output n-grams with pool_from_prompt).
"""
from .pool import NgramPool, ngrams_from_tokens
from .state import LookaheadState
from .tree import StepTree, build_step_trees
from .verify import VerifyResult, verify_tree
from .window import JacobiWindows

__all__ = [
    "JacobiWindows",
    "LookaheadState",
    "NgramPool",
    "StepTree",
    "VerifyResult",
    "build_step_trees",
    "ngrams_from_tokens",
    "verify_tree",
]
