"""Step tree: ancestor mask vs a brute-force walk, DESIGN.md section 1 positions and visibility,
trie merge structure; every test runs on the torch path and on the compiled CPU kernel."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

from lade_vllm.proposer import build_step_trees

from .helpers import examples, ancestors_brute, node_path


@pytest.fixture(autouse=True, scope="module", params=["0", "1"], ids=["torch", "jit"])
def lade_jit(request):
    """LADE_JIT=0: torch ops; 1: the compiled kernel (lade_vllm.proposer.tree_jit)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LADE_JIT", request.param)
        yield request.param


@st.composite
def tree_inputs(draw):
    B = draw(st.integers(1, 4))
    W = draw(st.integers(1, 6))
    N = draw(st.integers(2, 5))
    G = draw(st.integers(0, 6))
    L, D = N - 1, N - 1
    vocab = draw(st.integers(2, 4))  # tiny vocabulary: many shared candidate prefixes
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    last = torch.randint(vocab, (B,), generator=gen)
    levels = torch.randint(vocab, (B, L, W), generator=gen)
    levels[:, 0, 0] = -1
    filled = torch.tensor(draw(st.lists(st.integers(0, L), min_size=B, max_size=B)))
    width = torch.tensor(draw(st.lists(st.integers(1, W), min_size=B, max_size=B)))
    cands = torch.randint(vocab, (B, G, D), generator=gen)
    valid = torch.rand((B, G), generator=gen) < 0.8
    num_cands = torch.tensor(draw(st.lists(st.integers(0, G), min_size=B, max_size=B)))
    max_len = draw(st.one_of(st.none(), st.integers(0, D)))
    cand_len = draw(st.one_of(st.none(), st.lists(st.integers(0, D), min_size=B, max_size=B)))
    return dict(last_tokens=last, window_levels=levels, num_filled=filled, cands=cands,
                cand_valid=valid, window_size=width, num_cands=num_cands, max_cand_len=max_len,
                cand_len=None if cand_len is None else torch.tensor(cand_len))


def expected_visible(inp, tree, b):
    """DESIGN.md section 1 visibility, as sets of node indices, from the grid/candidate layout."""
    start = int(tree.seq_start[b])
    f, w = int(tree.window_levels[b]), int(tree.window_width[b])
    vis = {start: {start}}
    for l in range(f):
        for c in range(w):
            if l == 0 and c == 0:
                continue
            node = start + l * w + c
            seen = {start + cc for cc in range(c + 1)} | {start + ll * w + c for ll in range(1, l + 1)}
            vis[node] = seen
    cni = tree.cand_node_index[b]
    for g in range(cni.shape[0]):
        for j in range(cni.shape[1]):
            if cni[g, j] >= 0:
                vis[int(cni[g, j])] = {start} | {int(cni[g, k]) for k in range(j + 1)}
    return vis


@settings(max_examples=examples(80), deadline=None)
@given(tree_inputs(), st.booleans())
def test_tree_structure(inp, merge):
    tree = build_step_trees(**inp, merge=merge)
    B = inp["last_tokens"].numel()
    T = tree.total_nodes
    mask = tree.mask_dense()
    anc = tree.ancestors()
    assert int(tree.seq_start[-1]) == T and torch.equal(tree.num_nodes, tree.seq_start.diff())
    for i in range(T):
        chain = ancestors_brute(tree, i)
        expect = torch.zeros(T, dtype=torch.bool)
        expect[chain] = True
        assert torch.equal(mask[i], expect)
        assert anc[i, :len(chain)].tolist() == chain and (anc[i, len(chain):] == -1).all()
        # visible tree tokens occupy consecutive positions p..p+depth
        assert [int(tree.depth[a]) for a in chain] == list(range(int(tree.depth[i]), -1, -1))
        assert int(tree.node_seq[chain[-1]]) == int(tree.node_seq[i])
    D = tree.cand_len
    for b in range(B):
        start, end = int(tree.seq_start[b]), int(tree.seq_start[b + 1])
        assert (tree.node_seq[start:end] == b).all()
        assert torch.equal(tree.ancestor_mask(b), mask[start:end, start:end])
        # DESIGN.md table: tokens and positions of the window grid
        f, w = int(tree.window_levels[b]), int(tree.window_width[b])
        assert f == int(inp["num_filled"][b]) and w == (int(inp["window_size"][b]) if f else 0)
        assert int(tree.tokens[start]) == int(inp["last_tokens"][b]) and tree.depth[start] == 0
        for l in range(f):
            for c in range(w):
                node = start + l * w + c
                if l or c:
                    assert int(tree.tokens[node]) == int(inp["window_levels"][b, l, c])
                    assert int(tree.depth[node]) == l + c
                    assert not tree.is_trie[node]
        top = tree.top_level_index[b]
        assert top[:w].tolist() == ([start + (f - 1) * w + c for c in range(w)] if f else [-1] * w)
        assert (top[w:] == -1).all()
        # visibility rules
        vis = expected_visible(inp, tree, b)
        assert set(vis) == set(range(start, end))
        for node, seen in vis.items():
            assert set(torch.nonzero(mask[node]).flatten().tolist()) == seen
        # trie: nodes are exactly the distinct prefixes of the fed candidates (merged case)
        G = inp["cands"].shape[1]
        nc = int(inp["num_cands"][b])
        Db = D if inp["cand_len"] is None else min(D, int(inp["cand_len"][b]))  # per-sequence cap
        usable = [g for g in range(G) if inp["cand_valid"][b, g]
                  and min(inp["cands"][b, g, :D].tolist(), default=0) >= 0]
        kept = set(usable[max(len(usable) - nc, 0):]) if nc > 0 else set()  # the newest nc
        fed = [tuple(inp["cands"][b, g, :Db].tolist()) for g in range(G) if g in kept and Db > 0]
        trie_nodes = [i for i in range(start, end) if tree.is_trie[i]]
        paths = [node_path(tree, i)[1:] for i in trie_nodes]
        if merge:
            assert sorted(paths) == sorted({c[:j + 1] for c in fed for j in range(Db)})
        else:
            assert len(paths) == len(fed) * Db
        for g in range(G):
            fed_g = g in kept and Db > 0
            row = tree.cand_node_index[b, g]
            if not fed_g:
                assert (row == -1).all()
                continue
            assert (row[Db:] == -1).all()
            row = row[:Db]
            assert [int(tree.tokens[n]) for n in row] == inp["cands"][b, g, :Db].tolist()
            assert [int(tree.depth[n]) for n in row] == list(range(1, Db + 1))
            assert bool(tree.is_trie[row].all())
        # depth-major order of trie nodes
        depths = [int(tree.depth[i]) for i in trie_nodes]
        assert depths == sorted(depths)
        assert trie_nodes == list(range(end - len(trie_nodes), end))


def test_design_example():
    """DESIGN.md / reference example: W=5, N=4, two candidates -> relative positions."""
    W, N = 5, 4
    levels = torch.arange(100, 100 + (N - 1) * W).reshape(1, N - 1, W)
    cands = torch.tensor([[[1, 2, 3], [4, 5, 6]]])
    tree = build_step_trees(torch.tensor([7]), levels, torch.tensor([N - 1]), cands,
                            torch.tensor([[True, True]]))
    assert tree.total_nodes == 1 + (N - 1) * W - 1 + 6
    assert tree.depth[:W].tolist() == [0, 1, 2, 3, 4]
    assert tree.depth[W:2 * W].tolist() == [1, 2, 3, 4, 5]
    assert tree.depth[2 * W:3 * W].tolist() == [2, 3, 4, 5, 6]
    assert sorted(tree.depth[3 * W:].tolist()) == [1, 1, 2, 2, 3, 3]
    assert tree.positions(torch.tensor([10]))[:W].tolist() == [10, 11, 12, 13, 14]


def test_disabled_sequence_is_root_only():
    levels = torch.zeros(2, 3, 4, dtype=torch.long)
    cands = torch.ones(2, 2, 3, dtype=torch.long)
    tree = build_step_trees(torch.tensor([5, 6]), levels, torch.tensor([0, 3]), cands,
                            torch.tensor([[False, False], [True, True]]))
    assert tree.num_nodes.tolist() == [1, 12 + 3]
    assert tree.top_level_index[0].tolist() == [-1] * 4


@settings(max_examples=examples(40), deadline=None)
@given(tree_inputs(), st.sampled_from([70_001, 1 << 13, 1 << 20]))
def test_tree_does_not_depend_on_token_magnitude(inp, scale):
    """Candidates are sorted through packed keys (tokens themselves, or dense per-row ranks when the
    tokens are too wide): an order-preserving change of the token values gives the same tree."""
    big = dict(inp)
    f = lambda t: torch.where(t >= 0, t * scale + 5, t)
    big["cands"] = f(inp["cands"])
    big["window_levels"] = f(inp["window_levels"])
    big["last_tokens"] = f(inp["last_tokens"])
    a, b = build_step_trees(**inp), build_step_trees(**big)
    assert torch.equal(f(a.tokens), b.tokens)
    for name in ("depth", "parent", "node_seq", "is_trie", "seq_start", "top_level_index",
                 "cand_node_index"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


@pytest.mark.parametrize("vocab,G,D", [(5, 6, 3), (60_000, 15, 4), (1 << 17, 15, 4),
                                       (2**31 - 1, 9, 5), (2**31 - 1, 40, 8), (3, 40, 8)])
def test_lex_sort_paths(vocab, G, D):
    """Packed token keys (incl. the 64-bit sign flip), dense-rank keys and the radix fallback all give
    the stable lexicographic order with invalid candidates last."""
    from lade_vllm.proposer.tree import _lex_sort
    gen = torch.Generator().manual_seed(vocab % 1000 + G + D)
    B = 3
    cands = torch.randint(vocab, (B, G, D), generator=gen)
    cands[:, 1] = cands[:, 0]                                  # duplicates (stability)
    cands[:, 2, :-1] = cands[:, 3, :-1]                        # shared prefixes
    cands[:, -1] = vocab - 1                                   # the largest tokens
    valid = torch.rand((B, G), generator=gen) < 0.8
    cands[0][~valid[0]] = -1                                   # invalid: -1 rows or any tokens
    perm = _lex_sort(cands, valid)[0]
    for b in range(B):
        rows = cands[b].tolist()
        expect = sorted(range(G), key=lambda i: (not bool(valid[b, i]), rows[i] if valid[b, i] else []))
        assert perm[b].tolist() == expect
