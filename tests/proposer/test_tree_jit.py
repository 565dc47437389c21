"""The compiled CPU kernel of ``build_step_trees`` (lade_vllm.proposer.tree_jit) gives every
``StepTree`` field of the torch path, dtypes included, over random batches."""
from __future__ import annotations

import pytest
import torch

from lade_vllm.proposer import build_step_trees
from lade_vllm.proposer import tree_jit

from .helpers import examples

FIELDS = ("tokens", "depth", "parent", "node_seq", "is_trie", "seq_start", "num_nodes",
          "root_index", "window_levels", "window_width", "top_level_index", "cand_node_index")


def both_paths(monkeypatch, *args, **kwargs):
    """(torch tree, kernel tree) of the same arguments."""
    trees = []
    for jit in ("0", "1"):
        monkeypatch.setenv("LADE_JIT", jit)
        trees.append(build_step_trees(*args, **kwargs))
    return trees


def assert_same(ref, got, what=""):
    for name in FIELDS:
        a, b = getattr(ref, name), getattr(got, name)
        assert a.dtype == b.dtype and a.shape == b.shape, (name, what)
        assert torch.equal(a, b), (name, what, a, b)
    assert (ref.cand_len, ref.max_depth) == (got.cand_len, got.max_depth), what


def random_batch(gen):
    """Random ``build_step_trees`` arguments: tiny vocabularies (shared prefixes, duplicates),
    negative tokens, invalid candidates, every optional argument sometimes given, out of range
    values included."""
    def rint(lo, hi):
        return int(torch.randint(lo, hi + 1, (1,), generator=gen))

    B, L, W, G, D0 = rint(1, 8), rint(1, 4), rint(1, 7), rint(0, 9), rint(0, 6)
    vocab = rint(1, 4)
    cands = torch.randint(vocab, (B, G, D0), generator=gen)
    if G > 1 and rint(0, 1):
        cands[:, 1] = cands[:, 0]                          # duplicates
    if G > 3 and D0 > 1:
        cands[:, 2, :-1] = cands[:, 3, :-1]                # shared prefixes
    neg = torch.rand((B, G, D0), generator=gen) < 0.1 * rint(0, 3)
    cands[neg] = -1 - rint(0, 2)                           # candidates ending early / dropped
    kwargs = dict(merge=rint(0, 3) > 0)
    if rint(0, 1):
        kwargs["max_cand_len"] = rint(-1, D0 + 1)
    if rint(0, 1):
        kwargs["window_size"] = torch.randint(-1, W + 2, (B,), generator=gen)
    if rint(0, 1):
        kwargs["num_cands"] = torch.randint(-1, G + 2, (B,), generator=gen)
    if rint(0, 1):
        kwargs["cand_len"] = torch.randint(-1, D0 + 2, (B,), generator=gen)
    args = (torch.randint(vocab, (B,), generator=gen),
            torch.randint(vocab, (B, L, W), generator=gen),
            torch.randint(-1, L + 2, (B,), generator=gen),
            cands,
            torch.rand((B, G), generator=gen) < 0.1 * rint(0, 10))
    return args, kwargs


@pytest.mark.parametrize("seed", range(4))
def test_kernel_matches_torch_on_random_batches(monkeypatch, seed):
    gen = torch.Generator().manual_seed(seed)
    for case in range(examples(400)):
        args, kwargs = random_batch(gen)
        ref, got = both_paths(monkeypatch, *args, **kwargs)
        assert_same(ref, got, (seed, case, kwargs))


@pytest.mark.parametrize("vocab,G,D", [(60_000, 15, 4), (2**31 - 1, 9, 5), (2**31 - 2, 40, 8),
                                       (3, 40, 8)])
def test_kernel_matches_torch_on_every_sort_path(monkeypatch, vocab, G, D):
    """Token-packed keys, dense-rank keys and the radix sort of the torch path (wide tokens,
    long candidates), with duplicates, shared prefixes and candidates ending early."""
    gen = torch.Generator().manual_seed(G + D)
    B = 3
    cands = torch.randint(vocab, (B, G, D), generator=gen)
    cands[:, 1] = cands[:, 0]
    cands[:, 2, :-1] = cands[:, 3, :-1]
    cands[:, 4, D // 2] = -1
    cands[:, 5, :] = cands[:, 4, :]
    args = (torch.randint(vocab, (B,), generator=gen), torch.randint(vocab, (B, 2, 3), generator=gen),
            torch.tensor([2, 1, 0]), cands, torch.rand((B, G), generator=gen) < 0.8)
    for merge in (True, False):
        assert_same(*both_paths(monkeypatch, *args, merge=merge), (vocab, merge))


def test_kernel_takes_other_dtypes_and_layouts(monkeypatch):
    """int32 / non-contiguous inputs and an empty batch give the torch path's fields."""
    gen = torch.Generator().manual_seed(0)
    levels = torch.randint(5, (3, 6, 4), generator=gen, dtype=torch.int32).transpose(1, 2)
    cands = torch.randint(3, (3, 5, 9), generator=gen, dtype=torch.int32).transpose(1, 2)
    args = (torch.tensor([1, 2, 3], dtype=torch.int32), levels,
            torch.tensor([4, 2, 0], dtype=torch.int32), cands, torch.ones(3, 9, dtype=torch.int32))
    assert_same(*both_paths(monkeypatch, *args, max_cand_len=3, cand_len=torch.tensor([3, 1, 2])))
    empty = (torch.zeros(0, dtype=torch.long), torch.zeros(0, 2, 3, dtype=torch.long),
             torch.zeros(0, dtype=torch.long), torch.zeros(0, 3, 2, dtype=torch.long),
             torch.zeros(0, 3, dtype=torch.bool))
    assert_same(*both_paths(monkeypatch, *empty))


def test_engine_shaped_steps(monkeypatch):
    """The engine's shapes: W=7, N=5, G=7 pool candidates + the suffix match (K=8) as the newest
    row, per-sequence window use, candidate count and length."""
    gen = torch.Generator().manual_seed(1)
    B, W, L, G, D = 32, 7, 4, 7, 8
    cands = torch.randint(6, (B, G + 1, D), generator=gen)
    cands[:, :G, L:] = -1
    cands[:, G, torch.randint(2, D, (1,), generator=gen):] = -1
    valid = torch.rand((B, G + 1), generator=gen) < 0.9
    args = (torch.randint(50, (B,), generator=gen), torch.randint(50, (B, L, W), generator=gen),
            torch.randint(0, L + 1, (B,), generator=gen), cands, valid)
    kwargs = dict(window_size=torch.randint(1, W + 1, (B,), generator=gen),
                  num_cands=torch.randint(0, G + 2, (B,), generator=gen),
                  cand_len=torch.randint(0, D + 1, (B,), generator=gen))
    assert_same(*both_paths(monkeypatch, *args, **kwargs))
    assert_same(*both_paths(monkeypatch, *args, max_cand_len=4))


def test_warm_compiles_and_reports_seconds():
    assert tree_jit.warm() >= 0.0
