"""The chain record of the adaptive policy: per context-match length, per chain depth (no vLLM
import).

A CHAIN step drafts each request's context match (lade_vllm.proposer.suffix). How far a match's
continuation is accepted depends on how long the match was: a one-token match is a weak guess, a
match of 3+ tokens is usually copied text. So chains are recorded per match class (matched on 1,
2, or 3 or more tokens), each class with its own :class:`ChainDepths` and its own chain length. A
request without a context match may draft the chain of recycled successors instead
(lade_vllm.proposer.recycle): a fourth class, ``RECYCLED``, with its own record and length.

How the policy (lade_vllm.policy.AdaptivePolicy) uses the records.
The chain's length. A chain truncated to L drafts delivers, per request, 1 + sum over d <= L of
h_1 * ... * h_d tokens, where h_d is the chance that a chain whose first d-1 drafts were accepted
has a d-th draft and it is accepted: so one record of chain steps predicts every shorter chain.
:class:`ChainDepths` keeps, per depth, decayed counts of chains that reached it and of those
accepted there, and of chains long enough to have a draft there (for nodes(L)); a step truncated
to L observes depths up to L only (a chain accepted to its cap says nothing deeper), and only the
depths it observes decay, so a depth not run lately keeps its estimate. There is one record per
match class (lade_vllm.chains: the context match was 1, 2, or 3+ tokens long), each with its own
length L_c, and a record holds chains of requests with a context match only: the driver finds the
matches before asking for a level and passes their number M_c per class; the other requests of a
CHAIN step decode plainly in it, and a step with no match is an OFF step (so text that rarely
repeats itself costs the chain nothing and does not dilute its record). CHAIN is scored as
(R + sum_c M_c * (tokens_c(L_c) - 1)) / cost(base + R + sum_c M_c * nodes_c(L_c)) on the chain
steps' cost curve; each class present in the step takes the L_c that maximises that score (the others at
theirs; L_c = 0: the class's requests decode plainly, e.g. weak one-token matches at batch 32 on a
CPU), changed only for a predicted gain above ``CHAIN_SWITCH`` (lade_vllm.chain_policy); every ``CHAIN_PROBE_EVERY``-th
chain step runs each present class one cost bucket longer, the next one shorter, so the
neighbouring depths and step costs stay measured at a bounded cost. ``cut`` holds the lengths
this step's chains are cut to (``best``, or a probe's).
"""
from __future__ import annotations

MATCH_CLASSES = 3     # chain records per context match length: 1, 2, 3 or more tokens
TOP_MATCH = MATCH_CLASSES - 1   # matches of 3+ tokens (the only class when none is given)
RECYCLED = MATCH_CLASSES        # no context match: the chain of recycled successors
CHAIN_CLASSES = MATCH_CLASSES + 1
CHAIN_DECAY = 1 / 256  # a chain depth's counts decay by this per step observing that depth
CHAIN_PRIOR = 0.5     # acceptance assumed at a depth never observed (weight of one chain)


def match_class(match_len: int) -> int:
    """The chain record of a match on ``match_len`` tokens (the top class for longer ones)."""
    return min(max(int(match_len), 1), MATCH_CLASSES) - 1


class ChainDepths:
    """Per chain depth d = 1..K, decayed counts: chains that reached d (every earlier draft
    accepted), of those the ones whose d-th draft exists and was accepted, chains cut at d or
    deeper, and of those the ones with a d-th draft. See lade_vllm.policy's docstring."""

    def __init__(self, max_len: int):
        self.max_len = max(int(max_len), 1)
        k = self.max_len + 1                  # index 0 unused
        self.reached, self.accepted = [0.0] * k, [0.0] * k
        self.cut, self.drafted = [0.0] * k, [0.0] * k
        self.steps = 0

    def observe(self, drafted: list[int], accepted: list[int], cap: int) -> None:
        """One step's chains: per request its drafts and accepted drafts; ``cap``: the length
        the chains were cut to."""
        top = min(int(cap), self.max_len)
        if top <= 0 or not drafted:
            return
        self.steps += 1
        keep = 1.0 - CHAIN_DECAY
        for arr in (self.reached, self.accepted, self.cut, self.drafted):
            for d in range(1, top + 1):
                arr[d] *= keep
        for m, a in zip(drafted, accepted):
            m, a = min(int(m), top), min(int(a), top)
            for d in range(1, top + 1):
                self.cut[d] += 1.0
                self.drafted[d] += d <= m
            for d in range(1, a + 1):
                self.reached[d] += 1.0
                self.accepted[d] += 1.0
            if a < top:                       # stopped by a rejection or the chain's end
                self.reached[a + 1] += 1.0

    def tokens(self, length: int) -> float:
        """Expected tokens per request of a chain cut to ``length``."""
        total, p = 1.0, 1.0
        for d in range(1, min(length, self.max_len) + 1):
            p *= (self.accepted[d] + CHAIN_PRIOR) / (self.reached[d] + 1.0)
            total += p
        return total

    def nodes(self, length: int) -> float:
        """Expected drafts per request of a chain cut to ``length``."""
        return sum((self.drafted[d] + 1.0) / (self.cut[d] + 1.0)
                   for d in range(1, min(length, self.max_len) + 1))

    def table(self) -> tuple[list[float], list[float]]:
        """``tokens(L)`` and ``nodes(L)`` for every L = 0..max_len, in one pass."""
        tokens, nodes = [1.0], [0.0]
        p = 1.0
        for d in range(1, self.max_len + 1):
            p *= (self.accepted[d] + CHAIN_PRIOR) / (self.reached[d] + 1.0)
            tokens.append(tokens[-1] + p)
            nodes.append(nodes[-1] + (self.drafted[d] + 1.0) / (self.cut[d] + 1.0))
        return tokens, nodes


def group_by_class(values: list, classes: list[int] | None) -> dict[int, list]:
    """``values`` per request, grouped by the requests' match classes (None: all the top one)."""
    if classes is None:
        return {TOP_MATCH: list(values)} if values else {}
    out: dict[int, list] = {}
    for v, c in zip(values, classes):
        out.setdefault(int(c), []).append(v)
    return out
