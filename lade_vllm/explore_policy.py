"""The adaptive policy's exploration (no vLLM import): which level an exploration step runs, the
budget that pays for it, settled at each exploration's measured loss, and the cost bound of a tree
level. Mixed into lade_vllm.policy.AdaptivePolicy (see its docstring, "Exploring"), whose state it
reads: ``exploit``, ``budget``, ``explorations``, ``explored``, ``delivered``, ``last_used``,
``nodes`` / ``node_cap``, ``shadow``, ``explore_margin``, ``explore_every``, ``steps`` and ``cost``."""
from __future__ import annotations

from lade_vllm.level_stats import CHAIN, FULL, LOOKUP, OFF, _Estimate

LEVELS = (OFF, CHAIN, LOOKUP, FULL)
TREE_LEVELS = (LOOKUP, FULL)
SWITCH_K = 1.0        # a level changes only for a gain above this many standard errors of the two
                      # scores (lade_vllm.policy); exploration is optimistic by as many
EXPLORE_COST = 2.0    # exploration never picks a step predicted dearer than this x the exploited
EXPLORE_BUDGET = 0.02  # exploration's expected loss stays below this fraction of elapsed time
BUDGET_STEPS = 512    # the budget saves at most this many exploited steps' share
TREE_BOUND_AFTER = 4  # a tree level's cost bound uses its observed trees after this many steps


class Exploration:
    """Exploration steps and their budget; see lade_vllm.policy's docstring."""

    def _tree_cost_bound(self, level: int, num_reqs: int, base_tokens: int) -> float:
        """A tree level's step cost at its largest trees: the biggest nodes per request among
        its recent steps once ``TREE_BOUND_AFTER`` were observed, its full tree before (a
        tree's size grows as the pools fill; one small early tree must not make the next look
        cheap: at batch 32 a LOOKUP step priced at 145 ms from one 1-request tree took 379)."""
        nodes = self.nodes[level]
        top = nodes.top if len(nodes.samples) >= TREE_BOUND_AFTER else self.node_cap[level]
        return self.cost(level, base_tokens + num_reqs * (1.0 + max(top, nodes.value)))

    def _explore(self, est: list[_Estimate], num_reqs: int = 1, base_tokens: int = 0) -> int:
        """The level to run on an exploration step (the exploited one when none qualifies)."""
        cur = self.exploit
        others = [lv for lv in LEVELS if lv != cur]
        if self.explore_margin == 0:
            return min(others, key=lambda lv: self.last_used[lv])
        self.budget = min(self.budget, EXPLORE_BUDGET * BUDGET_STEPS * est[cur].cost)

        def loss(lv: int) -> float:  # expected seconds lost against running the exploited level
            return est[lv].cost * max(0.0, 1.0 - est[lv].score / est[cur].score)

        # candidates: competitive and not a much dearer step, optimistically (an estimate
        # extrapolated from far away must not rule a level out unmeasured), and affordable
        def hi(lv: int) -> float:  # optimistic score
            return est[lv].score * (1.0 + SWITCH_K * est[lv].se)

        def dear(lv: int) -> float:   # its step cost, optimistic; tree levels at their largest
            cost = self._tree_cost_bound(lv, num_reqs, base_tokens) if lv in TREE_LEVELS \
                else est[lv].cost
            return cost * (1.0 - min(0.5, SWITCH_K * est[lv].se))

        ok = [lv for lv in others if hi(lv) >= self._margin(lv) * est[cur].score
              and dear(lv) <= EXPLORE_COST * est[cur].cost and loss(lv) <= self.budget]
        self.explorations += 1
        # the candidate most likely to beat the exploited level, while one might (optimistic
        # score above the exploited score); every fourth time the stalest, so none is forgotten
        hope = [lv for lv in ok if hi(lv) >= est[cur].score]
        # with shadow chains CHAIN's acceptance stays measured: it is run for hope only
        stale = [lv for lv in ok if not (self.shadow and lv == CHAIN)]
        if OFF in ok and self.explorations % 2 == 0:
            level = OFF   # the baseline every other level is judged against stays measured
        elif stale and self.explorations % 4 == 0:
            level = min(stale, key=lambda lv: self.last_used[lv])
        elif hope:
            level = max(hope, key=hi)
        else:
            return cur
        self.budget -= loss(level)
        self.explored = (self.steps, level, loss(level), est[cur].score, num_reqs)
        return level

    def _settle(self, typical: float) -> None:
        """An exploration step was timed (its bucket's robust mean ``typical``): the budget
        pays what it actually lost against the exploited level (its time less the time the
        exploited level would have taken for the tokens it delivered) instead of the loss
        predicted when it was chosen, so an exploration that loses more than predicted (an
        optimistic cost curve) buys fewer later ones."""
        step, level, charged, cur_score, num_reqs = self.explored
        self.explored = None
        if step != self.steps or cur_score <= 0:
            return
        seen, lv, extra = self.delivered
        if level != OFF and (seen, lv) != (step, level):
            return   # what the step delivered was not reported: the predicted charge stands
        tokens = num_reqs + (extra if level != OFF else 0.0)
        self.budget += charged - max(0.0, typical - tokens / cur_score)

    def _margin(self, level: int) -> float:
        age = self.steps - self.last_used[level]
        # never below a third of the margin: a level predicted that far behind stays unexplored
        # (one full-tree step at batch 32 costs as much as ~20 plain steps)
        return self.explore_margin * max(min(1.0, 4.0 * self.explore_every / max(age, 1)), 1 / 3)
