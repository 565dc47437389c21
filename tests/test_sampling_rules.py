"""Per-node rules without an engine: min_tokens against vLLM's own spec-decode rule, and the
grammar bitmask rows of a tree (lade_vllm.adapter.structured) on a toy grammar.

vLLM 0.32's ``MinTokensLogitsProcessor.apply_with_spec_decode`` masks the stop tokens of the first
min_tokens - len(output) draft positions of a chain; lade's ``apply_min_tokens`` masks them at
every tree row whose output position len(output) + depth is below min_tokens. On a chain the two
are the same operation; on a tree, rows of one depth are masked alike.
"""
from __future__ import annotations

import torch

from lade_vllm.adapter.token_rules import RequestRows, apply_min_tokens


def _proc(min_toks: dict):
    from vllm.v1.sample.logits_processor.builtin import MinTokensLogitsProcessor
    proc = MinTokensLogitsProcessor(None, torch.device("cpu"), False)
    proc.min_toks = min_toks
    return proc


def test_min_tokens_chain_equals_vllm_spec_decode_rule():
    torch.manual_seed(0)
    V = 16
    # batch index -> (min_tokens, output so far, stop tokens, structured output)
    min_toks = {0: (5, [3, 4], {2, 7}, False),      # positions 2, 3, 4 masked
                1: (3, [1, 1, 1], {2}, False),      # reached: nothing masked
                2: (9, [5], {2, 11}, False)}        # every row masked
    num_draft = [4, 2, 3]
    logits = torch.randn(sum(num_draft), V)
    want = _proc(min_toks).apply_with_spec_decode(logits.clone(), num_draft)
    reqs, lo = [], 0
    for b, n in enumerate(num_draft):
        reqs.append(RequestRows(b, lo, n))
        lo += n
    depths = [d for n in num_draft for d in range(n)]
    got = apply_min_tokens(logits.clone(), reqs, min_toks, depths)
    assert torch.equal(got, want)
    assert torch.isinf(got[0:3][:, [2, 7]]).all() and not torch.isinf(got[3]).any()
    assert not torch.isinf(got[4:6]).any() and torch.isinf(got[6:9][:, [2, 11]]).all()


def test_min_tokens_tree_rows_masked_by_depth():
    V = 8
    min_toks = {3: (4, [1, 1], {0, 5}, False)}   # output positions 2, 3 masked: depths 0, 1
    depths = [0, 1, 1, 2, 3, 2]
    logits = torch.zeros(len(depths), V)
    got = apply_min_tokens(logits, [RequestRows(3, 0, len(depths))], min_toks, depths)
    masked = torch.isinf(got[:, [0, 5]]).all(dim=1).tolist()
    assert masked == [d < 2 for d in depths]
    assert not torch.isinf(got[:, [1, 2, 3, 4, 6, 7]]).any()


class _Grammar:
    """A toy ``StructuredOutputGrammar``: the sentences of a finite language, 8 tokens."""

    def __init__(self, sentences):
        self.sentences = [tuple(s) for s in sentences]
        self.state: list[int] = []

    def _prefix(self, seq) -> bool:
        return any(s[:len(seq)] == tuple(seq) for s in self.sentences)

    def validate_tokens(self, tokens):
        out = []
        for t in tokens:
            if not self._prefix(self.state + out + [t]):
                break
            out.append(t)
        return out

    def accept_tokens(self, req_id, tokens):
        assert len(self.validate_tokens(tokens)) == len(tokens)
        self.state += list(tokens)
        return True

    def rollback(self, n):
        del self.state[len(self.state) - n:]

    def is_terminated(self):
        return tuple(self.state) in self.sentences

    def fill_bitmask(self, rows, i):
        allowed = {s[len(self.state)] for s in self.sentences
                   if len(s) > len(self.state) and s[:len(self.state)] == tuple(self.state)}
        rows[i] = sum(1 << t for t in allowed)


def test_tree_bitmask_rows_follow_each_nodes_path():
    from lade_vllm.adapter.structured import fill_tree_rows
    g = _Grammar([(1, 2, 3), (1, 2, 4), (5, 6)])
    # nodes 1..7: 1 (root), 2 (under 1), 5 (root), 7 (root: rejected), 3 (under the rejected
    # node), 4 (under 2: ends the grammar), window node 6 (under 5)
    drafts = [1, 2, 5, 7, 3, 4, 6]
    parents = [-1, 0, 1, 0, 0, 4, 2, 3]
    rows = torch.zeros(8, 1, dtype=torch.int32)
    g.fill_bitmask(rows, 0)
    fill_tree_rows(g, "r", drafts, parents, 6, rows)
    bits = lambda *ts: sum(1 << t for t in ts)   # noqa: E731
    assert rows[:, 0].tolist() == [bits(1, 5), bits(2), bits(3, 4), bits(6), bits(1, 5),
                                   bits(1, 5), bits(3, 4), bits(1, 5)]
    assert g.state == []   # the grammar is left at the committed tokens


def test_row_argmax_is_argmax_with_ties_and_nan():
    """The greedy target per row (``row_argmax``, the fast reduction) picks what ``argmax`` picks:
    the first maximal index on ties, the first NaN where a row has one, in every dtype."""
    from lade_vllm.adapter.sampling import row_argmax
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4099, generator=gen)
    x[1, 5] = x[1, 900] = 1e4            # a tie: the first index wins
    x[2] = 0                              # all equal
    x[3, 17] = x[3, 40] = float("nan")    # NaN is the maximum, first one
    x[4, -1] = float("inf")
    x[5] = float("-inf")
    x[6] = torch.randint(0, 3, (4099,), generator=gen).float()   # many ties
    x[7] = 0
    x[7, :3] = -0.0                       # -0 equals +0: the first index wins
    x[8, 30] = -float("nan")              # a NaN with the sign bit set is the maximum too
    x[9] = -x[9].abs() - 1                # every value negative
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        y = x.to(dtype)
        assert torch.equal(row_argmax(y), y.argmax(dim=-1)), dtype
        assert torch.equal(row_argmax(y[:0]), y[:0].argmax(dim=-1))
        for rows in (slice(0, 1), slice(3, 4), slice(0, 9), slice(2, 19)):   # chunk edges
            assert torch.equal(row_argmax(y[rows]), y[rows].argmax(dim=-1)), (dtype, rows)
