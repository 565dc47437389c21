"""The adaptive policy alone (no engine): it must follow the measured step cost."""
from __future__ import annotations

import random

import pytest

from lade_vllm.policy import CHAIN, FULL, LOOKUP, OFF, TREE_LEVELS, AdaptivePolicy, StepCostModel

FULL_NODES, LOOKUP_NODES, CHAIN_NODES = 55, 12, 4
TOKENS = {OFF: 1.0, CHAIN: 1.15, LOOKUP: 1.3, FULL: 1.7}   # what each level "delivers" here
NODES = {OFF: 0, CHAIN: 3, LOOKUP: 8, FULL: 45}
TREE_PENALTY = 1.3  # tree attention makes a token dearer than a plain/chain token (CPU-like)


def step_cost(cost, level, fed):
    return cost(fed) * (TREE_PENALTY if level in TREE_LEVELS else 1.0)


def simulate(cost, num_reqs, steps=800, seed=0):
    """Drive the policy with a synthetic step cost; returns (levels used, simulated tokens/s)."""
    rng = random.Random(seed)
    pol = AdaptivePolicy(FULL_NODES, LOOKUP_NODES, CHAIN_NODES, explore_every=16)
    tokens_out, seconds = 0.0, 0.0
    for _ in range(steps):
        level = pol.choose(num_reqs, 0)
        fed = num_reqs * (1 + NODES[level])
        dt = step_cost(cost, level, fed) * rng.uniform(0.9, 1.1)          # noisy machine
        pol.observe_step(fed, dt, tree=level in TREE_LEVELS,
                                  drafts=level != OFF)
        if level != OFF:
            pol.observe_level(level, TOKENS[level], NODES[level])
        tokens_out += num_reqs * TOKENS[level]
        seconds += dt
    return pol.history, tokens_out / seconds


@pytest.mark.parametrize("num_reqs", [1, 4, 32])
@pytest.mark.parametrize("name,cost", [
    ("free tokens (memory-bound GPU-like)", lambda t: 0.010 + 0.00001 * t),
    ("compute-bound CPU", lambda t: 0.020 + 0.0015 * t),
    ("flat then linear", lambda t: max(0.015, 0.0004 * t)),
])
def test_policy_tracks_best_level(name, cost, num_reqs):
    history, rate = simulate(cost, num_reqs)
    rates = sorted((num_reqs * TOKENS[lv] / step_cost(cost, lv, num_reqs * (1 + NODES[lv])), lv)
                   for lv in TOKENS)
    (second_rate, _), (best_rate, best_level) = rates[-2], rates[-1]
    if best_rate > 1.15 * second_rate:  # a clear winner is found and kept
        assert history[best_level] > 0.8 * sum(history), (name, num_reqs, history)
    # exploration and learning cost little: within 10% of always picking the best level
    assert rate >= 0.9 * best_rate, (name, num_reqs, rate, best_rate, history)


def test_loaded_batch_turns_lade_off():
    """32 sequences on a compute-bound machine: trees cost more than they give -> OFF, and the
    big tree is not even explored once measured as hopeless."""
    history, _ = simulate(lambda t: 0.020 + 0.0015 * t, 32, steps=600)
    assert history[OFF] > 0.9 * sum(history), history
    assert history[FULL] == 0, history  # never explored: its step would cost > 2x an OFF step


def test_disabled_policy_always_full():
    pol = AdaptivePolicy(FULL_NODES, LOOKUP_NODES, enabled=False)
    for _ in range(50):
        assert pol.choose(8, 0) == FULL
        pol.observe_step(8 * 56, 1.0, tree=True)


@pytest.mark.parametrize("forced", [OFF, CHAIN, LOOKUP, FULL])
def test_a_forced_level_is_run_every_step_and_counted(forced):
    pol = AdaptivePolicy(FULL_NODES, LOOKUP_NODES, CHAIN_NODES, forced=forced)
    for _ in range(40):
        assert pol.choose(4, 0) == forced
        pol.observe_step(4 * (1 + NODES[forced]), 0.02, tree=forced in TREE_LEVELS,
                         drafts=forced != OFF)
    assert pol.history[forced] == 40, pol.history


def test_an_unknown_forced_level_is_refused():
    from lade_vllm.policy import forced_level
    with pytest.raises(ValueError, match="LADE_FORCE_LEVEL='fast'"):
        forced_level({"LADE_FORCE_LEVEL": "fast"})
    assert forced_level({"LADE_FORCE_LEVEL": "chain"}) == CHAIN
    assert forced_level({}) is None


def test_cost_model_is_monotone_and_interpolates():
    cm = StepCostModel()
    for t, s in [(1, 0.02), (8, 0.021), (64, 0.05), (512, 0.4)]:
        cm.observe(t, s)
    xs = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 2048]
    ys = [cm(x) for x in xs]
    assert all(b >= a for a, b in zip(ys, ys[1:]))
    assert 0.021 <= cm(30) <= 0.05
    assert cm(2048) > cm(512)  # beyond the measured range: grows with tokens


def test_cost_error_next_to_the_outer_buckets():
    """Buckets lie where their samples do: a token count within half a bucket beyond the last
    (or before the first) one, in a bucket of its own not yet fed, gets an error, not a crash."""
    one = StepCostModel()
    one.observe(10, 0.1)                 # grid position 10.3, bucket 10
    assert one.se(10.9) > 0               # position 10.7: bucket 11, empty
    two = StepCostModel()
    for _ in range(3):
        two.observe(10, 0.1)
        two.observe(4, 0.05)
    assert two.se(10.9) > two.buckets[10].se
    assert two.se(3.6) > 0                # before the first bucket's position (6.2), bucket 6


def test_one_slow_step_does_not_condemn_a_level():
    """A load spike while the cheap levels are first measured must not keep the policy off a level
    that wins: an unused level's exploration margin relaxes until it is measured again."""
    cost = lambda t: 0.020 + 0.00002 * t      # nearly free extra tokens
    pol = AdaptivePolicy(FULL_NODES, LOOKUP_NODES, CHAIN_NODES, explore_every=16)
    for step in range(600):
        if step == 400:
            before = list(pol.history)
        level = pol.choose(1, 0)
        fed = 1 + NODES[level]
        dt = step_cost(cost, level, fed) * (10.0 if step < 3 else 1.0)  # spikes while warming up
        pol.observe_step(fed, dt, tree=level in TREE_LEVELS,
                                  drafts=level != OFF)
        if level != OFF:
            pol.observe_level(level, TOKENS[level], NODES[level])
    last = [a - b for a, b in zip(pol.history, before)]
    assert last[OFF] < 0.2 * sum(last), (last, pol.history)


def test_plain_chain_and_tree_steps_have_separate_costs():
    """A step with drafts costs more than a plain one of the same token count; outside the
    range its own curve measured, a chain or tree curve grows as the plain one does."""
    pol = AdaptivePolicy(FULL_NODES, LOOKUP_NODES, CHAIN_NODES)
    assert pol.cost(CHAIN, 5) == pol.cost(OFF, 5)   # nothing timed: one (prior) curve
    for _ in range(5):
        for fed in (5, 10, 20, 40):
            pol.observe_step(fed, 0.010 + 0.001 * fed)
        pol.observe_step(5, 0.016, drafts=True)
        pol.observe_step(5, 0.030, tree=True, drafts=True)
    assert pol.cost(OFF, 5) == pytest.approx(0.015)
    assert pol.cost(CHAIN, 5) == pytest.approx(0.016)
    assert pol.cost(LOOKUP, 5) == pytest.approx(0.030)
    # beyond the single chain bucket: 0.016 x plain(20) / plain(5)
    assert pol.cost(CHAIN, 20) == pytest.approx(0.016 * 0.030 / 0.015, rel=0.02)
    for _ in range(5):
        pol.observe_step(20, 0.032, drafts=True)
    assert pol.cost(CHAIN, 2) == pytest.approx(0.016, rel=0.02)   # below: plain is flat there
    assert pol.cost(CHAIN, 20) == pytest.approx(0.032)


def test_plain_decoding_is_returned_to_without_a_noise_margin():
    """Leaving OFF for a speculative level needs a gain beyond the noise; going back to OFF
    needs only SWITCH_FLOOR, so an early lucky estimate cannot lock a losing level in."""
    from lade_vllm.policy import SWITCH_FLOOR, _Estimate
    pol = AdaptivePolicy(FULL_NODES, LOOKUP_NODES, CHAIN_NODES)
    noisy = 0.3                                   # standard errors early in a run

    def est(off, chain):
        return [_Estimate(off, 1.0, 0.0), _Estimate(chain, 1.0, noisy),
                _Estimate(1.0, 1.0, noisy), _Estimate(1.0, 1.0, noisy)]
    pol.exploit = CHAIN
    assert pol._exploit(est(1.0 * (1 + 2 * SWITCH_FLOOR), 1.0)) == OFF
    pol.exploit = OFF
    assert pol._exploit(est(1.0, 1.0 * (1 + 2 * SWITCH_FLOOR))) == OFF   # within the noise
    assert pol._exploit(est(1.0, 1.5)) == CHAIN


def test_warm_up_leaves_a_dear_tree_step_to_exploration():
    """At batch 32 on a CPU the prefill steps have already shown that 300+ tokens cost many
    plain steps: the warm-up runs OFF instead of LOOKUP there; where extra tokens are nearly free
    (a GPU at batch 1) it measures LOOKUP."""
    def warm_up(num_reqs, prefill, cost):
        pol = AdaptivePolicy(FULL_NODES, LOOKUP_NODES, CHAIN_NODES)
        pol.observe_step(prefill, cost(prefill))
        for _ in range(9):
            level = pol.choose(num_reqs, 0, matched=0)
            fed = num_reqs * (1 + (LOOKUP_NODES if level == LOOKUP else 0))
            pol.observe_step(fed, cost(fed), tree=level in TREE_LEVELS,
                                             drafts=level != OFF)
        return pol.history
    assert warm_up(32, 2600, lambda t: 0.02 + 0.0015 * t)[LOOKUP] == 0
    assert warm_up(1, 100, lambda t: 0.010 + 0.00001 * t)[LOOKUP] == 3


def test_warm_up_chains_are_cut_to_an_affordable_step():
    """The warm-up's CHAIN steps draft at the full chain length where extra tokens are nearly
    free (batch 1 on a GPU), and only as many drafts as keep the step within EXPLORE_COST x a
    plain one where they are not (batch 32 on a CPU: 8 drafts each would cost 5 plain steps)."""
    from lade_vllm.policy import EXPLORE_COST

    def warm_up_cuts(num_reqs, prefill, cost):
        pol = AdaptivePolicy(FULL_NODES, LOOKUP_NODES, CHAIN_NODES)
        pol.observe_step(prefill, cost(prefill))
        cuts = []
        for _ in range(9):
            level = pol.choose(num_reqs, 0, matched=num_reqs)
            drafts = num_reqs * pol.chain_len if level == CHAIN else 0
            if level == CHAIN:
                cuts.append(pol.chain_len)
            fed = num_reqs + drafts
            pol.observe_step(fed, cost(fed), tree=level in TREE_LEVELS,
                                             drafts=level != OFF)
        return cuts
    dear = lambda t: 0.07 + 0.0022 * t    # noqa: E731  (batch 32, fp32, 2 cores)
    cuts = warm_up_cuts(32, 2500, dear)
    assert cuts and all(1 <= n < CHAIN_NODES for n in cuts)
    assert all(dear(32 + 32 * n) <= EXPLORE_COST * 1.1 * dear(32) for n in cuts)
    assert warm_up_cuts(1, 100, lambda t: 0.010 + 0.00001 * t) == [CHAIN_NODES] * 3


def test_with_shadow_chains_the_warm_up_drafts_only_cheap_chains():
    """When the driver reports undrafted chains (observe_shadow), acceptance needs no chain steps:
    the warm-up's CHAIN steps cost at most WARMUP_SHADOW_COST x a plain one, none at all where
    even one draft per request is dearer (batch 32 on a CPU), the full length where drafts are
    nearly free (batch 1 on a GPU)."""
    from lade_vllm.policy import WARMUP_SHADOW_COST

    def warm_up(num_reqs, prefill, cost):
        pol = AdaptivePolicy(FULL_NODES, LOOKUP_NODES, CHAIN_NODES, shadow=True)
        pol.observe_step(prefill, cost(prefill))
        cuts = []
        for _ in range(9):
            level = pol.choose(num_reqs, 0, matched=num_reqs)
            if level == CHAIN:
                cuts.append(pol.chain_len)
            fed = num_reqs * (1 + (pol.chain_len if level == CHAIN else 0)
                              + (LOOKUP_NODES if level == LOOKUP else 0))
            pol.observe_step(fed, cost(fed), tree=level in TREE_LEVELS, drafts=level != OFF)
        return cuts
    assert warm_up(32, 2500, lambda t: 0.07 + 0.0022 * t) == []
    assert warm_up(1, 100, lambda t: 0.010 + 0.00001 * t) == [CHAIN_NODES] * 3
    mid = lambda t: 0.03 + 0.004 * t    # noqa: E731  (batch 1, 2 cores: a draft costs 12%)
    cuts = warm_up(1, 100, mid)
    assert cuts and all(1 <= n < CHAIN_NODES for n in cuts)
    assert all(mid(1 + n) <= WARMUP_SHADOW_COST * mid(1) for n in cuts)


def test_shadow_chains_teach_the_chain_record_and_the_level():
    """observe_shadow feeds the class's depth record (as a drafted chain would) and CHAIN's
    tokens per request as if cut to the class's best length."""
    pol = AdaptivePolicy(FULL_NODES, LOOKUP_NODES, CHAIN_NODES, shadow=True)
    pol.best = [CHAIN_NODES, CHAIN_NODES, 3, CHAIN_NODES]
    pol.observe_shadow([5, 5], [5, 1], [2, 2])
    assert pol.chains[2].steps == 1 and pol.chains[0].steps == 0
    assert pol.tokens[CHAIN].value == 1.0 + (3 + 1) / 2
    assert pol.nodes[CHAIN].value == 3.0


def test_step_period_counts_the_gap_before_each_plan_and_not_idle_time():
    from lade_vllm.step_cost import StepPeriod

    p = StepPeriod()
    assert p.step(0.0, None) is None                  # first proposal: no step ended yet
    # proposal at 0, plan at 0.02 (scheduler), next proposal at 0.10: the step is 0.10
    assert p.step(0.10, 0.02) == pytest.approx(0.10)
    assert p.step(0.21, 0.13) == pytest.approx(0.11)  # gap 0.03, inside 0.08
    # the engine sat idle 5 s before this plan: the gap counts as the median ordinary gap
    assert p.step(5.40, 5.30) == pytest.approx(0.10 + 0.03)
    assert p.step(5.50, None) is None                 # no step planned (nothing to measure)
    assert p.step(5.60, 5.51) == pytest.approx(0.09 + 0.01)


def test_after_the_warm_up_a_level_must_beat_plain_decoding_beyond_the_noise():
    """The first exploited level starts from OFF: a speculative level predicted ahead of plain
    decoding by less than the two estimates' noise is not taken on the warm-up's few samples."""
    from lade_vllm.policy import _Estimate
    pol = AdaptivePolicy(FULL_NODES, LOOKUP_NODES, CHAIN_NODES)
    plain = _Estimate(100.0, 0.1, 0.1)
    unsure = [plain, _Estimate(120.0, 0.2, 0.3), _Estimate(50.0, 0.5, 0.3), _Estimate(40.0, 1.0, 0.3)]
    assert pol._exploit(unsure) == OFF
    clear = [plain, _Estimate(150.0, 0.2, 0.3), _Estimate(50.0, 0.5, 0.3), _Estimate(40.0, 1.0, 0.3)]
    assert pol._exploit(clear) == CHAIN


def test_the_decision_log_has_a_line_per_decision_and_per_timed_step(tmp_path):
    """LADE_POLICY_LOG=path: each decision (level, estimates) and each timed step is one JSON
    line; without the variable nothing is opened."""
    import json

    from lade_vllm.policy import decision_log
    assert decision_log({}) is None
    path = tmp_path / "policy.jsonl"
    pol = AdaptivePolicy(55, 12, 4, log=decision_log({"LADE_POLICY_LOG": str(path)}))
    for _ in range(12):
        level = pol.choose(4, 0)
        pol.observe_step(4 if level == OFF else 16, 0.01, drafts=level != OFF)
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    decisions = [x for x in lines if "level" in x]
    timed = [x for x in lines if "observed" in x]
    assert [d["step"] for d in decisions] == list(range(1, 13))
    levels = [d["level"] for d in decisions]
    assert [levels.count(lv) for lv in range(4)] == pol.history   # the levels actually run
    assert all(len(d["est"]) == 4 and d["reqs"] == 4 for d in decisions)
    assert [t["tokens"] for t in timed] == [4 if lv == OFF else 16 for lv in levels]
    assert all(t["ms"] == 10.0 for t in timed)


def test_an_exploration_step_is_settled_at_its_measured_loss():
    """An exploration is charged its predicted loss when chosen; once its step is timed the
    budget pays what it lost against the exploited level instead (its time less the time the
    exploited level needs for the tokens it delivered), and nothing else when no one reported
    what it delivered."""
    from lade_vllm.policy import CHAIN, EXPLORE_BUDGET

    pol = AdaptivePolicy(55, 12, 8)
    pol.steps = 40
    # CHAIN explored at step 40 for 10 requests, charged 10 ms; the exploited level: 100 tok/s
    pol.explored = (40, CHAIN, 0.010, 100.0, 10)
    pol.observe_level(CHAIN, 1.5, 2.0, requests=4)   # 4 chains, 2 tokens beyond one each
    budget = pol.budget
    pol.observe_step(30, 0.250, drafts=True)         # the step took 250 ms
    lost = 0.250 - (10 + 2) / 100.0                  # 130 ms, not the 10 predicted
    assert pol.budget == pytest.approx(budget + EXPLORE_BUDGET * 0.250 + 0.010 - lost)
    assert pol.explored is None

    pol.steps = 41
    pol.explored = (41, CHAIN, 0.010, 100.0, 10)     # its delivery never reported
    budget = pol.budget
    pol.observe_step(30, 0.250, drafts=True)
    assert pol.budget == pytest.approx(budget + EXPLORE_BUDGET * pol.cost_chain(30))


def test_a_step_without_chain_candidates_leaves_the_exploited_level():
    """With shadow chains, a step where no request has a chain candidate prices CHAIN as plain
    decoding; the exploited level is not re-judged on it (a tree level would take over on such
    steps and keep the matched steps after them)."""
    pol = AdaptivePolicy(55, 12, 8, shadow=True)
    judged = []
    real = pol._exploit
    pol._exploit = lambda est: judged.append(pol.steps) or real(est)
    for step in range(1, 40):
        pol.choose(1, 0, matched=[0, 0, 0, 1 if step % 2 else 0])
    # the first step after the warm-up sets it, whatever the step; then only matched steps
    assert len(judged) > 10 and all(s % 2 for s in judged[1:])


def test_a_tree_level_is_priced_at_its_largest_trees_for_exploring():
    """Exploring and the warm-up price a tree level at its full tree until it has been observed
    a few times, then at its largest recent tree, not at the mean of one small early tree."""
    from lade_vllm.policy import LOOKUP, TREE_BOUND_AFTER

    pol = AdaptivePolicy(55, 12, 8)
    for t in (1, 30, 300, 3000):
        pol.observe_step(t, 0.05 + 0.001 * t)
    pol.observe_level(LOOKUP, 1.2, 1.0)   # one 1-node tree
    full = pol.cost(LOOKUP, 32 * 13)
    assert pol._tree_cost_bound(LOOKUP, 32, 0) == pytest.approx(full)
    for nodes in [2.0, 9.0, 3.0][:TREE_BOUND_AFTER - 1]:
        pol.observe_level(LOOKUP, 1.2, nodes)
    assert pol._tree_cost_bound(LOOKUP, 32, 0) == pytest.approx(pol.cost(LOOKUP, 32 * 10))
