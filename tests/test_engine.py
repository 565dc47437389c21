"""The step engine (lade_vllm.engine) without vLLM: a stand-in model whose greedy next token depends
on the last token only, a stand-in scheduler that may truncate trees, and the exactness of the
emitted text against the model's own greedy continuation."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from lade_vllm.config import LadeConfig
from lade_vllm.engine import LadeEngine, ProposeBatch, RequestInfo, ScheduledBatch
from lade_vllm.proposal import select_trees
from lade_vllm.proposer import LookaheadState

V = 40


def model(tokens):
    """Greedy next token of the stand-in model (a permutation-like walk with short cycles)."""
    return (np.asarray(tokens) * 7 + 3) % V


def continuation(last, n):
    out = []
    for _ in range(n):
        last = int(model(last))
        out.append(last)
    return out


class Run:
    """Drives the engine step by step like vLLM's runner would."""

    def __init__(self, prompts, cfg=None, caps=None, info=None, vocab_size=None):
        self.engine = LadeEngine(cfg or LadeConfig(adaptive=False), max_seqs=8,
                                 vocab_size=vocab_size)
        self.req_ids = list(prompts)
        self.tokens = np.zeros((len(prompts), 1024), dtype=np.int64)
        self.num = np.zeros(len(prompts), dtype=np.int64)
        for i, p in enumerate(prompts.values()):
            p = list(p) + continuation(p[-1], 1)     # the prefill step's token
            self.tokens[i, :len(p)] = p
            self.num[i] = len(p)
        self.sampled = [[int(self.tokens[i, self.num[i] - 1])] for i in range(len(prompts))]
        self.caps = caps or {}
        self.info = info or (lambda r: RequestInfo(True))
        self.proposes = 0
        original = self.engine.state.propose

        def counting(*a, **k):
            self.proposes += 1
            return original(*a, **k)

        self.engine.state.propose = counting

    def batch(self) -> ProposeBatch:
        return ProposeBatch(self.req_ids, self.sampled, self.num.copy(), self.tokens,
                            set(self.req_ids), len(self.req_ids), self.info)

    def step(self):
        e = self.engine
        drafts = e.propose(self.batch())
        sched = {r: d[:self.caps.get(r, len(d))] for r, d in zip(self.req_ids, drafts)}
        starts = np.cumsum([0] + [len(sched[r]) + 1 for r in self.req_ids])[:-1]
        ctx = e.plan(ScheduledBatch(
            total_tokens=sum(len(d) + 1 for d in sched.values()), finished=[],
            index_of={r: i for i, r in enumerate(self.req_ids)},
            drafts={r: d for r, d in sched.items() if d},
            num_scheduled={r: len(d) + 1 for r, d in sched.items()},
            query_start=starts, num_computed=self.num - 1))
        emitted = {r: [int(model(self.sampled[i][-1]))] for i, r in enumerate(self.req_ids)}
        if ctx.plan is not None:
            v = e.take_plan()
            rows = [[self.sampled[i][-1]] + sched[self.req_ids[i]] for i in v.plan.batch_idx]
            target = torch.from_numpy(np.concatenate([model(r) for r in rows]))
            acc = e.accept(v, target, torch.zeros(len(target), dtype=torch.bool),
                           e.acceptance_rows(v))
            for i, toks, path in zip(v.plan.batch_idx, acc.emitted, acc.paths):
                assert len(toks) == len(path) + 1
                emitted[self.req_ids[i]] = toks
            self.last = (v, acc, ctx)
        for i, r in enumerate(self.req_ids):
            toks = emitted[r]
            self.tokens[i, self.num[i]:self.num[i] + len(toks)] = toks
            self.num[i] += len(toks)
            self.sampled[i] = toks
        return emitted


PROMPTS = {"a": [5, 9, 11, 2, 5, 9, 11, 2, 5], "b": [1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3]}


@pytest.mark.parametrize("caps", [{}, {"b": 2}, {"a": 1, "b": 3}])
def test_greedy_output_is_the_models_continuation(caps):
    run = Run(PROMPTS, caps=caps)
    steps = 12
    for _ in range(steps):
        run.step()
    for i, (r, p) in enumerate(PROMPTS.items()):
        n = int(run.num[i])
        assert run.tokens[i, len(p):n].tolist() == continuation(p[-1], n - len(p)), r
    assert run.proposes == steps               # one tree build per step, commits included
    assert run.num.sum() > 2 * (steps + 1) + 4  # lookahead accepted something


def test_partial_batch_commit_uses_the_proposed_trees():
    run = Run(PROMPTS, caps={"b": 2})
    for _ in range(4):
        run.step()
    v, acc, ctx = run.last
    assert v.plan.full == [True, False]        # a committed, b truncated and walked only
    assert run.proposes == 4
    counts = dict(ctx.window_counts)
    assert counts.keys() == {"a", "b"} and counts["b"] == 0   # b's two drafts are trie nodes
    assert run.engine.take_window_counts() == counts
    assert run.engine.take_window_counts() == {}


def test_select_trees_equals_proposing_the_subset():
    cfg = LadeConfig()
    state = LookaheadState(6, cfg.window_size, cfg.ngram_size, cfg.guess_set_size,
                           pool_from_prompt=True)
    g = torch.Generator().manual_seed(0)
    for s in range(5):
        state.start(s, torch.randint(0, 12, (40,), generator=g), seed=s, width=None)
    slots = torch.arange(5)
    last = torch.randint(0, 12, (5,), generator=g)
    for _ in range(3):   # fill windows and pools
        tree = state.propose(slots, last)
        res = state.commit(slots, tree, torch.randint(0, 12, (tree.total_nodes,), generator=g))
        last = res.emitted.gather(1, (res.num_emitted - 1)[:, None])[:, 0]
    tree = state.propose(slots, last)
    sel = torch.tensor([1, 3, 4])
    mine, theirs = select_trees(tree, sel), state.propose(slots[sel], last[sel])
    for name in ("tokens", "depth", "parent", "node_seq", "is_trie", "seq_start", "num_nodes",
                 "root_index", "window_levels", "window_width"):
        assert torch.equal(getattr(mine, name), getattr(theirs, name)), name
    target = torch.randint(0, 12, (mine.total_nodes,), generator=g)
    other = copy.deepcopy(state)
    a, b = state.commit(slots[sel], mine, target), other.commit(slots[sel], theirs, target)
    assert torch.equal(a.num_emitted, b.num_emitted)
    for x, y, n in zip(a.emitted, b.emitted, a.num_emitted):
        assert torch.equal(x[:n], y[:n])
    assert torch.equal(state.history, other.history)
    for part in ("windows", "pool"):
        for name, x in vars(getattr(state, part)).items():
            if isinstance(x, torch.Tensor):
                assert torch.equal(x, getattr(getattr(other, part), name)), (part, name)


def test_ineligible_and_capped_requests():
    infos = {"a": RequestInfo(False), "b": RequestInfo(True, guess_set_size=1, ngram_size=2,
                                                       min_p=0.25)}
    run = Run(PROMPTS, info=infos.__getitem__)
    for _ in range(3):
        run.step()
    v, acc, ctx = run.last
    assert [v.proposal.req_ids[k] for k in v.plan.prop_idx] == ["b"]
    assert run.engine.min_p(v) == [0.25]
    assert all(len(p) <= 1 for p in acc.paths)   # candidates of ngram_size - 1 = 1 token
    assert "a" not in run.engine.slot_of
    run.engine.release(["b"])
    assert run.engine.slot_of == {} and run.engine.requests == {"a": infos["a"]}


def test_the_engine_imports_no_vllm():
    import subprocess
    import sys
    code = ("import sys, lade_vllm.engine\n"
            "bad = [m for m in sys.modules if m == 'vllm' or m.startswith('vllm.')]\n"
            "assert not bad, bad\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_chain_steps_are_cut_to_the_policys_length_and_observed():
    """At CHAIN the candidate is cut to ``policy.chain_len`` drafts; each committed chain step
    feeds the policy's per-depth record with the chain's drafts and accepted drafts."""
    from lade_vllm import policy as pol_mod
    run = Run(PROMPTS, cfg=LadeConfig())
    pol = run.engine.policy
    pol.choose = lambda n, b, m=None: pol_mod.CHAIN   # every step a chain, cut to 2
    pol.chain_len = 2
    seen = []
    original = pol.observe_chain
    pol.observe_chain = lambda d, a, cap, c=None: (seen.append((d, a, cap)),
                                                   original(d, a, cap, c))
    for _ in range(10):
        run.step()
    assert seen and all(max(cap) == 2 and max(d) <= 2 and all(x <= y for x, y in zip(a, d))
                        for d, a, cap in seen)
    assert any(sum(a) for _, a, _ in seen)       # the stand-in model's cycles are accepted
    for i, (r, p) in enumerate(PROMPTS.items()):  # and the text is still the model's own
        n = int(run.num[i])
        assert run.tokens[i, len(p):n].tolist() == continuation(p[-1], n - len(p)), r
    assert sum(ch.steps for ch in pol.chains) >= len(seen)   # one record per match class


def test_requests_without_a_context_match_decode_plain_at_chain():
    """The engine finds the context matches before asking for a level and tells the policy how
    many requests have one; a CHAIN step whose request has none is an OFF step: nothing drafted,
    the chain record untouched (text that rarely repeats itself does not dilute it)."""
    from lade_vllm import policy as pol_mod
    run = Run({"a": [1, 2, 3, 4], "b": [5, 38, 9, 5]}, cfg=LadeConfig())   # + model(5) = 38
    pol = run.engine.policy
    asked, original = [], pol.choose
    pol.choose = lambda n, b, m=None: (asked.append((n, m)), original(n, b, m))[1]
    drafts = run.engine.propose(run.batch())
    assert asked == [(2, [0, 1, 0, 0])]       # "b" ends in 5, 38, seen before: a 2-token match
    pol.choose = lambda n, b, m=None: pol_mod.CHAIN
    drafts = run.engine.propose(run.batch())
    assert drafts[0] == [] and drafts[1]      # "a": no earlier occurrence of any suffix
    fresh = pol_mod.AdaptivePolicy(10, 10, 8)
    assert fresh.choose(1, 0, matched=0) == pol_mod.OFF      # CHAIN's warm-up slot, no match
    assert fresh.choose(1, 0, matched=0) == pol_mod.OFF
    assert fresh.chain.steps == 0 and fresh.history[pol_mod.CHAIN] == 0



def test_requests_without_a_match_draft_recycled_successors():
    """Given the vocabulary size, the engine keeps the latest target of every verified row per
    input token, engine-wide; a request without a context match drafts the chain of those
    successors (chain class RECYCLED), verified like any chain. "b" repeats itself, so it drafts
    context matches and fills the table; "a" never repeats within its context but runs through
    the same tokens, so it drafts recycled chains, which the stand-in model (next token = f(last))
    accepts. The text stays the model's continuation; without the vocabulary size nothing is
    recycled."""
    from lade_vllm import policy as pol_mod
    from lade_vllm.chains import RECYCLED
    prompts = {"a": [1, 2, 3, 9], "b": [18, 9, 26, 25, 18]}   # model: 9 26 25 18 9 ...
    run = Run(prompts, cfg=LadeConfig(), vocab_size=V)
    pol = run.engine.policy
    pol.choose = lambda n, b, m=None: pol_mod.CHAIN
    pol.chain_len = 3
    classes = []
    original = pol.observe_chain
    pol.observe_chain = lambda d, a, cap, c=None: (classes.extend(c or []), original(d, a, cap, c))
    run.step()                      # "a": nothing to draft yet; "b" drafts its context match
    before = int(run.num[0])
    emitted = run.step()            # "a" ends in 26, 25: no match, but "b" taught 25 -> 18 -> 9
    assert RECYCLED in classes and len(emitted["a"]) == 4, (classes, emitted)
    assert pol.chains[RECYCLED].steps >= 1
    for _ in range(4):
        run.step()
    for i, (r, p) in enumerate(prompts.items()):
        n = int(run.num[i])
        assert run.tokens[i, len(p):n].tolist() == continuation(p[-1], n - len(p)), r
    assert int(run.num[0]) - before >= 4 * 5
    plain = Run(prompts, cfg=LadeConfig())
    assert plain.engine.successors is None


def test_committed_tokens_are_recycled_after_plain_steps_too():
    """Every token committed, by a plain step too, is the model's target after the token before
    it: the table learns it at the next proposal (the prompt's own pairs are text, not
    predictions, and stay out)."""
    from lade_vllm import policy as pol_mod
    prompts = {"a": [1, 2, 3, 9]}
    run = Run(prompts, cfg=LadeConfig(), vocab_size=V)
    run.engine.policy.choose = lambda n, b, m=None: pol_mod.OFF
    for _ in range(3):
        run.step()
    run.engine.propose(run.batch())
    table = run.engine.successors.table.tolist()
    out = run.tokens[0, :int(run.num[0])].tolist()           # 1 2 3 9 | 26 25 18 9
    assert [table[x] for x in out[3:-1]] == out[4:], (out, table)
    assert table[1] == table[2] == -1 and table[3] == -1       # prompt pairs not recycled


def test_request_starts_are_not_charged_to_the_step_cost():
    """Starting a request's lookahead state (pool seeded from its prompt) is a cost per request,
    paid whatever the level: the step the policy observes excludes it, so the first step of a
    batch of new requests does not make its token count look dear."""
    import time
    run = Run({"a": [1, 2, 3, 9]}, cfg=LadeConfig())
    slow = run.engine.state.start
    run.engine.state.start = lambda *a, **k: (time.sleep(0.2), slow(*a, **k))[1]
    plan = run.engine.plan
    run.engine.plan = lambda *a, **k: (plan(*a, **k), time.sleep(0.3))[0]   # a 0.3 s "forward"
    seen = []
    run.engine.policy.observe_step = lambda tokens, seconds, **k: seen.append(seconds)
    run.step()                      # the request starts here (0.2 s), then its forward
    run.step()                      # ... and that step is observed here: 0.3 s, not 0.5
    assert seen and 0.3 <= seen[0] < 0.45, seen


def test_plain_steps_teach_the_chain_record_through_shadow_chains():
    """At OFF nothing is drafted, yet each request's chain candidate is checked against the
    tokens it commits next: the chain records learn what drafted chains would have delivered
    (the stand-in model's continuation is periodic, so its matches end up accepted whole), and
    the text is the model's own."""
    from lade_vllm import policy as pol_mod
    run = Run(PROMPTS, cfg=LadeConfig())
    pol = run.engine.policy
    pol.choose = lambda n, b, m=None: pol_mod.OFF
    seen = []
    original = pol.observe_shadow
    pol.observe_shadow = lambda d, a, c: (seen.append((d, a, c)), original(d, a, c))
    for _ in range(30):
        run.step()
    assert seen and all(0 <= x <= y for d, a, _ in seen for x, y in zip(a, d))
    late = [(x, y) for d, a, _ in seen[-4:] for x, y in zip(a, d)]
    assert late and all(x == y for x, y in late), seen
    assert sum(ch.steps for ch in pol.chains) >= len(seen) and pol.history[pol_mod.CHAIN] == 0
    for i, (r, p) in enumerate(PROMPTS.items()):
        n = int(run.num[i])
        assert run.tokens[i, len(p):n].tolist() == continuation(p[-1], n - len(p)), r


def test_a_tree_merges_every_chain_candidate():
    """A tree's suffix-match candidates are each request's chain candidate: its context match
    (a one-token match raised to the length a tree takes), else its recycled successors' chain;
    requests with neither keep none."""
    from lade_vllm.chain_step import chain_candidates
    from lade_vllm.engine import tree_suffix
    from lade_vllm.proposer.state import TREE_MIN_MATCH

    suffix = (torch.tensor([[5, 6, -1], [-1, -1, -1], [7, -1, -1], [-1, -1, -1]]),
              torch.tensor([3, 0, 1, 0]))
    recycled = np.array([[1, 1, 1], [9, 10, 11], [2, 2, 2], [-1, -1, -1]])
    cands, classes = chain_candidates(suffix, recycled)
    got, lengths = tree_suffix(suffix, cands, classes)
    assert got.tolist() == [[5, 6, -1], [9, 10, 11], [7, -1, -1], [-1, -1, -1]]
    assert lengths.tolist() == [3, TREE_MIN_MATCH, TREE_MIN_MATCH, 0]
