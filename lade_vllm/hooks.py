"""The two classes vLLM's runner uses for lade (lade_vllm.adapter.runtime builds the sampler):

- ``LadeProposer``: the ``custom_class`` drafter (``speculative_config.model``). vLLM 0.32 builds it
  in ``GPUModelRunner.__init__`` and calls ``propose(...)`` after each step's bookkeeping
  (``GPUModelRunner.propose_draft_token_ids``); it forwards to the runner's ``LadeDriver``.
- ``LadeRejectionSampler``: built in place of ``GPUModelRunner.rejection_sampler``. Tree requests are verified by
  the driver (lookahead tree verification, exact for greedy and sampled requests); vLLM's own
  ``Sampler`` samples every other request (requests lade does not speculate: penalties, bad
  words, ...) exactly as in a step without speculation.
"""
from __future__ import annotations

from vllm.v1.sample.rejection_sampler import RejectionSampler

from lade_vllm.config import LadeConfig
from lade_vllm.sampling import sample_root_rows


class LadeProposer:
    """vLLM custom_class drafter for lade. Holds no model; the runner attaches a LadeDriver."""

    def __init__(self, vllm_config):
        extra = vllm_config.additional_config or {}
        self.cfg = LadeConfig.from_user(extra.get("lade", "lade"))
        self.driver = None  # set by the GPUModelRunner.__init__ patch once the runner is built

    def load_model(self, *args, **kwargs) -> None:  # vLLM CPU calls this unconditionally
        return None

    def propose(self, sampled_token_ids, num_tokens_no_spec, token_ids_cpu, slot_mappings=None):
        if self.driver is None:
            return [[] for _ in sampled_token_ids]
        return self.driver.propose(sampled_token_ids, num_tokens_no_spec)


class LadeRejectionSampler(RejectionSampler):
    """Replaces vLLM 0.32's ``RejectionSampler`` (``v1/sample/rejection_sampler.py``).

    ``forward``: (1) the driver verifies the tree requests from the raw logits (per-node targets,
    lookahead commit, KV move, ``LadeDriver.verify``); (2) vLLM's plain ``Sampler.forward`` samples
    one token per request from its root row (``sampling.sample_root_rows``), so every request lade
    does not verify gets exactly vanilla's token and logprobs; (3) the tree requests' rows of
    ``sampled_token_ids`` and ``logprobs_tensors`` are written from the verification
    (``TreeOutput.write``)."""

    def __init__(self, sampler, driver, spec_config=None, device=None):
        super().__init__(sampler, spec_config, device)
        self.driver = driver

    def forward(self, metadata, draft_probs, logits, sampling_metadata):
        driver = self.driver
        tree_out = None
        if driver is not None and driver.plan is not None:
            tree_out = driver.verify(metadata, logits, sampling_metadata, self.sampler)
        out = sample_root_rows(self.sampler, metadata, logits, sampling_metadata)
        if tree_out is not None:
            tree_out.write(out)
        return out
