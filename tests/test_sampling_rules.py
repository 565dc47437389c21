"""lade's per-node min_tokens rule against vLLM's own spec-decode rule (no engine).

vLLM 0.32's ``MinTokensLogitsProcessor.apply_with_spec_decode`` masks the stop tokens of the first
min_tokens - len(output) draft positions of a chain; lade's ``apply_min_tokens`` masks them at
every tree row whose output position len(output) + depth is below min_tokens. On a chain the two
are the same operation; on a tree, rows of one depth are masked alike.
"""
from __future__ import annotations

import torch

from lade_vllm.adapter.sampling import RequestRows, apply_min_tokens


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
