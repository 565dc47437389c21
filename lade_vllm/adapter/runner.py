"""lade inside vLLM's model runner: the runner view and the two classes the runner calls.

``install(runner)`` (from the ``GPUModelRunner.__init__`` patch record, lade_vllm.adapter.runtime)
builds a :class:`LadeRunnerAdapter` around a :class:`lade_vllm.engine.LadeEngine` and gives it to the
drafter and rejection sampler it builds: ``runner.drafter = LadeProposer(adapter)`` and
``runner.rejection_sampler = LadeRejectionSampler(runner.sampler, adapter, ...)``. (vLLM first builds
:class:`LadeDraftSlot`, the class named in ``speculative_config.model``, because its
``create_custom_proposer`` passes nothing but the config.) One engine step, vLLM 0.32:

1. ``LadeProposer.propose`` (vLLM's custom_class drafter call in
   ``GPUModelRunner.propose_draft_token_ids``) -> ``LadeRunnerAdapter.propose``: the batch as plain
   arrays -> ``LadeEngine.propose``: trees; their nodes are the draft tokens.
2. ``LadeRunnerAdapter.before_forward`` (after ``GPUModelRunner._prepare_inputs``): the scheduler
   output as plain maps -> ``LadeEngine.plan``; writes the tree positions into ``runner.positions``,
   keeps the trees' KV slots and publishes the tree layout (``lade_vllm.attention.set_step_layout``).
3. The forward (vLLM's, tree-masked attention for tree requests).
4. ``LadeRejectionSampler.forward`` -> ``LadeRunnerAdapter.verify``: targets per node
   (``lade_vllm.adapter.sampling.node_targets``) -> ``LadeEngine.accept`` -> emit: the tokens and logprobs
   for vLLM's output (``TreeOutput``) and the accepted path's KV moved to p+1..p+a (``KVMover``).

This module imports vLLM (``RejectionSampler``); the engine does not.
"""
from __future__ import annotations

import logging
import time

import numpy as np
import torch
from vllm.v1.sample.rejection_sampler import RejectionSampler

from lade_vllm.adapter.heap import HeapTrim
from lade_vllm.adapter.kv_move import KVMover
from lade_vllm.attention import set_step_layout
from lade_vllm.config import LadeConfig
from lade_vllm.eligibility import is_eligible
from lade_vllm.engine import LadeEngine
from lade_vllm.step_records import Accepted, ProposeBatch, RequestInfo, ScheduledBatch
from lade_vllm.request_options import parse_request_options
from lade_vllm.adapter.sampling import RequestRows, TreeOutput, emitted_logprobs, node_targets, \
    needs_paths, noise_kind, root_rows, sample_root_rows

logger = logging.getLogger("vllm.lade_vllm")  # under vllm: its handler and level


def request_info(sp, cfg: LadeConfig, reasoning: bool = False) -> RequestInfo:
    """A request's RequestInfo from its ``SamplingParams`` (None: not eligible). ``reasoning``:
    the engine has a reasoning parser (structured output then starts after the reasoning)."""
    if sp is None or not is_eligible(sp, cfg, reasoning):
        return RequestInfo(eligible=False)
    min_p = float(getattr(sp, "min_p", 0.0) or 0.0)
    extra = getattr(sp, "extra_args", None)
    if not extra or extra.get("lade") in (None, True):
        return RequestInfo(True, min_p=min_p)
    opts = parse_request_options(extra, cfg)  # dict or its JSON text (HTTP vllm_xargs)
    return RequestInfo(True, opts.window_size, opts.ngram_size, opts.guess_set_size,
                       min_p)


def write_positions(buffer: torch.Tensor, runs) -> None:
    """Write ``runs`` (``(start, positions ndarray)`` per tree request) into the runner's
    positions ``buffer`` with one host-to-device copy of indices and one of values (the buffer is
    on the GPU under CUDA; a copy per request would serialize the host on each)."""
    if not runs:
        return
    idx = np.concatenate([np.arange(start, start + len(pos)) for start, pos in runs])
    val = np.concatenate([np.asarray(pos) for _, pos in runs])
    buffer.index_copy_(0, torch.from_numpy(idx).to(buffer.device),
                       torch.from_numpy(val).to(device=buffer.device, dtype=buffer.dtype))


class _Timed:
    """Adds the time spent inside the ``with`` block to the engine's ``host_seconds``."""

    def __init__(self, stats: dict):
        self.stats = stats

    def __enter__(self):
        self.t0 = time.perf_counter()

    def __exit__(self, *exc):
        self.stats["host_seconds"] += time.perf_counter() - self.t0


class LadeRunnerAdapter:
    """Reads one vLLM model runner for the engine and writes the engine's answers back.

    Also ``runner.lade_driver`` for tests and tools: ``plan`` (non-None while a tree step is
    between ``before_forward`` and ``verify``), ``slot_of``, ``stats``, ``policy``."""

    def __init__(self, runner, engine: LadeEngine):
        self.runner = runner
        self.engine = engine
        self.kv = KVMover(runner)
        self.heap = HeapTrim()   # freed heap back to the system now and then (see heap.py)

    plan = property(lambda self: self.engine.step.plan)
    slot_of = property(lambda self: self.engine.slot_of)
    stats = property(lambda self: self.engine.stats)
    policy = property(lambda self: self.engine.policy)

    def _request_info(self, req_id: str) -> RequestInfo:
        req = self.runner.requests.get(req_id)
        so_cfg = getattr(self.runner.vllm_config, "structured_outputs_config", None)
        return request_info(getattr(req, "sampling_params", None), self.engine.cfg,
                            bool(getattr(so_cfg, "reasoning_parser", "")))

    # ---- 1. propose -------------------------------------------------------------------------
    def propose(self, sampled_token_ids, num_tokens_no_spec, token_ids_cpu) -> list[list[int]]:
        batch = self.runner.input_batch
        self.heap.tick()
        with _Timed(self.engine.stats):
            return self.engine.propose(ProposeBatch(
                req_ids=batch.req_ids, sampled=sampled_token_ids, num_tokens=num_tokens_no_spec,
                token_ids=token_ids_cpu, live=self.runner.requests.keys(),
                num_reqs=batch.num_reqs, info_of=self._request_info))

    # ---- 2. before the forward --------------------------------------------------------------
    def before_forward(self, scheduler_output) -> None:
        with _Timed(self.engine.stats):
            runner, batch = self.runner, self.runner.input_batch
            ctx = self.engine.plan(ScheduledBatch(
                total_tokens=scheduler_output.total_num_scheduled_tokens,
                finished=scheduler_output.finished_req_ids, index_of=batch.req_id_to_index,
                drafts=scheduler_output.scheduled_spec_decode_tokens,
                num_scheduled=scheduler_output.num_scheduled_tokens,
                query_start=runner.query_start_loc.np,
                num_computed=batch.num_computed_tokens_cpu,
                resumed=scheduler_output.scheduled_cached_reqs.resumed_req_ids))
            # data writes into the runner's input buffer: RoPE positions p + depth
            write_positions(runner.positions, ctx.positions)
            if ctx.plan is not None:
                # one slot mapping per KV-cache group (several for hybrid sliding-window models)
                tables = [bt.slot_mapping.gpu for bt in batch.block_table.block_tables]
                for start, n in zip(ctx.plan.query_start, ctx.plan.num_nodes):
                    ctx.plan.slot_mapping.append(torch.stack([t[start:start + n] for t in tables]))
            set_step_layout(ctx.layout)

    def take_window_counts(self) -> dict[str, int]:
        return self.engine.take_window_counts()

    def structured_trees(self) -> dict[str, tuple[list[int], list[int], int]]:
        """The trees just proposed for requests with structured output: request id -> (drafts,
        storage-order parents, trie nodes), for the engine core's grammar bitmask
        (lade_vllm.adapter.structured)."""
        prop = self.engine.pending
        out = {}
        for k, req_id in enumerate(prop.req_ids if prop is not None else ()):
            req = self.runner.requests.get(req_id)
            if getattr(getattr(req, "sampling_params", None), "structured_outputs", None) \
                    is not None:
                out[req_id] = (list(prop.drafts[k]), [int(p) for p in prop.parent[k]],
                               int(prop.num_trie[k]))
        return out

    # ---- 4. verification: targets -> accept -> emit -----------------------------------------
    def verify(self, metadata, logits: torch.Tensor, sampling_metadata, sampler
               ) -> TreeOutput | None:
        """Verify this step's trees from ``logits`` [num_logits, V] (vLLM's rows: per request
        its scheduled nodes in storage order, ``metadata.cu_num_sampled_tokens``) and move the
        accepted path's KV. Returns the tree requests' emitted tokens (and logprobs), which the
        caller writes over vLLM's output rows.

        Per-node targets come from ``lade_vllm.adapter.sampling.node_targets``: argmax for greedy
        requests, an independent sample of the request's processed distribution for sampled
        ones at the root and trie nodes (window nodes keep the argmax: they only feed the pool)."""
        with _Timed(self.engine.stats):
            ctx = self.engine.take_plan()
            set_step_layout(None)
            if ctx is None:
                return None
            roots = root_rows(metadata)
            reqs = [RequestRows(i, int(roots[i]), n)
                    for i, n in zip(ctx.plan.batch_idx, ctx.plan.num_nodes)]
            want_lp = sampling_metadata.max_num_logprobs is not None
            keep_processed = want_lp and sampler.logprobs_mode in ("processed_logits",
                                                                   "processed_logprobs")
            acceptable = self.engine.acceptance_rows(ctx)
            nt = node_targets(logits, reqs, sampling_metadata, self.engine.min_p(ctx),
                              keep_processed, need_sample=acceptable,
                              depths=self.engine.node_depths(ctx), kind=noise_kind(sampler),
                              paths=self.engine.node_paths(ctx)
                              if needs_paths(sampling_metadata) else None)
            acc = self.engine.accept(ctx, nt.target, nt.sampled, acceptable)
            for r, emitted in zip(reqs, acc.emitted):   # seeded: next step's noise continues here
                if r.batch_idx in nt.streams:
                    nt.streams[r.batch_idx].rewind(len(emitted))
            out = self._emit(ctx, acc, reqs, logits, nt.processed, sampling_metadata, sampler)
            out.seeded = list(nt.streams)
            return out

    def _emit(self, ctx, acc: Accepted, reqs, logits, processed, sampling_metadata, sampler
              ) -> TreeOutput:
        plan = ctx.plan
        out = TreeOutput(batch_idx=list(plan.batch_idx), tokens=acc.emitted)
        if acc.moves:
            src = [plan.slot_mapping[j][:, s] for j, s, _ in acc.moves]
            dst = [plan.slot_mapping[j][:, d] for j, _, d in acc.moves]
            self.kv.move(torch.stack(src, 1), torch.stack(dst, 1))
        if sampling_metadata.max_num_logprobs is not None:
            offsets = np.concatenate([[0], np.cumsum(plan.num_nodes)[:-1]]).astype(np.int64)
            rows, prows, tokens = [], [], []
            for j, path in enumerate(acc.paths):
                rows += [reqs[j].start] + [reqs[j].start + s for s in path]
                prows += [int(offsets[j])] + [int(offsets[j]) + s for s in path]
                tokens += acc.emitted[j]
            out.logprobs = emitted_logprobs(sampler, logits, processed, rows, prows, tokens,
                                            sampling_metadata.max_num_logprobs)
        return out


class LadeProposer:
    """lade's drafter (``runner.drafter``): vLLM's custom_class ``propose`` call, answered by the
    adapter's engine. Holds no model."""

    def __init__(self, adapter: LadeRunnerAdapter):
        self.adapter = adapter
        self.cfg = adapter.engine.cfg

    def load_model(self, *args, **kwargs) -> None:  # vLLM CPU calls this unconditionally
        return None

    def propose(self, sampled_token_ids, num_tokens_no_spec, token_ids_cpu, slot_mappings=None):
        return self.adapter.propose(sampled_token_ids, num_tokens_no_spec, token_ids_cpu)


class LadeDraftSlot(LadeProposer):
    """The class named in ``speculative_config.model``: vLLM's ``create_custom_proposer`` builds
    it from the config alone; ``install`` replaces it with a :class:`LadeProposer` on the runner's
    adapter. Proposes nothing if it is ever asked."""

    def __init__(self, vllm_config):
        self.adapter = None

    def propose(self, sampled_token_ids, *args, **kwargs):
        return [[] for _ in sampled_token_ids]


class LadeRejectionSampler(RejectionSampler):
    """``runner.rejection_sampler`` under lade, in place of vLLM 0.32's ``RejectionSampler``
    (``vllm.v1.sample.rejection_sampler``).

    ``forward``: (1) the adapter verifies the tree requests from the raw logits
    (``LadeRunnerAdapter.verify``); (2) vLLM's plain ``Sampler.forward`` samples one token per
    request from its root row (``sampling.sample_root_rows``), so every request lade does not verify
    gets exactly vanilla's token and logprobs; (3) the tree requests' rows of ``sampled_token_ids``
    and ``logprobs_tensors`` are written from the verification (``TreeOutput.write``)."""

    def __init__(self, sampler, adapter: LadeRunnerAdapter, spec_config=None, device=None):
        super().__init__(sampler, spec_config, device)
        self.adapter = adapter

    def forward(self, metadata, draft_probs, logits, sampling_metadata):
        adapter = self.adapter
        tree_out = None
        if adapter.plan is not None:
            tree_out = adapter.verify(metadata, logits, sampling_metadata, self.sampler)
        out = sample_root_rows(self.sampler, metadata, logits, sampling_metadata,
                               tree_out.seeded if tree_out is not None else ())
        if tree_out is not None:
            tree_out.write(out)
        return out


def install(runner, cfg: LadeConfig) -> LadeRunnerAdapter:
    """Give ``runner`` (a built ``GPUModelRunner``) lade's drafter and rejection sampler."""
    # sliding-window models: trees only while the whole sequence fits inside the window (the
    # window then masks nothing); longer requests decode normally through vLLM's kernel
    window = runner.model_config.get_sliding_window()
    engine = LadeEngine(cfg, max_seqs=2 * runner.input_batch.max_num_reqs,
                        max_tree_len=(int(window) - 2 - cfg.max_draft_nodes) if window else None,
                        vocab_size=runner.model_config.get_vocab_size())
    adapter = LadeRunnerAdapter(runner, engine)
    runner.drafter = LadeProposer(adapter)
    runner.rejection_sampler = LadeRejectionSampler(runner.sampler, adapter,
                                                    runner.speculative_config, runner.device)
    runner.lade_driver = adapter
    logger.info("lade: lookahead decoding enabled (%s)", cfg)
    return adapter
