"""Context suffix match (lade_vllm.proposer.suffix) and its place in the step tree."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import torch

from lade_vllm.proposer import LookaheadState
from lade_vllm.proposer.suffix import suffix_candidates
from lade_vllm.proposer.tree import build_step_trees
from lade_vllm.proposer.verify import verify_tree


def _naive(tokens, k, min_n=2, max_n=8):
    L = len(tokens)
    for n in range(min(max_n, L - 1), min_n - 1, -1):
        suf = tokens[L - n:]
        for s in range(L - n):
            if tokens[s:s + n] == suf:
                return tokens[s + n:s + n + k]
    return []


def test_longest_then_earliest_match():
    ctx = [5, 1, 2, 3, 9, 9, 7, 2, 3, 4, 4, 1, 2, 3]
    # suffix [1, 2, 3] occurs at 1 (then 9 9 7 ...); [2, 3] alone also at 7 (then 4 4): longest wins
    out = suffix_candidates([np.array(ctx)], 4)
    assert out.tolist() == [[9, 9, 7, 2]]
    # no repeated suffix: no candidate
    assert suffix_candidates([np.array([1, 2, 3, 4])], 4).tolist() == [[-1] * 4]
    # [1, 2] occurs at 0 (then 7 7 ...) and at 4 (then 8 8 ...): the earliest occurrence wins
    ctx = [1, 2, 7, 7, 1, 2, 8, 8, 1, 2]
    assert suffix_candidates([np.array(ctx)], 4).tolist() == [[7, 7, 1, 2]]
    # continuation shorter than k near the end is padded with -1
    assert suffix_candidates([np.array([7, 8, 7, 8])], 5).tolist() == [[7, 8, -1, -1, -1]]


def test_matches_naive_on_random_contexts():
    rng = np.random.default_rng(0)
    ctxs = [rng.integers(0, 6, size=int(rng.integers(1, 60))) for _ in range(300)]
    got = suffix_candidates(ctxs, 6)
    for c, row in zip(ctxs, got.tolist()):
        want = _naive(c.tolist(), 6)
        assert row == want + [-1] * (6 - len(want)), c


def test_variable_length_candidates_share_trie_nodes_and_verify():
    # two candidates: the 2-token one is a prefix of the 4-token one -> 4 trie nodes, not 6
    cands = torch.tensor([[[3, 4, -1, -1], [3, 4, 5, 6]]])
    tree = build_step_trees(torch.tensor([1]), torch.zeros(1, 1, 1, dtype=torch.long),
                            torch.tensor([0]), cands, torch.tensor([[True, True]]))
    assert int(tree.num_nodes[0]) == 1 + 4
    assert tree.tokens.tolist() == [1, 3, 4, 5, 6]
    # target accepts 3, 4, 5 then emits 8
    tok = {1: 3, 3: 4, 4: 5, 5: 8, 6: 0}
    target = torch.tensor([tok[int(t)] for t in tree.tokens])
    res = verify_tree(tree, target)
    assert res.emitted[0, :int(res.num_emitted[0])].tolist() == [3, 4, 5, 8]


def test_state_puts_the_suffix_match_in_the_tree_newest():
    st = LookaheadState(2, 3, 3, 2, suffix_tokens=6)
    ctx = np.array([1, 2, 3, 4, 5, 6, 7, 8, 1, 2])
    st.start(0, torch.from_numpy(ctx), seed=0)
    tree = st.propose(torch.tensor([0]), torch.tensor([2]), use_window=torch.tensor([False]),
                      num_cands=torch.tensor([1]), contexts=[ctx])
    # one candidate allowed: the suffix match [3..8] (6 tokens), a chain
    assert tree.tokens.tolist() == [2, 3, 4, 5, 6, 7, 8]
    assert tree.parent.tolist() == [-1, 0, 1, 2, 3, 4, 5]


def test_suffix_only_leaves_the_pool_out():
    """CHAIN steps (``suffix_only``): the suffix match's chain, or a root-only tree when the
    context has no match, even though the pool holds candidates for the last token."""
    st = LookaheadState(2, 3, 3, 2, suffix_tokens=6)
    ctx = np.array([1, 2, 3, 4, 5, 6, 7, 8, 1, 2])
    st.start(0, torch.from_numpy(ctx), seed=0)
    args = dict(use_window=torch.tensor([False]), num_cands=torch.tensor([1]), suffix_only=True)
    tree = st.propose(torch.tensor([0]), torch.tensor([2]), contexts=[ctx], **args)
    assert tree.tokens.tolist() == [2, 3, 4, 5, 6, 7, 8]
    no_match = np.array([5, 2, 3, 9, 7, 1, 3])   # no earlier [1, 3]; the pool has 3 -> 9 7
    st.start(1, torch.from_numpy(no_match), seed=0, pool_from_prompt=True)
    last, free = torch.tensor([3]), dict(use_window=torch.tensor([False]))
    pooled = st.propose(torch.tensor([1]), last, contexts=[no_match], **free)
    assert pooled.tokens.tolist() == [3, 9, 7]
    tree = st.propose(torch.tensor([1]), last, contexts=[no_match], **args)
    assert tree.tokens.tolist() == [3]


def test_numba_is_imported_on_first_match_only():
    """The step engine's modules load without numba: an in-process vLLM worker scans every module
    in sys.modules for Triton kernels at init, and llvmlite's wrappers break that scan."""
    code = ("import sys, numpy as np, lade_vllm.engine, lade_vllm.proposer.tree_jit\n"
            "import lade_vllm.proposer.storage_jit, lade_vllm.proposal, lade_vllm.proposer.pool_jit\n"
            "import lade_vllm.proposer.suffix as s\n"
            "assert 'numba' not in sys.modules and 'llvmlite' not in sys.modules\n"
            "print(s.suffix_candidates([np.array([1, 2, 3, 1, 2])], 2).tolist())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[[3, 1]]"
