"""The adaptive policy: how much lookahead tree each step can afford (no vLLM import).

Extra tree tokens are free only while a step's cost does not grow with its token count. On a
loaded server (many sequences in the batch) or a compute-bound CPU they are not, and a large tree
makes every sequence in the batch slower. So before each step the driver asks this policy for one
of four levels for the step's lookahead requests:

====== ============================================ =========================================
level  tree per request                             nodes per request (besides the root)
====== ============================================ =========================================
OFF    root only: plain decoding                    0
CHAIN  the context suffix match (window frozen),     up to K, a chain (0 without a match;
       cut to a length chosen from its acceptance   the pool's one with suffix_tokens=0)
LOOKUP pool candidates only (window frozen)         up to G*(N-1), trie-merged
FULL   Jacobi window + pool candidates              up to (W-1) + W*(N-2) + G*(N-1)
====== ============================================ =========================================

A chain needs no tree mask: its attention is vLLM's own causal kernel, as for any draft model, so
its extra tokens are the cheapest. The policy estimates each level's throughput

    score(level) = R * tokens_per_step(level) / cost(base + R * (1 + nodes(level)))

where R is the number of lookahead requests, ``base`` the other requests' tokens, and

- ``cost(T)``: seconds of a step that feeds T tokens. Each token-count bucket (a geometric grid)
  keeps recent step times; its estimate is a robust mean: in log seconds, the mean of the samples
  within 3 robust standard deviations (1.4826 * MAD) of their median, so load spikes are dropped
  and one lucky or slow step moves the estimate by about 1/n. Buckets out of order (a bigger one
  estimated cheaper) are pooled into their sample-weighted mean (isotonic regression), so more
  tokens never cost less and a bucket of few samples bends the curve little. Between buckets the
  curve is interpolated linearly in tokens; beyond them it is extrapolated linearly from the largest bucket at most
  half the last one's size, with the rise less one standard error (a rise within the noise
  extrapolates flat: a bigger tree gets measured rather than condemned by noise). Three kinds of
  step have separate curves: plain steps (OFF: no drafts), chain steps (drafts through vLLM's
  causal kernel) and tree steps (LOOKUP, FULL: tree attention outside vLLM's kernel). A step with
  drafts costs more than a plain step of the same token count (rejection sampling, the draft
  bookkeeping; at batch 32 with a few drafts in the batch ~6%), which one shared curve would hide
  whenever both fall in one bucket. Outside the range a chain or tree curve has measured (and
  above it until it spans 2x in tokens) it follows the plain curve's shape: its cost at the
  nearest measured end times plain(T) / plain(end). Either is floored at plain(T) less
  ``FLOOR_K`` of its standard error: a draft row costs what a prefill row does and its LM-head
  row besides, and OFF, seldom run once a speculative level is exploited, keeps the estimate
  of its few samples while the exploited curve converges; untied, a stale high OFF estimate
  would let a losing level look cheaper than plain decoding;
- ``tokens_per_step(level)`` and ``nodes(level)``: the mean of the level's recent observations
  (values bounded by the tree size, so a mean is safe and, unlike a median, unbiased for
  integer-valued steps); priors below until measured; OFF is exactly 1 token and 0 nodes.

"Recent" is the same for every estimate: samples older than ``HORIZON`` steps are dropped
(beyond each bucket's or level's newest ``MIN_KEEP``), everywhere every ``TRIM_EVERY`` steps, so
the exploited level (sampled every step) and a level explored now and then are compared over the
same span of time, not a drifting machine's fast minute against its slow one. Estimates are
redone after every max(1, n/16) new samples. Each carries its relative standard error: robust
sigma / sqrt(n) for a cost bucket (at least ``PRIOR_SIGMA`` / sqrt(n) while n < 8, a little more
between buckets, ``UNMEASURED_SE`` outside them), standard deviation / sqrt(n) / mean for
tokens; a level's error combines its cost's and its tokens'.

Choosing. The first nine steps with lookahead requests cycle OFF, CHAIN and LOOKUP (three samples
each; OFF instead of a LOOKUP step predicted dearer than ``EXPLORE_COST`` x an OFF step, e.g. at
batch 32 on a CPU, from a cost curve that the prefill steps have already spanned; the warm-up's
chains shortened alike until their step is predicted within ``EXPLORE_COST`` x an OFF step);
then the best-scoring level becomes the exploited level. It changes only to a level whose
score beats it by more than max(``SWITCH_FLOOR``, ``SWITCH_K`` * the combined standard error of
both scores): a difference within the measured noise does not flip it. Back to OFF, which
cannot lose to plain decoding, it changes for any gain above ``SWITCH_FLOOR``: the standard
errors are largest early in a run, and a lucky first estimate must not lock a losing level in.

Shadow chains. A chain's acceptance needs no chain step: the driver checks each step's chain
candidates that were not drafted (plain steps, classes cut to 0, tree steps) against the tokens
the request commits next (lade_vllm.chain_step.ShadowChains) and reports them through
``observe_shadow``, which feeds the same per-class depth records as drafted chains, and CHAIN's
tokens per request as if each chain had been cut to its class's best length. With them
(``shadow=True``) the warm-up's chains are cut until their step is predicted within
``WARMUP_SHADOW_COST`` x an OFF step, down to none (an OFF step): at batch 32 on a CPU the
warm-up then costs nothing, and CHAIN is run when its shadow-measured acceptance predicts a gain.

Exploring. Every ``explore_every`` steps the policy may run another level instead, to keep its
estimates current. Candidates are levels whose optimistic score, score * (1 + ``SWITCH_K`` *
error), is at least ``explore_margin`` of the exploited level's score (a margin relaxed down to a
third for a level unused for more than 4 * explore_every steps), whose optimistic step cost is at
most ``EXPLORE_COST`` x the exploited level's (a tree level's at its largest recent trees, its full
tree until ``TREE_BOUND_AFTER`` steps were observed; the warm-up's LOOKUP check alike), and whose expected loss, step cost * (1 - score /
exploited score), the budget can pay. The budget earns ``EXPLORE_BUDGET`` of each observed step's
typical time (its bucket's estimate: a spike earns nothing extra) and holds at most
``BUDGET_STEPS`` exploited steps' worth, so exploration loses at most that fraction of the time
in expectation; a level predicted better costs nothing. An exploration step is charged its
predicted loss when chosen and settled once timed: the budget then pays what it actually lost
(the step's typical time less the time the exploited level would have needed for the tokens it
delivered), so a level whose cost curve is optimistic (few steps of it timed, as chains at batch
32 on a CPU) is explored less, not more. The candidate explored is the one with
the highest optimistic score while that beats the exploited score, and every fourth time the
least recently used one, so no level's estimate is forgotten (CHAIN excepted with shadow chains:
its acceptance is measured on every step anyway); with no such candidate the step exploits. ``explore_margin`` 0 lifts the margin, the cost cap and the budget: every
``explore_every`` steps the least recently used other level runs (for tests). The choice never
affects outputs, only speed.

The chain's length: see lade_vllm.chains (one record and one length per chain class;
``cut`` holds the lengths this step's chains are cut to).

Memory is bounded: at most ``MAX_BUCKETS`` buckets per cost curve (the least recently fed is
dropped), at most ``COST_WINDOW`` samples per bucket and ``LEVEL_WINDOW`` per level, and in all
about one sample per step of the last ``HORIZON`` plus ``MIN_KEEP`` per bucket.
"""
from __future__ import annotations

import json
import math
import os

from lade_vllm.chains import (CHAIN_CLASSES, CHAIN_DECAY, CHAIN_PRIOR, TOP_MATCH,  # noqa: F401
                               ChainDepths, group_by_class, match_class)
from lade_vllm.step_cost import (COST_WINDOW, HORIZON, MAX_BUCKETS, MIN_KEEP,  # noqa: F401
                                 PRIOR_SIGMA, TRIM_EVERY, UNMEASURED_SE, StepCostModel)
from lade_vllm.level_stats import LEVEL_WINDOW, _Estimate, _LevelMean  # noqa: F401
from lade_vllm.level_stats import CHAIN, FULL, LOOKUP, OFF
from lade_vllm.chain_policy import CHAIN_SWITCH, ChainLengths  # noqa: F401
from lade_vllm.explore_policy import (BUDGET_STEPS, EXPLORE_BUDGET, EXPLORE_COST,  # noqa: F401
                                      SWITCH_K, TREE_BOUND_AFTER, Exploration)
LEVELS = (OFF, CHAIN, LOOKUP, FULL)
LEVEL_NAMES = ("off", "chain", "lookup", "full")
TREE_LEVELS = (LOOKUP, FULL)  # levels whose steps use tree attention

#: Prior tokens/step until measured (conservative; MT-bench chat on SmolLM2 measured 1.3-1.7 FULL;
#: CHAIN's is per request with a context match, HumanEval measured 1.5-2.9).
PRIOR_TOKENS = (1.0, 1.5, 1.15, 1.4)
WARMUP_ROUNDS = 3     # the first steps cycle OFF, CHAIN, LOOKUP this many times
SWITCH_FLOOR = 0.03   # the exploited level changes only for a gain above this...
WARMUP_SHADOW_COST = 1.25  # with shadow chains the warm-up's chains cost at most this x plain
FLOOR_K = 0.5         # a step with drafts costs at least a plain one of as many tokens, less
                      # this many standard errors of the plain estimate
CHAIN_PROBE_EVERY = 16  # every this many chain steps the chains run one draft longer or shorter


def forced_level(environ=None) -> int | None:
    """LADE_FORCE_LEVEL=off|chain|lookup|full: every step at that level, whatever the policy
    would choose (benchmarks: a level's own cost and tokens/step; "off": the plugin's cost on
    plain steps). Read when an engine is built."""
    name = (os.environ if environ is None else environ).get("LADE_FORCE_LEVEL") or None
    if name is None:
        return None
    if name not in LEVEL_NAMES:
        raise ValueError(f"LADE_FORCE_LEVEL={name!r}: expected one of {LEVEL_NAMES}")
    return LEVEL_NAMES.index(name)


def decision_log(environ=None):
    """LADE_POLICY_LOG=path: one JSON line per decision appended to ``path`` (step, level, the
    exploited level, requests, other tokens, matches per chain class, chain cut, each level's
    score / cost / error), for diagnosing a benchmark's choices. Read when an engine is built."""
    path = (os.environ if environ is None else environ).get("LADE_POLICY_LOG") or None
    return open(path, "a", buffering=1) if path else None


class AdaptivePolicy(ChainLengths, Exploration):
    """Chooses OFF / CHAIN / LOOKUP / FULL per step; see the module docstring."""

    def __init__(self, full_nodes: int, lookup_nodes: int, chain_nodes: int | None = None,
                 enabled: bool = True, explore_every: int = 16, explore_margin: float = 0.6,
                 shadow: bool = False, forced: int | None = None, log=None):
        self.enabled = enabled
        self.log = log         # a text file: one JSON line per decision (LADE_POLICY_LOG)
        self.forced = forced   # every step at this level (benchmarks: LADE_FORCE_LEVEL)
        self.shadow = shadow   # the driver reports undrafted chains (observe_shadow)
        self.explore_margin = explore_margin
        self.explore_every = max(int(explore_every), 2)
        self.cost_plain = StepCostModel()   # OFF steps: no drafts
        self.cost_chain = StepCostModel()   # CHAIN steps: drafts through vLLM's causal kernel
        self.cost_tree = StepCostModel()    # LOOKUP and FULL steps: tree attention
        self.tokens = [_LevelMean(PRIOR_TOKENS[lv], fixed=lv == OFF) for lv in LEVELS]
        chain = lookup_nodes if chain_nodes is None else chain_nodes
        self.nodes = [_LevelMean(0.0, fixed=True), _LevelMean(float(chain)),
                      _LevelMean(float(lookup_nodes)), _LevelMean(float(full_nodes))]
        self.node_cap = [0.0, float(chain), float(lookup_nodes), float(full_nodes)]
        self.exploit: int | None = None     # the level run when not exploring
        self.budget = 0.0                   # seconds exploration may still lose
        self.explorations = 0               # exploration steps due so far
        self.last_used = [0] * len(LEVELS)
        self.steps = 0
        self.history = [0] * len(LEVELS)  # steps per level (for reports and tests)
        # the exploration step in flight: (step, level, seconds charged, exploited score,
        # requests), settled against its measured time by observe_step; what the last drafted
        # step delivered: (step, level, tokens beyond one per request)
        self.explored: tuple | None = None
        self.delivered: tuple = (0, OFF, 0.0)
        # per match class (lade_vllm.chains): the record, the length CHAIN is scored at, and
        # the length this step's chains are cut to
        self.chains = [ChainDepths(int(chain)) for _ in range(CHAIN_CLASSES)]
        self.best = [self.chains[0].max_len] * CHAIN_CLASSES
        self.cut = list(self.best)
        self.chain_steps = 0
        self.matched = [0] * CHAIN_CLASSES    # this step's requests with a chain candidate

    # the top class (matches of 3+ tokens), the only one when the driver gives no classes
    @property
    def chain(self) -> ChainDepths:
        return self.chains[TOP_MATCH]

    @property
    def best_chain(self) -> int:
        return self.best[TOP_MATCH]

    @property
    def chain_len(self) -> int:
        return self.cut[TOP_MATCH]

    @chain_len.setter
    def chain_len(self, length: int) -> None:   # every class's chains cut to ``length``
        self.cut = [int(length)] * CHAIN_CLASSES

    def _model(self, level: int) -> StepCostModel:
        if level in TREE_LEVELS:
            return self.cost_tree
        return self.cost_chain if level == CHAIN else self.cost_plain

    def cost(self, level: int, tokens: float) -> float:
        """Estimated seconds of a step of ``tokens`` tokens at ``level``: never below a plain
        step of as many tokens, less FLOOR_K of its standard error (see the module docstring)."""
        plain, model = self.cost_plain, self._model(level)
        if model is plain or not model.known():
            return plain(tokens)   # before any such step was timed: the plain curve
        if not plain.known():
            return model(tokens)
        lo, hi = model.bottom(), model.top()
        if tokens > hi and not model.spans():
            end = hi
        elif tokens < lo:
            end = lo
        else:
            return max(model(tokens), self._plain_floor(tokens))
        # outside the measured range: as the plain curve grows from the nearest measured end
        return max(model(end) * plain(tokens) / plain(end), self._plain_floor(tokens))

    def _plain_floor(self, tokens: float) -> float:
        return self.cost_plain(tokens) * (1.0 - min(0.5, FLOOR_K * self.cost_plain.se(tokens)))

    def _cost_se(self, level: int, tokens: float) -> float:
        return self._model(level).se(tokens)

    def estimate(self, level: int, num_reqs: int, base_tokens: int) -> _Estimate:
        if level == CHAIN:
            return self._chain_estimate(self.best, num_reqs, base_tokens)
        tokens = base_tokens + num_reqs * (1.0 + self.nodes[level].value)
        cost = self.cost(level, tokens)
        se = math.hypot(self._cost_se(level, tokens), self.tokens[level].se)
        return _Estimate(num_reqs * self.tokens[level].value / cost, cost, se)

    def score(self, level: int, num_reqs: int, base_tokens: int) -> float:
        return self.estimate(level, num_reqs, base_tokens).score

    def choose(self, num_reqs: int, base_tokens: int, matched=None) -> int:
        """Level for a step with ``num_reqs`` lookahead requests and ``base_tokens`` other tokens;
        ``matched``: per chain class (lade_vllm.chains) how many of the requests have a chain
        candidate, the only ones that draft at CHAIN (an int: that many, all in the top match
        class; None: every request; a shorter list: the later classes have none). CHAIN with
        nothing to draft is returned as OFF (the same step)."""
        self.steps += 1
        if matched is None or isinstance(matched, int):
            top = num_reqs if matched is None else max(0, min(int(matched), num_reqs))
            matched = [0] * TOP_MATCH + [top]
        self.matched = [int(m) for m in matched] + [0] * (CHAIN_CLASSES - len(matched))
        warming = self.steps <= WARMUP_ROUNDS * 3   # the first steps cycle OFF, CHAIN, LOOKUP
        if not self.enabled:
            level = FULL
        elif num_reqs <= 0:
            return OFF
        elif warming:
            # measure the cheap levels first, a few times each: a step whose token count is new
            # to the engine can be slow once (kernel set-up), which the robust mean drops
            level = (OFF, CHAIN, LOOKUP)[(self.steps - 1) % 3]
            if level == LOOKUP and self._tree_cost_bound(LOOKUP, num_reqs, base_tokens) \
                    > EXPLORE_COST * self.cost(OFF, base_tokens + num_reqs):
                level = OFF   # a tree step this dear (a loaded CPU) is left to exploration
        else:
            self._pick_chain(num_reqs, base_tokens)
            est = [self.estimate(lv, num_reqs, base_tokens) for lv in LEVELS]
            if any(self.matched) or self.exploit is None or not self.shadow:
                # a step without chain candidates prices CHAIN as plain decoding, not at its
                # long-run value: the exploited level is not judged on it
                self.exploit = self._exploit(est)
            level = self.exploit
            if self.steps % self.explore_every == 0:
                level = self._explore(est, num_reqs, base_tokens)
        if self.forced is not None:
            level = self.forced
        if level == CHAIN and not any(self.matched):
            level = OFF   # nothing to draft: a plain step, and CHAIN stays due for measuring
        if level == CHAIN:
            self.chain_steps += 1
            self.cut = list(self.best)
            if warming:
                self.cut = self._affordable_cut(num_reqs, base_tokens, EXPLORE_COST)
                if self.shadow:   # acceptance comes from the shadows: measure the cost cheaply
                    self.cut = self._affordable_cut(num_reqs, base_tokens, WARMUP_SHADOW_COST, 0)
            if self.chain_steps % CHAIN_PROBE_EVERY == 0:   # alternately longer and shorter
                up = self.chain_steps % (2 * CHAIN_PROBE_EVERY) == 0
                self.cut = [self._probe_len(c, up, num_reqs, base_tokens) if m else self.best[c]
                            for c, m in enumerate(self.matched)]
            if not any(m and self.cut[c] for c, m in enumerate(self.matched)):
                level = OFF   # every matched class is cut to 0 drafts: a plain step
        if self.log is not None:
            self._log(level, num_reqs, base_tokens)
        self.last_used[level] = self.steps
        self.history[level] += 1
        if self.steps % TRIM_EVERY == 0:   # age the levels not run lately too
            for mean in self.tokens + self.nodes:
                mean.trim(self.steps)
        return level

    def _log(self, level: int, num_reqs: int, base_tokens: int) -> None:
        est = [self.estimate(lv, num_reqs, base_tokens) for lv in LEVELS]
        self.log.write(json.dumps({
            "step": self.steps, "level": level, "exploit": self.exploit, "reqs": num_reqs,
            "base": base_tokens, "matched": self.matched, "cut": self.cut,
            "est": [[round(e.score, 2), round(e.cost * 1e3, 2), round(e.se, 4)] for e in est]})
            + "\n")

    def _exploit(self, est: list[_Estimate]) -> int:
        """The exploited level: the current one unless another beats it beyond the noise. OFF,
        the level that cannot lose to plain decoding, is returned to for any gain above
        SWITCH_FLOOR: an early lucky estimate of a speculative level must not lock it in."""
        cur = OFF if self.exploit is None else self.exploit   # after the warm-up: from OFF

        def margin(lv: int) -> float:
            if lv == OFF:
                return SWITCH_FLOOR
            return max(SWITCH_FLOOR, SWITCH_K * math.hypot(est[lv].se, est[cur].se))
        better = [lv for lv in LEVELS
                  if lv != cur and est[lv].score > est[cur].score * (1.0 + margin(lv))]
        return max(better, key=lambda lv: est[lv].score) if better else cur

    def observe_step(self, tokens: int, seconds: float, tree: bool = False,
                     drafts: bool = False) -> None:
        """A step that fed ``tokens`` tokens took ``seconds`` (proposal to next proposal);
        ``tree``: some of its requests used tree attention; ``drafts``: some had drafts."""
        model = self.cost_tree if tree else self.cost_chain if drafts else self.cost_plain
        typical = model.observe(tokens, seconds, self.steps)
        if self.log is not None:
            self.log.write(json.dumps({"observed": self.steps, "tokens": tokens,
                                       "ms": round(seconds * 1e3, 2),
                                       "kind": "tree" if tree else "chain" if drafts else "plain"})
                           + "\n")
        # the budget earns a share of the step's typical time (its bucket's robust mean, the
        # scale losses are predicted in: a spike earns no extra exploration)
        self.budget += EXPLORE_BUDGET * typical
        if self.explored is not None:
            self._settle(typical)

    def observe_level(self, level: int, tokens_per_req: float, nodes_per_req: float,
                      requests: int | None = None) -> None:
        """What ``level`` delivered this step: mean emitted tokens and tree nodes per request,
        over ``requests`` requests (the step's drafting ones; None: not a drafted step, e.g.
        shadow chains)."""
        if requests is not None:   # tokens beyond one per request, for settling an exploration
            self.delivered = (self.steps, level, (float(tokens_per_req) - 1.0) * requests)
        if level == OFF:
            return
        self.tokens[level].add(tokens_per_req, self.steps)
        self.nodes[level].add(nodes_per_req, self.steps)
