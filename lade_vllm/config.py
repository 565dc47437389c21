"""LadeConfig: the user-facing parameters of lookahead decoding, parsed and validated once.

Accepted forms (CLI and Python alike): the bare word ``lade``, or a dict / JSON object
``{"method": "lade", "window_size": 7, "ngram_size": 5, "guess_set_size": 7, ...}``.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from typing import Any

#: vLLM 0.32's RejectionSampler asserts at most 128 draft tokens per request (MAX_SPEC_LEN).
MAX_TREE_DRAFT_NODES = 128


class LadeConfigError(ValueError):
    """A lade option is missing, unknown, of the wrong type or out of range."""


@dataclass(frozen=True)
class LadeConfig:
    #: W: Jacobi window columns (n-grams harvested per step).
    window_size: int = 7
    #: N: n-gram size; the window has N-1 levels, candidates N-1 tokens; up to N tokens per step.
    ngram_size: int = 5
    #: G: candidates verified per step, and continuations kept per key in the pool.
    guess_set_size: int = 7
    #: K: tokens of the context suffix-match candidate (prompt lookup over prompt + output,
    #: longest match of 2-8 tokens, earliest occurrence); 0 = no such candidate.
    suffix_tokens: int = 8
    #: Requests without a context match may draft the chain of the model's latest predictions
    #: after each token (recycled from earlier verifications; lade_vllm.proposer.recycle).
    recycle: bool = True
    #: Seed the pool with the prompt's n-grams and add committed output n-grams as they appear.
    pool_from_prompt: bool = True
    #: Distinct keys kept per sequence pool (LRU); bounds pool memory.
    pool_max_keys: int = 1024
    #: Seed of the window initialisation RNG (windows are filled from prompt tokens).
    seed: int = 0
    #: Adaptive policy (lade_vllm/policy.py): per step, choose the full tree, pool candidates
    #: only, or plain decoding, from the batch and the measured step cost. False = always full.
    adaptive: bool = True
    #: Every this many steps the adaptive policy re-measures a level other than its best.
    adaptive_explore_every: int = 16
    #: ... among the levels predicted at least this fraction as fast as the best (0 = all levels).
    adaptive_explore_margin: float = 0.6

    _RANGES = {"window_size": (1, 64), "ngram_size": (2, 16), "guess_set_size": (0, 64),
               "suffix_tokens": (0, 32),
               "pool_max_keys": (1, 1 << 20), "seed": (0, (1 << 63) - 1),
               "adaptive_explore_every": (2, 1 << 20)}

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type in ("int", int):
                if isinstance(value, bool) or not isinstance(value, int):
                    raise LadeConfigError(f"lade option {f.name!r} must be an integer, "
                                          f"got {type(value).__name__} {value!r}")
                lo, hi = self._RANGES[f.name]
                if not lo <= value <= hi:
                    raise LadeConfigError(f"lade option {f.name!r} must be in [{lo}, {hi}], "
                                          f"got {value}")
            elif f.type in ("float", float):
                if isinstance(value, bool) or not isinstance(value, (int, float)) \
                        or not 0.0 <= value <= 1.0:
                    raise LadeConfigError(f"lade option {f.name!r} must be a number in [0, 1], "
                                          f"got {value!r}")
            elif f.type in ("bool", bool) and not isinstance(value, bool):
                raise LadeConfigError(f"lade option {f.name!r} must be true or false, "
                                      f"got {value!r}")
        if self.max_draft_nodes > MAX_TREE_DRAFT_NODES:
            raise LadeConfigError(
                f"lade tree too large: window_size={self.window_size}, ngram_size="
                f"{self.ngram_size}, guess_set_size={self.guess_set_size}, suffix_tokens="
                f"{self.suffix_tokens} need {self.max_draft_nodes} draft tokens per step; vLLM 0.32 "
                f"verifies at most {MAX_TREE_DRAFT_NODES} "
                f"((W-1) + W*(N-2) + G*(N-1) + K <= {MAX_TREE_DRAFT_NODES})")

    @property
    def max_draft_nodes(self) -> int:
        """Tree nodes per step besides the root: row 0 (W-1) + levels 1..N-2 (W each) + G
        pool candidates of N-1 tokens + the K-token suffix match (before trie merging)."""
        w, n, g = self.window_size, self.ngram_size, self.guess_set_size
        return (w - 1) + w * (n - 2) + g * (n - 1) + self.suffix_tokens

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_user(cls, spec: Any) -> "LadeConfig":
        """Parse ``"lade"``, a JSON string or a dict (``method`` optional, must be ``lade``)."""
        if isinstance(spec, LadeConfig):
            return spec
        if isinstance(spec, str):
            text = spec.strip()
            if text == "lade":
                return cls()
            try:
                spec = json.loads(text)
            except json.JSONDecodeError as exc:
                raise LadeConfigError(f"lade config is neither 'lade' nor JSON: {exc}") from exc
        if not isinstance(spec, dict):
            raise LadeConfigError(f"lade config must be 'lade' or an object, got {spec!r}")
        options = {k.replace("-", "_"): v for k, v in spec.items()}
        method = options.pop("method", "lade")
        if method != "lade":
            raise LadeConfigError(f"expected method 'lade', got {method!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise LadeConfigError(f"unknown lade option(s) {unknown}; allowed: {sorted(known)}")
        return cls(**options)


def is_lade_spec(spec: Any) -> bool:
    """True when a --speculative-config value asks for lade."""
    if isinstance(spec, str):
        text = spec.strip()
        if text == "lade":
            return True
        try:
            spec = json.loads(text)
        except json.JSONDecodeError:
            return False
    return isinstance(spec, dict) and spec.get("method") == "lade"
