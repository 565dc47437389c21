"""The two classes vLLM instantiates for lade (installed by lade_vllm.overrides):

- ``LadeProposer``: the ``custom_class`` drafter (``speculative_config.model``). vLLM 0.32 builds it
  in ``GPUModelRunner.__init__`` and calls ``propose(...)`` after each step's bookkeeping
  (``GPUModelRunner.propose_draft_token_ids``); it forwards to the runner's ``LadeDriver``.
- ``LadeRejectionSampler``: replaces ``GPUModelRunner.rejection_sampler``. Tree requests are verified by
  the driver (lookahead tree verification, exact for greedy and sampled requests); vLLM's own
  ``RejectionSampler.forward`` samples every other request (plain decodes, chains, requests lade
  does not speculate: penalties, bad words, ...) exactly as without lade.
"""
from __future__ import annotations

from vllm.v1.sample.rejection_sampler import RejectionSampler

from lade_vllm.config import LadeConfig
from lade_vllm.sampling import forward_without_trees


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
    """vLLM 0.32 ``RejectionSampler`` (``v1/sample/rejection_sampler.py``) with tree verification.

    ``forward``: (1) the driver verifies the tree requests from the raw logits (per-node targets,
    lookahead commit, KV move); (2) vLLM samples the rest of the batch with the tree requests cut
    down to their root row (``sampling.forward_without_trees``: vLLM's ``RejectionSampler.forward``,
    or its plain ``Sampler.forward`` when no other request has drafts), so every non-tree row is
    vLLM's own, logprobs included; (3) the tree requests' rows of ``sampled_token_ids`` and of
    ``logprobs_tensors`` are written from the verification (``TreeOutput.write``: vLLM would read
    output token j's logprobs from logits row j, the wrong row for a tree)."""
    driver = None

    def forward(self, metadata, draft_probs, logits, sampling_metadata):
        driver = self.driver
        tree_out = None
        if driver is not None and driver.plan is not None:
            tree_out = driver.verify(metadata, logits, sampling_metadata, self.sampler)
        if tree_out is None or not tree_out.batch_idx:
            return super().forward(metadata, draft_probs, logits, sampling_metadata)
        out = forward_without_trees(super().forward, self.sampler, metadata, draft_probs, logits,
                                    sampling_metadata, tree_out.batch_idx)
        tree_out.write(out)
        return out
