"""Structured output (JSON schema, regex, grammar, choice) on lookahead trees.

vLLM 0.32 keeps each request's grammar matcher in the engine core (``StructuredOutputManager``)
and treats a request's drafts as ONE chain: ``validate_tokens`` cuts the drafts at the first
token the grammar rejects after the previous ones, and ``grammar_bitmask`` fills one bitmask row
per draft position by accepting the drafts in order (then rolls back); the runner applies row i to
logits row i of the request (``apply_grammar_bitmask``), before sampling; after the step,
``Scheduler.update_from_output`` accepts the emitted tokens (``accept_tokens``).

A lade request's drafts are a tree flattened in storage order [trie | window] (node i's parent
``parents[i]`` < i; node 0 is the root, the last committed token). The worker reports, for
requests with structured output, the tree it proposed (drafts, parents, trie size) on the
``ModelRunnerOutput`` (``lade_trees``); the engine core keeps it on the request (``lade_tree``)
and, when the scheduled drafts are that tree (or a prefix of it):

* ``validate_tokens`` keeps the drafts as they are (a tree is no chain to cut);
* ``grammar_bitmask`` fills the request's rows per tree node (:func:`fill_tree_rows`): the root
  row as vLLM fills it, each trie node's row from the grammar state after the node's own path
  (accept the path, fill, roll back), a trie node the grammar rejects (or that ends the grammar)
  and its subtree get its parent's row (never accepted: its parent's target is sampled from masked
  logits, so it is grammar-valid and differs from the node's token), window nodes the root's row
  (their targets only feed the pool, they are never emitted).

Every emitted token is the target of an accepted node, sampled or argmaxed from logits masked by
the grammar state after exactly the tokens emitted before it: the tokens vanilla would emit.
``update_from_output`` then accepts them into vLLM's matcher as for any speculative method.
"""
from __future__ import annotations

import torch


def tree_of(request, drafts) -> tuple[list[int], int] | None:
    """(parents, trie nodes) of the lade tree whose scheduled drafts are ``drafts`` (the whole
    proposed tree or a prefix of its storage order), or None (not a lade tree)."""
    tree = getattr(request, "lade_tree", None)
    if tree is None or not drafts:
        return None
    tokens, parents, num_trie = tree
    n = len(drafts)
    if n > len(tokens) or list(tokens[:n]) != list(drafts):
        return None
    return parents, num_trie


def fill_tree_rows(grammar, req_id: str, drafts: list[int], parents: list[int], num_trie: int,
                   rows: torch.Tensor) -> None:
    """Rows 1..n of ``rows`` [1 + n, words] for tree nodes 1..n (row 0, the root's, is filled by
    vLLM). ``grammar``: the request's ``StructuredOutputGrammar`` at the committed tokens; it is
    left there."""
    n = len(drafts)
    ok = [True] + [False] * n
    paths: list[list[int] | None] = [[]] + [None] * n
    live = not grammar.is_terminated()
    for i in range(1, n + 1):
        p = int(parents[i])
        if i > num_trie:                  # window node: only proposes, never emitted
            rows[i].copy_(rows[0])
            continue
        if not (live and ok[p]):
            rows[i].copy_(rows[p])
            continue
        path = paths[p] + [int(drafts[i - 1])]
        if len(grammar.validate_tokens(path)) != len(path):
            rows[i].copy_(rows[p])        # the grammar rejects the node: never accepted
            continue
        grammar.accept_tokens(req_id, path)
        if grammar.is_terminated():       # the node ends the grammar (the request stops there)
            rows[i].copy_(rows[p])
        else:
            grammar.fill_bitmask(rows, i)
            ok[i], paths[i] = True, path
        grammar.rollback(len(path))


def tree_bitmask(manager, original, requests, req_ids, scheduled):
    """``StructuredOutputManager.grammar_bitmask`` with lade trees: vLLM's own rows for every
    request (lade trees: their root row only, filled by vLLM with no drafts), then the tree rows."""
    trees = {}
    for rid in req_ids:
        drafts = scheduled.get(rid)
        tree = tree_of(requests[rid], drafts) if drafts else None
        if tree is not None:
            trees[rid] = (list(drafts), *tree)
    if not trees:
        return original(manager, requests, req_ids, scheduled)
    chains = {r: d for r, d in scheduled.items() if r not in trees}
    base = original(manager, requests, req_ids, chains)
    if base is None:
        return None
    base = torch.from_numpy(base.copy())
    parts, at = [], 0
    for rid in req_ids:
        if rid in trees:
            drafts, parents, num_trie = trees[rid]
            rows = manager.backend.allocate_token_bitmask(len(drafts) + 1)
            rows[0].copy_(base[at])
            at += 1
            fill_tree_rows(requests[rid].structured_output_request.grammar, rid, drafts,
                           parents, num_trie, rows)
            parts.append(rows)
        else:
            n = 1 + len(chains.get(rid, ()))
            parts.append(base[at:at + n])
            at += n
    return torch.cat(parts).numpy()
