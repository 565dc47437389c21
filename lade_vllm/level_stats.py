"""Per-level statistics of the adaptive policy (no vLLM import): the mean of a level's recent
tokens-per-request or nodes-per-request observations, and a level's throughput estimate; the
levels' numbers."""
from __future__ import annotations

import math
from dataclasses import dataclass

from lade_vllm.step_cost import _Samples

OFF, CHAIN, LOOKUP, FULL = 0, 1, 2, 3   # the policy's levels (lade_vllm.policy)

LEVEL_WINDOW = 1024   # tokens/nodes observations kept per level


class _LevelMean:
    """Mean of a level's recent observations (``_Samples``; a prior until the first one) and its
    relative standard error."""

    def __init__(self, prior: float, fixed: bool = False):
        self.fixed = fixed       # OFF: exactly known, never observed
        self.samples = _Samples(LEVEL_WINDOW)
        self.value = prior
        self.top = prior         # the largest recent observation (the prior until measured)
        self.se = 0.0 if fixed else 0.2

    @property
    def measured(self) -> bool:
        """The value comes from observed steps (or is exactly known), not from the prior."""
        return self.fixed or len(self.samples) > 0

    def add(self, x: float, tick: int) -> None:
        if self.samples.add(x, tick):
            self._estimate()

    def trim(self, tick: int) -> None:
        if self.samples.trim(tick):
            self._estimate()

    def _estimate(self) -> None:
        data = self.samples.values()
        n = len(data)
        self.value = m = sum(data) / n
        self.top = max(data)
        if n >= 2:
            var = sum((v - m) ** 2 for v in data) / (n - 1)
            self.se = math.sqrt(var / n) / max(m, 1e-9)


@dataclass
class _Estimate:
    score: float   # tokens/s
    cost: float    # seconds of the step
    se: float      # relative standard error of score
