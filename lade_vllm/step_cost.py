"""Step cost against tokens fed, learned from timed steps (no vLLM import).

``StepCostModel`` keeps recent step times per token-count bucket (a geometric grid) and answers
cost(T) and its relative error; ``_Samples`` is the window of recent samples every estimate of the
adaptive policy uses. How both behave (robust bucket means, isotonic pooling, interpolation,
extrapolation, the common horizon) is described in :mod:`lade_vllm.policy`.
"""
from __future__ import annotations

import bisect
import collections
import math

COST_WINDOW = 1024    # step times kept per cost bucket (the most recent)
MAX_BUCKETS = 48      # buckets kept per cost curve
HORIZON = 1024        # samples older than this many steps are dropped...
MIN_KEEP = 16         # ...beyond a bucket's / level's newest this many
TRIM_EVERY = 64       # steps between sweeps dropping old samples everywhere
PRIOR_SIGMA = 0.25    # relative step-time noise assumed while a bucket has few samples
UNMEASURED_SE = 0.5   # relative error of a cost extrapolated beyond the measured buckets


class _Samples:
    """Recent samples as (tick, value): at most ``size``, and none older than HORIZON ticks
    beyond the newest MIN_KEEP (so that estimates compared with each other cover the same span
    of time, while a rarely fed one keeps what it has)."""

    def __init__(self, size: int):
        self.items: collections.deque[tuple[int, float]] = collections.deque(maxlen=size)
        self.pending = 0         # samples added since the estimate was last redone

    def add(self, x: float, tick: int) -> bool:
        """Adds a sample; returns whether the estimate is due (after every max(1, n/16) new
        samples: an estimate over n samples moves little per sample)."""
        self.items.append((tick, x))
        self.trim(tick)
        self.pending += 1
        if self.pending < max(1, len(self.items) // 16):
            return False
        self.pending = 0
        return True

    def trim(self, tick: int) -> bool:
        """Drops samples older than HORIZON (beyond the newest MIN_KEEP); returns whether any."""
        items, dropped = self.items, False
        while len(items) > MIN_KEEP and items[0][0] < tick - HORIZON:
            items.popleft()
            dropped = True
        return dropped

    def values(self) -> list[float]:
        return [x for _, x in self.items]

    def __len__(self) -> int:
        return len(self.items)


class StepPeriod:
    """Seconds of whole engine steps: from one proposal to the next, so the scheduler, the
    engine's own bookkeeping and the proposal itself are counted with the forward (at batch 32 on
    a CPU they are a quarter of a plain step, and more with drafts). The part before a step's
    plan is its gap; a gap longer than the step itself (the engine sat idle between requests)
    counts as the median of the recent ordinary gaps instead."""

    def __init__(self, window: int = 64):
        self.last: float | None = None       # when the last proposal started
        self.gaps: collections.deque[float] = collections.deque(maxlen=window)

    def step(self, now: float, planned_at: float | None) -> float | None:
        """A proposal starts at ``now``; the step planned at ``planned_at`` (None: no step was
        planned since the last proposal) ends here. Returns its seconds, or None."""
        last, self.last = self.last, now
        if planned_at is None:
            return None
        inside = now - planned_at
        gap = None if last is None or last > planned_at else planned_at - last
        if gap is not None and gap <= inside:
            self.gaps.append(gap)
        else:
            gap = sorted(self.gaps)[len(self.gaps) // 2] if self.gaps else 0.0
        return inside + gap


class _CostBucket:
    """Step times of one token-count bucket: robust mean and its relative standard error."""

    def __init__(self):
        self.samples = _Samples(COST_WINDOW)   # log seconds
        self.last = 0            # tick when last fed (for eviction)
        self.value = 0.0         # estimated seconds of a step in this bucket
        self.se = PRIOR_SIGMA    # relative standard error of value
        self.x = 0.0             # where the bucket's samples lie: mean grid position of the newest
        self.fed = 0

    def add(self, seconds: float, tick: int, x: float) -> bool:
        """Adds a sample of grid position ``x``; returns whether the estimate was redone."""
        self.last = tick
        self.fed = min(self.fed + 1, 64)
        self.x += (x - self.x) / self.fed
        if not self.samples.add(math.log(seconds), tick):
            return False
        self.value, self.se = self._estimate()
        return True

    def _estimate(self) -> tuple[float, float]:
        xs = sorted(self.samples.values())
        n = len(xs)
        med = _median(xs)
        sigma = 1.4826 * _median(sorted(abs(x - med) for x in xs))
        kept = [x for x in xs if abs(x - med) <= 3.0 * sigma] or [med]
        if n < 8:
            sigma = max(sigma, PRIOR_SIGMA)
        return math.exp(sum(kept) / len(kept)), sigma / math.sqrt(len(kept))


def _median(xs: list[float]) -> float:
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


_LOG_RATIO = math.log(1.25)


class StepCostModel:
    """cost(T) in seconds from observed (tokens, seconds) pairs, bucketed on a geometric grid."""

    RATIO = 1.25
    SPAN = 2.0   # extrapolation uses two buckets at least this far apart in tokens

    def __init__(self):
        self.buckets: dict[int, _CostBucket] = {}
        self.ticks = 0
        self._trimmed = 0        # tick of the last sweep dropping old samples
        # (positions, monotone values, buckets, token counts at the positions), see ``curve``
        self._curve: tuple[list[float], list[float], list[_CostBucket], list[float]] | None = None

    def _bucket(self, tokens: float) -> int:
        return int(round(self._x(tokens)))

    def _x(self, tokens: float) -> float:
        return math.log(max(tokens, 1)) / _LOG_RATIO

    def observe(self, tokens: int, seconds: float, tick: int | None = None) -> float:
        """Adds a sample at time ``tick`` (default: count of samples); returns its bucket's
        estimate (0 for an unusable sample)."""
        if tokens <= 0 or not 0 < seconds < math.inf:
            return 0.0
        self.ticks = self.ticks + 1 if tick is None else tick
        b = self._bucket(tokens)
        bucket = self.buckets.get(b)
        if bucket is None:
            if len(self.buckets) >= MAX_BUCKETS:   # drop the least recently observed bucket
                del self.buckets[min(self.buckets, key=lambda k: self.buckets[k].last)]
            bucket = self.buckets[b] = _CostBucket()
        if bucket.add(seconds, self.ticks, self._x(tokens)):
            self._curve = None
        if self.ticks >= self._trimmed + TRIM_EVERY:   # age the buckets not fed lately too
            self._trimmed = self.ticks
            for other in self.buckets.values():
                if other.samples.trim(self.ticks):
                    other.value, other.se = other._estimate()
                    self._curve = None
        return bucket.value

    def known(self) -> bool:
        return bool(self.buckets)

    def curve(self) -> tuple[list[float], list[float]]:
        """Where each bucket's samples lie (mean grid position, increasing) and the bucket
        estimates made monotone (a bucket never costs less than a smaller one): adjacent buckets
        out of order are pooled into their sample-weighted mean, so a bucket of few samples
        bends the curve little (isotonic regression, pool adjacent violators). Positions, not
        bucket centres: a curve through the centres would misplace every sample by up to half a
        bucket, and the cost of a token count between two buckets with it."""
        if self._curve is None:
            keys = sorted(self.buckets)
            blocks: list[list[float]] = []   # [value, weight, buckets pooled]
            for k in keys:
                b = self.buckets[k]
                blocks.append([b.value, float(len(b.samples)), 1])
                while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
                    v2, w2, c2 = blocks.pop()
                    v1, w1, c1 = blocks.pop()
                    blocks.append([(v1 * w1 + v2 * w2) / (w1 + w2), w1 + w2, c1 + c2])
            xs = [self.buckets[k].x for k in keys]
            self._curve = (xs, [v for v, _, c in blocks for _ in range(int(c))],
                           [self.buckets[k] for k in keys], [self.RATIO ** x for x in xs])
        return self._curve[:2]

    def _sorted(self) -> list[_CostBucket]:
        """The buckets in the curve's order."""
        self.curve()
        return self._curve[2]

    def bottom(self) -> float:
        """Token count of the smallest measured bucket."""
        self.curve()
        return self._curve[3][0]

    def top(self) -> float:
        """Token count of the largest measured bucket."""
        self.curve()
        return self._curve[3][-1]

    def spans(self) -> bool:
        """Whether the measured buckets span SPAN x in tokens (enough to extrapolate a slope)."""
        keys = self.curve()[0]
        return self.RATIO ** (keys[-1] - keys[0]) >= self.SPAN

    def __call__(self, tokens: float) -> float:
        """Estimated seconds for a step of ``tokens`` tokens (monotone in tokens)."""
        if not self.buckets:
            return float(max(tokens, 1))
        self.curve()
        keys, vals, ordered, ts = self._curve
        x = self._x(tokens)
        if x <= keys[0]:
            return vals[0]
        if x >= keys[-1]:
            # linear in tokens from the largest bucket at most 1/SPAN of the last one to the last
            # (flat without such a bucket, so that a bigger tree gets measured, not assumed dear)
            t1 = ts[-1]
            j = bisect.bisect_right(keys, keys[-1] - math.log(self.SPAN) / _LOG_RATIO)
            if j == 0:
                return vals[-1]
            t0 = ts[j - 1]
            # the rise less one standard error of it: a rise within the noise extrapolates flat
            # rather than condemning a bigger tree from two noisy buckets
            b0, b1 = ordered[j - 1], ordered[-1]
            rise = vals[-1] - vals[j - 1] - math.hypot(b0.se * vals[j - 1], b1.se * vals[-1])
            return vals[-1] + max(rise, 0.0) / (t1 - t0) * (max(tokens, 1) - t1)
        # between two buckets: linear in tokens (a step's cost is about affine in its tokens;
        # linear in the grid position would put T=2 halfway to T=4 from T=1 to T=16)
        i = bisect.bisect_right(keys, x)
        t0, t1 = ts[i - 1], ts[i]
        f = (max(tokens, 1) - t0) / max(t1 - t0, 1e-9)
        return vals[i - 1] + min(max(f, 0.0), 1.0) * (vals[i] - vals[i - 1])

    def se(self, tokens: float) -> float:
        """Relative standard error of ``self(tokens)``."""
        if not self.buckets:
            return UNMEASURED_SE
        keys = self.curve()[0]
        x = self._x(tokens)
        near = self.buckets.get(int(round(x)))
        if near is not None:
            return near.se
        if x < keys[0] - 0.5 or x > keys[-1] + 0.5:
            return UNMEASURED_SE
        ordered = self._sorted()
        if len(ordered) == 1:
            return ordered[0].se + 0.05
        # between two buckets (or within half a bucket outside the first or last, which lie
        # where their samples do, not at a bucket centre): the worse of the two, and then some
        i = min(max(bisect.bisect_right(keys, x), 1), len(keys) - 1)
        return max(ordered[i - 1].se, ordered[i].se) + 0.05
