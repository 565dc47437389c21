"""Which requests may be decoded with lookahead trees (the rest decode normally, never wrongly).

Tree verification is exact for any request whose next-token distribution at a tree node lade
computes per node (``lade_vllm.adapter.sampling``): greedy and temperature sampling with top_k /
top_p / min_p, logit bias, allowed_token_ids, and the rules that read the tokens generated so far
(repetition / frequency / presence penalties, bad words: from the committed output plus the node's
own path; min_tokens: EOS and stop_token_ids masked while len(output) + the node's depth <
min_tokens), structured output (one grammar bitmask row per tree node,
``lade_vllm.adapter.structured``), with or without logprobs / prompt_logprobs. Anything else
(logprob_token_ids, structured output when the engine has a reasoning parser, trace replay, other
token-dependent processing) is decoded without speculation in the same batch, and a warning is
logged once per reason: never wrong output.
"""
from __future__ import annotations

import logging

logger = logging.getLogger("vllm.lade_vllm")  # under vllm: its handler and level
_warned: set[str] = set()


def ineligible_reason(sp, cfg=None, reasoning: bool = False) -> str | None:
    """Why a request with SamplingParams ``sp`` cannot use lade trees, or None if it can.
    ``cfg``: the engine's LadeConfig (to read per-request options in any accepted form);
    ``reasoning``: the engine has a reasoning parser (its grammar starts after the reasoning)."""
    if sp is None:
        return "no sampling params"
    extra = getattr(sp, "extra_args", None) or {}
    if extra.get("lade") is False:
        return "disabled by extra_args={'lade': False}"
    if extra.get("lade") not in (None, True) and cfg is not None:
        from lade_vllm.request_options import LadeRequestError, parse_request_options
        try:  # JSON text from HTTP vllm_xargs, e.g. "false" (validated at admission)
            if not parse_request_options(extra, cfg).enabled:
                return "disabled by extra_args={'lade': False}"
        except LadeRequestError:
            return "disabled by invalid extra_args['lade']"
    if getattr(sp, "logprob_token_ids", None):
        return "logprob_token_ids"
    if getattr(sp, "trace_decode_token_ids", None):
        return "trace_decode_token_ids"
    if getattr(sp, "watermarking", None) or getattr(sp, "thinking_token_budget", None) \
            or getattr(sp, "repetition_detection", None) is not None:
        return "token-dependent logits processing"
    if getattr(sp, "structured_outputs", None) is not None and reasoning:
        return "structured output with a reasoning parser"
    return None


def is_eligible(sp, cfg=None, reasoning: bool = False) -> bool:
    reason = ineligible_reason(sp, cfg, reasoning)
    if reason is not None and not reason.startswith("disabled") and reason not in _warned:
        _warned.add(reason)
        logger.warning("lade: requests with %s are decoded without speculation", reason)
    return reason is None
