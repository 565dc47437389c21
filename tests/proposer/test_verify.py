"""Verifier: greedy vs brute force (unmerged, candidate by candidate), merged == unmerged, and the
sampling law vs a multi-draft rejection sampling oracle and the exact distribution."""
from __future__ import annotations

import random
from collections import Counter

import torch
from hypothesis import given, settings, strategies as st

from lade_vllm.proposer import build_step_trees, verify_tree

from .helpers import examples, node_path, targets_from_prefix


def prefix_fn(seed: int, vocab: int):
    """A deterministic 'greedy model': next token = hash of the whole prefix."""
    return lambda prefix: random.Random(hash((seed,) + prefix)).randrange(vocab)


def greedy_brute(t: int, cands: list[tuple[int, ...]], fn) -> list[int]:
    """Longest candidate prefix matching the argmax chain; ties go to the earliest candidate."""
    best, best_len = (), 0
    for cand in cands:
        m = 0
        while m < len(cand) and cand[m] == fn((t,) + cand[:m]):
            m += 1
        if m > best_len:
            best, best_len = cand[:m], m
    return list(best) + [fn((t,) + tuple(best))]


@st.composite
def verify_case(draw):
    B = draw(st.integers(1, 4))
    D = draw(st.integers(1, 4))
    G = draw(st.integers(0, 6))
    vocab = draw(st.integers(2, 4))
    seed = draw(st.integers(0, 10**6))
    fn = prefix_fn(seed, vocab)
    rng = random.Random(seed)
    last = [rng.randrange(vocab) for _ in range(B)]
    cands, valid = [], []
    for b in range(B):
        chain, prefix = [], (last[b],)
        for _ in range(D):  # the true greedy continuation
            chain.append(fn(prefix))
            prefix += (chain[-1],)
        rows = []
        for _ in range(G):  # follow the chain for a while, then diverge at random
            k = rng.randrange(D + 1)
            rows.append(chain[:k] + [rng.randrange(vocab) for _ in range(D - k)])
        cands.append(rows)
        valid.append([rng.random() < 0.85 for _ in range(G)])
    return fn, torch.tensor(last), torch.tensor(cands, dtype=torch.long).reshape(B, G, D), \
        torch.tensor(valid, dtype=torch.bool).reshape(B, G)


@settings(max_examples=examples(100), deadline=None)
@given(verify_case(), st.integers(0, 3), st.integers(1, 3))
def test_greedy_matches_brute_force(case, filled, width):
    fn, last, cands, valid = case
    B, G, D = cands.shape
    levels = torch.randint(4, (B, max(D, 1), width))
    outs = []
    for merge in (True, False):
        tree = build_step_trees(last, levels, torch.full((B,), min(filled, D)), cands, valid,
                                merge=merge)
        res = verify_tree(tree, targets_from_prefix(tree, fn))
        outs.append(res.emitted)
        for b in range(B):
            fed = [tuple(cands[b, g].tolist()) for g in range(G) if valid[b, g]]
            expect = greedy_brute(int(last[b]), fed, fn)
            n = int(res.num_emitted[b])
            assert res.emitted[b, :n].tolist() == expect
            assert (res.emitted[b, n:] == -1).all()
            acc = res.accepted_nodes[b]
            assert int(res.num_accepted[b]) == n - 1 and (acc[n - 1:] == -1).all()
            assert tree.tokens[acc[:n - 1]].tolist() == expect[:-1]
            assert tree.depth[acc[:n - 1]].tolist() == list(range(1, n))
            last_node = int(res.last_node[b])
            assert last_node == (int(acc[n - 2]) if n > 1 else int(tree.root_index[b]))
    assert torch.equal(outs[0], outs[1])  # trie merge does not change what is emitted


# ---------------------------------------------------------------- sampling
VOCAB, DEPTH = 4, 2
DRAFTS = [(0, 1), (0, 2), (1, 1), (0, 1), (2, 0), (1, 3)]  # shared prefixes and a duplicate


def make_p(seed: int):
    cache = {}

    def p(prefix: tuple[int, ...]) -> list[float]:
        if prefix not in cache:
            g = torch.Generator().manual_seed(hash((seed,) + prefix) % 2**31)
            w = torch.rand(VOCAB, generator=g) + 0.05
            cache[prefix] = (w / w.sum()).tolist()
        return cache[prefix]
    return p


def multi_draft_rejection_reference(p, draft_tokens, generator: random.Random) -> tuple[int, ...]:
    """Brute-force multi-draft rejection sampling over *unmerged* deterministic drafts.

    p(prefix) -> target distribution after the committed token and ``prefix``. At each depth, try
    the surviving drafts' tokens in order: accept x with probability p(x) / remaining mass, else set
    p(x) = 0 and go on; if all are rejected sample the residual and stop. After the full depth sample
    the bonus token. Returns the emitted tokens.
    """
    prefix: tuple[int, ...] = ()
    survivors = list(range(len(draft_tokens)))
    depth = len(draft_tokens[0]) if draft_tokens else 0
    while True:
        probs = list(p(prefix))
        accepted = None
        if len(prefix) < depth:
            for k in survivors:
                x = draft_tokens[k][len(prefix)]
                if generator.random() * sum(probs) < probs[x]:
                    accepted = x
                    break
                probs[x] = 0.0
        if accepted is None:
            y = generator.choices(range(len(probs)), weights=probs)[0]
            return prefix + (y,)
        survivors = [k for k in survivors if draft_tokens[k][len(prefix)] == accepted]
        prefix += (accepted,)


def exact_distribution(p, drafts) -> dict[tuple[int, ...], float]:
    """Law of 'draw y ~ p at each node, follow the child equal to y', by enumeration."""
    out: dict[tuple[int, ...], float] = {}

    def walk(prefix, mass):
        children = {d[len(prefix)] for d in drafts if d[:len(prefix)] == prefix} \
            if len(prefix) < DEPTH else set()
        for y, q in enumerate(p(prefix)):
            if y in children:
                walk(prefix + (y,), mass * q)
            else:
                out[prefix + (y,)] = out.get(prefix + (y,), 0.0) + mass * q
    walk((), 1.0)
    return out


def total_variation(counts: Counter, exact: dict, n: int) -> float:
    keys = set(counts) | set(exact)
    return 0.5 * sum(abs(counts.get(k, 0) / n - exact.get(k, 0.0)) for k in keys)


def test_sampling_law_matches_rejection_sampling():
    n, t = 20000, 3
    p = make_p(7)
    exact = exact_distribution(p, DRAFTS)
    assert abs(sum(exact.values()) - 1) < 1e-6

    # ours: n identical sequences in one batch, one independent target sample per node
    G = len(DRAFTS)
    cands = torch.tensor(DRAFTS).expand(n, G, DEPTH)
    tree = build_step_trees(torch.full((n,), t), torch.zeros(n, DEPTH, 1, dtype=torch.long),
                            torch.zeros(n, dtype=torch.long), cands, torch.ones(n, G, dtype=torch.bool))
    per_seq = int(tree.num_nodes[0])
    assert per_seq == 1 + 3 + 5  # root, 3 distinct first tokens, 5 distinct 2-prefixes
    probs = torch.tensor([p(node_path(tree, i)[1:]) for i in range(per_seq)]).repeat(n, 1)
    gen = torch.Generator().manual_seed(0)
    target = torch.multinomial(probs, 1, generator=gen)[:, 0]
    res = verify_tree(tree, target)
    ours = Counter(tuple(row[:k]) for row, k in zip(res.emitted.tolist(), res.num_emitted.tolist()))

    rng = random.Random(0)
    ref = Counter(multi_draft_rejection_reference(p, DRAFTS, rng) for _ in range(n))

    tv_ours, tv_ref = total_variation(ours, exact, n), total_variation(ref, exact, n)
    tv_between = 0.5 * sum(abs(ours.get(k, 0) - ref.get(k, 0)) / n for k in set(ours) | set(ref))
    # 2x the typical sampling noise for ~40 outcomes at n = 20000 is about 0.03
    assert tv_ours < 0.03, tv_ours
    assert tv_ref < 0.03, tv_ref
    assert tv_between < 0.04, tv_between


def test_no_candidates_emits_the_root_target():
    tree = build_step_trees(torch.tensor([4, 5]), torch.zeros(2, 2, 3, dtype=torch.long),
                            torch.tensor([2, 0]), torch.zeros(2, 0, 2, dtype=torch.long),
                            torch.zeros(2, 0, dtype=torch.bool))
    target = torch.arange(tree.total_nodes) + 100
    res = verify_tree(tree, target)
    assert res.num_emitted.tolist() == [1, 1]
    assert res.emitted[:, 0].tolist() == [100 + int(tree.root_index[0]), 100 + int(tree.root_index[1])]
