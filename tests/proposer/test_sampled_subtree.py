"""Sampled verification of a scheduled (possibly truncated) tree, ``lade_vllm.adapter.sampling``:
emitted tokens follow the model's distribution exactly when acceptance is restricted to the trie,
and seeded per-row sampling is reproducible and follows softmax."""
from __future__ import annotations

import random
from collections import Counter

import numpy as np
import torch

from lade_vllm.adapter.sampling import RequestRows, sample_rows
from lade_vllm.proposer.verify import verify_subtree

V = 3


def model(prefix: tuple[int, ...]) -> np.ndarray:
    """A fixed toy next-token distribution per prefix."""
    rng = random.Random(hash(prefix) % 10_007)
    w = np.array([rng.random() + 0.05 for _ in range(V)])
    return w / w.sum()


# storage order [root | trie | window]; the window's first node repeats the trie's first token
#   0 root (token 0)
#   1 trie  token 1 (parent 0)   2 trie token 2 (parent 0)   3 trie token 2 (parent 1)
#   4 window token 1 (parent 0)  5 window token 1 (parent 4)
PARENT = np.array([-1, 0, 0, 1, 0, 4])
TOKENS = np.array([0, 1, 2, 2, 1, 1])
TRIE = np.array([True, True, True, True, False, False])


def _path_tokens(i: int) -> tuple[int, ...]:
    out = []
    while i >= 0:
        out.append(int(TOKENS[i]))
        i = int(PARENT[i])
    return tuple(reversed(out))


def _run(acceptable, n: int, seed: int) -> Counter:
    rng = np.random.default_rng(seed)
    dists = [model(_path_tokens(i)) for i in range(len(TOKENS))]
    cum = np.cumsum(np.stack(dists), axis=1)
    counts = Counter()
    for _ in range(n):
        target = (rng.random((len(TOKENS), 1)) > cum).sum(1)   # one independent draw per node
        path = verify_subtree(PARENT, TOKENS, target, acceptable)
        emitted = [int(TOKENS[s]) for s in path] + [int(target[path[-1] if path else 0])]
        counts[tuple(emitted[:2])] += 1     # first two tokens (a second one when accepted)
    return counts


def _exact_first_two() -> dict:
    """Exact probability of each emitted (t1,) / (t1, t2) outcome under sequential sampling,
    given which first tokens have a trie child to continue through."""
    p1 = model((0,))
    out = {}
    for t1 in range(V):
        if t1 in (1, 2):      # trie children of the root: a second token is emitted
            p2 = model((0, t1))
            for t2 in range(V):
                out[(t1, t2)] = p1[t1] * p2[t2]
        else:
            out[(t1,)] = p1[t1]
    return out


def test_trie_only_acceptance_is_exact():
    n = 40_000
    got = _run(TRIE, n, 1)
    exact = _exact_first_two()
    tv = 0.5 * sum(abs(got[k] / n - exact.get(k, 0.0)) for k in set(got) | set(exact))
    assert tv < 0.015, (tv, got, exact)


def test_equal_token_window_sibling_would_bias_the_next_token():
    """Why sampled requests exclude the window: with the window's node 4 (same token as trie node
    1) acceptable, picking the deeper of two equal-token children picks by their own samples."""
    n = 40_000
    got = _run(None, n, 2)
    p1, p2 = model((0,)), model((0, 1))
    # P(second token = 1 | first token 1): exact is p2[1]; the deepest-wins rule inflates it
    # to p2[1] * (1 + p2[0]), because node 4's child (token 1) is followed whenever node 4's
    # sample is 1, even when node 1's own sample is not
    first1 = sum(v for k, v in got.items() if k[0] == 1)
    biased = got[(1, 1)] / first1
    assert biased > p2[1] + 0.1, (biased, p2[1], p1)


def test_sample_rows_seeded_and_distributed():
    torch.manual_seed(0)
    logits = torch.randn(6, 5)
    reqs = [RequestRows(batch_idx=0, start=0, num=3), RequestRows(batch_idx=3, start=3, num=3)]
    depths = torch.tensor([0, 1, 2, 0, 1, 2])
    gens = {3: torch.Generator().manual_seed(11)}
    a, _ = sample_rows(logits.clone(), reqs, gens, depths)
    gens = {3: torch.Generator().manual_seed(11)}
    b, _ = sample_rows(logits.clone(), reqs, gens, depths)
    assert torch.equal(a[3:], b[3:])                       # the seeded request's rows
    # every row follows softmax(row), independently
    draws = torch.stack([sample_rows(logits.clone(), reqs, {}, depths)[0] for _ in range(4000)])
    probs = logits.softmax(-1)
    for r in range(6):
        freq = torch.bincount(draws[:, r], minlength=5).float() / draws.shape[0]
        assert (freq - probs[r]).abs().max() < 0.03, (r, freq, probs[r])


def test_seeded_rows_use_the_noise_of_their_output_position():
    """A seeded request's row at depth d samples with the noise vLLM's sampler would draw for the
    output position d steps ahead (one float32 exponential per vocabulary entry per position,
    drawn in order from the request's generator); rewinding after e emitted tokens leaves the
    generator exactly where e plain steps would have left it."""
    torch.manual_seed(1)
    V = 50
    logits = torch.randn(5, V)
    depths = torch.tensor([0, 1, 1, 2, 3])                 # two rows share depth 1
    gen = torch.Generator().manual_seed(7)
    tok, streams = sample_rows(logits.clone(), [RequestRows(2, 0, 5)], {2: gen}, depths)
    ref = torch.Generator().manual_seed(7)
    noise = [torch.empty(V).exponential_(generator=ref) for _ in range(4)]
    want = [int((logits[i].softmax(-1) / noise[int(depths[i])]).argmax()) for i in range(5)]
    assert tok.tolist() == want
    streams[2].rewind(2)                                   # two tokens emitted this step
    ref = torch.Generator().manual_seed(7)
    for _ in range(2):
        torch.empty(V).exponential_(generator=ref)
    assert torch.equal(torch.rand(8, generator=gen), torch.rand(8, generator=ref))
