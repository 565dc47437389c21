"""The adaptive policy's chain part (no vLLM import): what a CHAIN step is expected to deliver per
chain class, the chain length chosen per class, the warm-up's affordable cut, and what chain
steps and shadow chains teach the records (lade_vllm.chains). Mixed into
lade_vllm.policy.AdaptivePolicy, whose state it reads: ``chains``, ``best``, ``matched``,
``tokens`` and ``nodes``, the cost curves through ``cost`` / ``_cost_se``."""
from __future__ import annotations

import math

from lade_vllm.chains import group_by_class
from lade_vllm.level_stats import CHAIN, OFF, _Estimate

CHAIN_SWITCH = 0.01   # the chain length changes for a predicted gain above this


class ChainLengths:
    """CHAIN's estimate and each chain class's length; see lade_vllm.policy's docstring."""

    def _per_chain(self, c: int, length: int) -> tuple[float, float]:
        """Expected tokens and drafts of one class-``c`` chain cut to ``length``."""
        depths = self.chains[c]
        if depths.steps:
            return depths.tokens(length), depths.nodes(length)
        # no chain of the class observed yet (or ChainDepths not fed): the level's means
        return self.tokens[CHAIN].value, min(self.nodes[CHAIN].value, float(length))

    def _chain_estimate(self, lengths: list[int], num_reqs: int, base_tokens: int) -> _Estimate:
        """CHAIN with class-c chains cut to ``lengths[c]``: the ``matched`` requests draft, the
        rest decode plainly in the same step."""
        extra, drafts = 0.0, 0.0
        for c, m in enumerate(self.matched):
            if m:
                t, n = self._per_chain(c, lengths[c])
                extra += m * (t - 1.0)
                drafts += m * n
        tokens = base_tokens + num_reqs + drafts
        cost = self.cost(CHAIN if drafts else OFF, tokens)   # no drafts: a plain step
        se = math.hypot(self._cost_se(CHAIN, tokens), self.tokens[CHAIN].se) if drafts else 0.0
        return _Estimate((num_reqs + extra) / cost, cost, se)

    def _probe_len(self, c: int, up: bool, num_reqs: int, base_tokens: int) -> int:
        """Class c's chain length next to its best (longer or shorter) whose step lands in
        another cost bucket than the best's, so that its cost gets measured too."""
        def bucket(n: int) -> int:
            lengths = self.best[:c] + [n] + self.best[c + 1:]
            drafts = sum(m * self._per_chain(k, lengths[k])[1]
                         for k, m in enumerate(self.matched) if m)
            return self.cost_chain._bucket(base_tokens + num_reqs + drafts)
        here, n, step = bucket(self.best[c]), self.best[c], 1 if up else -1
        while 1 <= n + step <= self.chains[c].max_len:
            n += step
            if bucket(n) != here:
                break
        return n

    def _pick_chain(self, num_reqs: int, base_tokens: int) -> None:
        """Per class with matches this step: the chain length of the highest predicted
        throughput (the other classes at theirs), kept unless another beats it by more than
        CHAIN_SWITCH. Scores as ``_chain_estimate``, from each class's table of every length."""
        for c, m in enumerate(self.matched):
            if not m or not self.chains[c].steps:
                continue
            extra = drafts = 0.0   # the other classes at their lengths
            for k, mk in enumerate(self.matched):
                if mk and k != c:
                    t, n = self._per_chain(k, self.best[k])
                    extra, drafts = extra + mk * (t - 1.0), drafts + mk * n
            tokens, nodes = self.chains[c].table()
            scores = []
            for t, n in zip(tokens, nodes):   # length 0: the class decodes plain
                d = drafts + m * n
                cost = self.cost(CHAIN if d else OFF, base_tokens + num_reqs + d)
                scores.append((num_reqs + extra + m * (t - 1.0)) / cost)
            best = max(range(len(scores)), key=lambda n: (scores[n], -n))
            if scores[best] > scores[self.best[c]] * (1.0 + CHAIN_SWITCH):
                self.best[c] = best

    def _affordable_cut(self, num_reqs: int, base_tokens: int, limit: float,
                        shortest: int = 1) -> list[int]:
        """The warm-up's chain lengths: the best ones, shortened alike (not below ``shortest``)
        until the step is predicted to cost at most ``limit`` x a plain one (at batch 32 on a CPU,
        eight drafts per request would cost as much as five plain steps; at batch 1 nothing is
        cut)."""
        matched = sum(self.matched)
        plain = self.cost(OFF, base_tokens + num_reqs)
        n = max(self.best)
        while n > shortest and self.cost(CHAIN, base_tokens + num_reqs + matched * n) \
                > limit * plain:
            n -= 1
        return [min(b, n) for b in self.best]

    def observe_chain(self, drafted: list[int], accepted: list[int], cap,
                      classes: list[int] | None = None) -> None:
        """A CHAIN step's chains: per request its drafts, accepted drafts, the length it was cut
        to (``cap``: per request, or one int for all) and its match class (None: the top one)."""
        self._record_chains(drafted, accepted, cap, classes)

    def observe_shadow(self, drafted: list[int], accepted: list[int], classes: list[int]) -> None:
        """Chains proposed but not drafted, checked against the tokens committed after them
        (lade_vllm.chain_step.ShadowChains): the chain records learn as from drafted chains, and
        CHAIN's tokens per request as if each had been cut to its class's best length."""
        self._record_chains(drafted, accepted, self.chains[0].max_len, classes)
        best = [self.best[c] for c in classes]
        n = len(drafted)
        self.observe_level(CHAIN, 1.0 + sum(map(min, accepted, best)) / n,
                           sum(map(min, drafted, best)) / n)

    def _record_chains(self, drafted, accepted, cap, classes) -> None:
        caps = list(cap) if isinstance(cap, (list, tuple)) else [int(cap)] * len(drafted)
        rows = group_by_class(list(zip(drafted, accepted, caps)), classes)
        for c, chains in rows.items():
            d, a, k = zip(*chains)
            self.chains[c].observe(list(d), list(a), max(k))
