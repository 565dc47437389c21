"""The adaptive policy: how much lookahead tree each step can afford (no vLLM import).

Extra tree tokens are free only while a step's cost does not grow with its token count. On a
loaded server (many sequences in the batch) or a compute-bound CPU they are not, and a large tree
makes every sequence in the batch slower. So before each step the driver asks this policy for one
of four levels for the step's lookahead requests:

====== ============================================ =========================================
level  tree per request                             nodes per request (besides the root)
====== ============================================ =========================================
OFF    root only: plain decoding                    0
CHAIN  the best pool candidate only (window frozen) up to N-1, a chain
LOOKUP pool candidates only (window frozen)         up to G*(N-1), trie-merged
FULL   Jacobi window + pool candidates              up to (W-1) + W*(N-2) + G*(N-1)
====== ============================================ =========================================

A chain needs no tree mask: its attention is vLLM's own causal kernel, as for any draft model, so
its extra tokens are the cheapest. The policy picks the level with the highest expected throughput

    score(level) = R * tokens_per_step(level) / cost(base + R * (1 + nodes(level)))

where R is the number of lookahead requests, ``base`` the other requests' tokens, and

- ``cost(T)``: seconds of a step that feeds T tokens, learned online from the step times the driver
  measures (an exponential average per token-count bucket, interpolated between measured buckets;
  more tokens never cost less). Steps with tree attention (LOOKUP, FULL) and steps without it
  (OFF, CHAIN) have separate cost curves: a tree query attends to the whole prefix outside vLLM's
  kernel, so the same token count costs more. A bucket's first three samples keep their minimum
  (a load spike must not condemn a level from one slow step);
- ``tokens_per_step(level)`` and ``nodes(level)``: exponential averages of what that level
  delivered in past steps (priors below until measured; OFF is exactly 1 token and 0 nodes).

The first nine steps with lookahead requests cycle OFF, CHAIN and LOOKUP (three measurements each);
FULL is tried when the cost extrapolated from them (linear in tokens) leaves it a chance. Every ``explore_every`` steps the policy tries, instead of the best level, the least recently used
level whose predicted score is within ``explore_margin`` of the best, so its estimates follow
changes in load and text without paying for big trees where they cannot win. The margin relaxes
in proportion once a level has been unused for more than 4 * explore_every steps (down to a third
of it), so a level judged from slow steps gets re-measured after a while and a hopeless one never;
and a level whose step is predicted to cost more than twice the best level's is never explored
(``explore_margin`` 0 lifts both limits: any level, for tests). The choice never affects outputs, only speed.
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

OFF, CHAIN, LOOKUP, FULL = 0, 1, 2, 3
LEVELS = (OFF, CHAIN, LOOKUP, FULL)
LEVEL_NAMES = ("off", "chain", "lookup", "full")
TREE_LEVELS = (LOOKUP, FULL)  # levels whose steps use tree attention

#: Prior tokens/step until measured (conservative; MT-bench chat on SmolLM2 measured 1.3-1.7 FULL).
PRIOR_TOKENS = (1.0, 1.1, 1.15, 1.4)
ROBUST_SAMPLES = 3  # a cost bucket's first samples keep their minimum
WARMUP_ROUNDS = 3   # the first steps cycle OFF, CHAIN, LOOKUP this many times
EXPLORE_COST = 2.0  # exploration never picks a step predicted dearer than this x the best's


@dataclass
class _Ema:
    value: float
    weight: float = 0.0  # 0 = prior only

    def add(self, x: float, alpha: float) -> None:
        a = max(alpha, 1.0 / (1.0 + self.weight))  # plain mean for the first samples
        self.value += a * (x - self.value)
        self.weight += 1.0


class StepCostModel:
    """cost(T) in seconds from observed (tokens, seconds) pairs, bucketed on a geometric grid."""

    RATIO = 1.25

    def __init__(self, alpha: float = 0.1):
        self.alpha = alpha
        self.buckets: dict[int, _Ema] = {}

    def _bucket(self, tokens: int) -> int:
        return int(round(math.log(max(tokens, 1)) / math.log(self.RATIO)))

    def observe(self, tokens: int, seconds: float) -> None:
        if tokens <= 0 or not seconds > 0:
            return
        b = self._bucket(tokens)
        ema = self.buckets.get(b)
        if ema is None:
            self.buckets[b] = _Ema(seconds, 1.0)
        elif ema.weight < ROBUST_SAMPLES:
            ema.value = min(ema.value, seconds)
            ema.weight += 1.0
        else:
            ema.add(seconds, self.alpha)

    def known(self) -> bool:
        return bool(self.buckets)

    def __call__(self, tokens: int) -> float:
        """Estimated seconds for a step of ``tokens`` tokens (monotone in tokens)."""
        if not self.buckets:
            return float(max(tokens, 1))
        keys = sorted(self.buckets)
        # monotone envelope: a bucket never costs less than a smaller one
        vals, run = [], 0.0
        for k in keys:
            run = max(run, self.buckets[k].value)
            vals.append(run)
        x = math.log(max(tokens, 1)) / math.log(self.RATIO)
        if x <= keys[0]:
            return vals[0]
        if x >= keys[-1]:
            # beyond what was measured: linear in tokens through the last two buckets (flat with
            # a single bucket, so that a bigger tree gets measured rather than assumed costly)
            if len(keys) < 2:
                return vals[-1]
            t0, t1 = self.RATIO ** keys[-2], self.RATIO ** keys[-1]
            slope = max(vals[-1] - vals[-2], 0.0) / (t1 - t0)
            return vals[-1] + slope * (max(tokens, 1) - t1)
        i = bisect.bisect_right(keys, x)
        k0, k1 = keys[i - 1], keys[i]
        f = (x - k0) / (k1 - k0)
        return vals[i - 1] + f * (vals[i] - vals[i - 1])


class AdaptivePolicy:
    """Chooses OFF / CHAIN / LOOKUP / FULL per step; see the module docstring."""

    def __init__(self, full_nodes: int, lookup_nodes: int, chain_nodes: int | None = None,
                 enabled: bool = True, explore_every: int = 16, alpha: float = 0.1,
                 explore_margin: float = 0.6, tokens_alpha: float = 0.25):
        self.enabled = enabled
        self.tokens_alpha = tokens_alpha  # what a level delivers follows the text quickly
        self.explore_margin = explore_margin
        self.explore_every = max(int(explore_every), 2)
        self.alpha = alpha
        self.cost_plain = StepCostModel(alpha)   # OFF and CHAIN steps: vLLM's causal kernel
        self.cost_tree = StepCostModel(alpha)    # LOOKUP and FULL steps: tree attention
        self.tokens = [_Ema(PRIOR_TOKENS[lv]) for lv in LEVELS]
        self.tokens[OFF].weight = math.inf  # exactly one token per step
        chain = lookup_nodes if chain_nodes is None else chain_nodes
        self.nodes = [_Ema(0.0, math.inf), _Ema(float(chain)), _Ema(float(lookup_nodes)),
                      _Ema(float(full_nodes))]
        self.last_used = [0] * len(LEVELS)
        self.steps = 0
        self.history = [0] * len(LEVELS)  # steps per level (for reports and tests)

    def cost(self, level: int, tokens: int) -> float:
        if level in TREE_LEVELS:
            # before any tree step was timed, assume the plain curve (so the tree gets measured)
            model = self.cost_tree if self.cost_tree.known() else self.cost_plain
            return max(model(tokens), self.cost_plain(tokens))
        return self.cost_plain(tokens)

    def _step_cost(self, level: int, num_reqs: int, base_tokens: int) -> float:
        tokens = base_tokens + num_reqs * (1.0 + self.nodes[level].value)
        return self.cost(level, int(round(tokens)))

    def score(self, level: int, num_reqs: int, base_tokens: int) -> float:
        return num_reqs * self.tokens[level].value / self._step_cost(level, num_reqs, base_tokens)

    def choose(self, num_reqs: int, base_tokens: int) -> int:
        """Level for a step with ``num_reqs`` lookahead requests and ``base_tokens`` other tokens."""
        self.steps += 1
        if not self.enabled:
            level = FULL
        elif num_reqs <= 0:
            return OFF
        elif self.steps <= WARMUP_ROUNDS * 3:
            # measure the cheap levels first, a few times each: a step whose token count is new
            # to the engine can be slow once (kernel set-up), and a bucket keeps its minimum
            level = (OFF, CHAIN, LOOKUP)[(self.steps - 1) % 3]
        else:
            scores = [self.score(lv, num_reqs, base_tokens) for lv in LEVELS]
            level = max(LEVELS, key=lambda lv: (scores[lv], lv))
            if self.steps % self.explore_every == 0:
                # re-measure the level seen least recently among the others that might be
                # competitive; a level predicted far worse (a big tree on a loaded batch) is not
                # worth a slow step to confirm
                # (the margin relaxes as a level stays unused: a level judged from a slow
                # step gets another chance after a while, a hopeless one only rarely)
                # nor one whose step would cost more than EXPLORE_COST x the best level's: an
                # exploration step must stay cheap (a tree at batch 32 costs ~10 plain steps)
                cost = [self._step_cost(lv, num_reqs, base_tokens) for lv in LEVELS]
                others = [lv for lv in LEVELS if lv != level
                          and scores[lv] >= self._margin(lv) * scores[level]
                          and (self.explore_margin == 0 or cost[lv] <= EXPLORE_COST * cost[level])]
                if others:
                    level = min(others, key=lambda lv: self.last_used[lv])
        self.last_used[level] = self.steps
        self.history[level] += 1
        return level

    def _margin(self, level: int) -> float:
        age = self.steps - self.last_used[level]
        # never below a third of the margin: a level predicted that far behind stays unexplored
        # (one full-tree step at batch 32 costs as much as ~20 plain steps)
        return self.explore_margin * max(min(1.0, 4.0 * self.explore_every / max(age, 1)), 1 / 3)

    def observe_step(self, tokens: int, seconds: float, tree: bool = False) -> None:
        """A step that fed ``tokens`` tokens took ``seconds`` (model forward to next proposal);
        ``tree``: some of its requests used tree attention."""
        (self.cost_tree if tree else self.cost_plain).observe(tokens, seconds)

    def observe_level(self, level: int, tokens_per_req: float, nodes_per_req: float) -> None:
        """What ``level`` delivered this step: mean emitted tokens and tree nodes per request."""
        if level == OFF:
            return
        self.tokens[level].add(tokens_per_req, self.tokens_alpha)
        self.nodes[level].add(nodes_per_req, self.tokens_alpha)
