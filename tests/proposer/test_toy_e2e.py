"""End to end with a toy model: LookaheadState + a dense masked "forward" must reproduce plain
greedy decoding exactly, and emit more than one token per step on periodic text."""
from __future__ import annotations

import os

import torch

from lade_vllm.proposer import LookaheadState

VOCAB = 7
DEVICE = os.environ.get("LADE_TEST_DEVICE", "cpu")  # e.g. LADE_TEST_DEVICE=cuda


def toy_table(seed: int) -> torch.Tensor:
    """next token = table[prev2, prev1]: a deterministic 2-token-context model."""
    return torch.randint(VOCAB, (VOCAB, VOCAB), generator=torch.Generator().manual_seed(seed))


def greedy(table: torch.Tensor, prompt: list[int], n: int) -> list[int]:
    out = list(prompt)
    for _ in range(n):
        out.append(int(table[out[-2], out[-1]]))
    return out[len(prompt):]


def masked_forward(table: torch.Tensor, tree, histories: list[list[int]]) -> torch.Tensor:
    """Target per node from what the tree mask lets it see: committed history (which ends with the
    root token t, not yet in the 'cache') + its visible tree tokens in position order."""
    mask, depth = tree.mask_dense().cpu(), tree.depth.cpu()
    tokens, node_seq = tree.tokens.cpu(), tree.node_seq.cpu()
    out = torch.empty(tree.total_nodes, dtype=torch.long)
    for i in range(tree.total_nodes):
        seen = torch.nonzero(mask[i]).flatten()
        seen = seen[torch.argsort(depth[seen])]
        hist = histories[int(node_seq[i])][:-1]  # drop t: it is the root node
        ctx = hist + tokens[seen].tolist()
        out[i] = table[ctx[-2], ctx[-1]]
    return out.to(tree.tokens.device)


def run(table, prompts, n_new, W=4, N=4, G=4, enabled=None, pool_from_prompt=True, max_seqs=5):
    state = LookaheadState(max_seqs, W, N, G, pool_from_prompt=pool_from_prompt, device=DEVICE)
    slots = torch.tensor([3, 0, 1][:len(prompts)], device=DEVICE)
    if enabled is not None:
        enabled = enabled.to(DEVICE)
    histories = []
    for i, p in enumerate(prompts):
        first = int(table[p[-2], p[-1]])  # the "prefill" token
        histories.append(list(p) + [first])
        state.start(int(slots[i]), torch.tensor(histories[-1]), seed=i)
    steps = 0
    while min(len(h) for h in histories) < len(prompts[0]) + n_new + 1:
        last = torch.tensor([h[-1] for h in histories], device=DEVICE)
        tree = state.propose(slots, last, enabled=enabled)
        target = masked_forward(table, tree, histories)
        res = state.commit(slots, tree, target)
        emitted, num = res.emitted.cpu(), res.num_emitted.cpu()
        for i, h in enumerate(histories):
            h.extend(emitted[i, :int(num[i])].tolist())
        steps += 1
    outs = [h[len(p):len(p) + n_new] for h, p in zip(histories, prompts)]
    return outs, steps


def test_lookahead_equals_greedy_and_accelerates():
    table = toy_table(3)
    prompts = [[1, 2, 3, 4, 5, 6], [2, 2, 4, 1, 0, 3], [6, 5, 4, 3, 2, 1]]
    n_new = 120
    for pfp in (False, True):
        outs, steps = run(table, prompts, n_new, pool_from_prompt=pfp)
        for p, o in zip(prompts, outs):
            assert o == greedy(table, p, n_new)
        # a 2-token-context model over 7 tokens is eventually periodic: lookahead must pay off
        assert (n_new + 1) / steps > 1.5, steps


def test_disabled_sequence_decodes_one_token_per_step():
    table = toy_table(5)
    prompts = [[1, 2, 3, 4, 5, 6], [2, 2, 4, 1, 0, 3]]
    enabled = torch.tensor([True, False])
    outs, steps = run(table, prompts, 40, enabled=enabled)
    for p, o in zip(prompts, outs):
        assert o == greedy(table, p, 40)
    assert steps == 40  # the disabled one gains nothing


def test_free_and_restart_slot():
    state = LookaheadState(2, 3, 3, 2, pool_from_prompt=True)
    state.start(0, torch.tensor([1, 2, 3, 1, 2]), seed=0)
    state.free(torch.tensor([0]))
    assert state.windows.filled[0] == 0
    cands, valid = state.pool.lookup(torch.tensor([0]), torch.tensor([1]))
    assert not valid.any()
