"""The two classes vLLM instantiates for lade (installed by lade_vllm.overrides):

- ``LadeProposer``: the ``custom_class`` drafter (``speculative_config.model``). vLLM 0.32 builds it
  in ``GPUModelRunner.__init__`` and calls ``propose(...)`` after each step's bookkeeping
  (``GPUModelRunner.propose_draft_token_ids``); it forwards to the runner's ``LadeDriver``.
- ``LadeRejectionSampler``: replaces ``GPUModelRunner.rejection_sampler``. It runs vLLM's own
  ``RejectionSampler.forward`` (exact for every non-tree request: plain decodes, ngram-like chains,
  requests with logprobs or penalties) and then rewrites the rows of tree requests with the result of
  lookahead tree verification.
"""
from __future__ import annotations

import torch
from vllm.v1.sample.rejection_sampler import RejectionSampler

from lade_vllm.config import LadeConfig


class LadeProposer:
    """vLLM custom_class drafter for lade. Holds no model; the runner attaches a LadeDriver."""

    def __init__(self, vllm_config):
        extra = vllm_config.additional_config or {}
        self.cfg = LadeConfig.from_user(extra.get("lade", "lade"))
        self.driver = None  # set by overrides after the runner is built

    def load_model(self, *args, **kwargs) -> None:  # vLLM CPU calls this unconditionally
        return None

    def propose(self, sampled_token_ids, num_tokens_no_spec, token_ids_cpu, slot_mappings=None):
        if self.driver is None:
            return [[] for _ in sampled_token_ids]
        return self.driver.propose(sampled_token_ids, num_tokens_no_spec)


class LadeRejectionSampler(RejectionSampler):
    driver = None

    def forward(self, metadata, draft_probs, logits, sampling_metadata):
        driver = self.driver
        target = None
        if driver is not None and driver.plan is not None:
            # before vLLM's sampler, which may modify logits in place
            target = logits.argmax(dim=-1).to(torch.long).cpu()
        out = super().forward(metadata, draft_probs, logits, sampling_metadata)
        if target is not None:
            driver.verify(metadata, target, out.sampled_token_ids)
        return out
