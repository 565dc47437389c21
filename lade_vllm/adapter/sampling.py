"""Per-node targets and per-token logprobs for lookahead tree verification under vLLM's sampling
(the adapter's half of verification; acceptance itself is lade_vllm.engine / lade_vllm.proposer.verify).

Tree verification (``lade_vllm.proposer.verify``) needs one target token per tree node: the argmax
for greedy requests, and for sampled requests an INDEPENDENT sample from the distribution vLLM's
own (non-speculative) sampler would sample from at that node. With those targets the rule "follow
the child whose token equals its parent's target, emit the target of the last accepted node" emits
tokens with exactly the target distribution (proof in the verify module docstring).

The distribution is built the way vLLM 0.32's ``Sampler`` does for an eligible request
(``vllm/v1/sample/sampler.py``: ``Sampler.forward`` -> ``Sampler.sample``):

1. logits in float32, then ``Sampler.apply_logits_processors``'s steps on every node row, before
   the argmax too (``token_rules.apply_token_rules``): allowed_token_ids, bad words, min_tokens, logit
   bias, penalties, with a node's generated tokens = committed output + its path and its output
   position = len(output) + its depth (structured output: the grammar's bitmask is already on
   the logits, one row per tree node, ``lade_vllm.adapter.structured``);
2. temperature: ``Sampler.apply_temperature`` (greedy rows divided by 1);
3. min_p: the formula of ``MinPLogitsProcessor.apply`` (``v1/sample/logits_processor/builtin.py``),
   applied per node row with the request's min_p;
4. top-k / top-p: ``apply_top_k_top_p`` (``v1/sample/ops/topk_topp_sampler.py``), the same masking
   function vLLM's CPU and native samplers call;
5. one draw per node row with the noise vLLM's sampler uses for one token: on CPU
   (``TopKTopPSampler.forward_cpu``) one seed per row and ``torch.ops._C.fused_gumbel_argmax``,
   elsewhere the exponential race ``argmax(softmax / q)`` (``random_sample``). A row at depth d
   uses the noise of the output position d steps ahead; a seeded request draws those positions'
   noise from its ``torch.Generator`` (``SamplingMetadata.generators``) in order and is rewound to
   the emitted positions after acceptance, so its text equals vanilla's for the same seed.

vLLM 0.32 refuses min_p and logit_bias requests whenever speculation is configured
(``SamplingParams._validate_spec_decode``) and then builds only the MinTokens processor
(``build_logitsprocs``); under lade, the patch records of lade_vllm.adapter (``SamplingParams._validate_spec_decode``, ``build_logitsprocs``) admit them and builds vLLM's
builtin processors, so every row vLLM's own ``Sampler`` samples (a request's first token, steps
without a tree, requests lade does not speculate) honours them as without speculation, and the
tree rows get the same two operations per node here.

Logprobs: vLLM's ``RejectionSampler._get_logprobs_tensors`` reads the logits row at position j of a
request's rows for its j-th output token, which is right for a chain but not for a tree (output
token j comes from the root row for j = 0, else from the row of accepted node j-1). ``TreeOutput``
recomputes those entries from the right rows, with the same ``compute_logprobs`` /
``gather_logprobs`` functions and the engine's ``logprobs_mode``.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Collection

import numpy as np
import torch
from vllm.v1.sample.sampler import _SAMPLING_EPS

from lade_vllm.adapter.token_rules import (RequestRows, expand_rows, logit_bias_of, min_tokens_of,
                                           apply_token_rules, needs_paths, process_logits)

ARGMAX_ROWS = 8   # rows cast to float32 at a time for row_argmax (a small buffer stays in cache)
_ARGMAX_BUF: dict[int, torch.Tensor] = {}   # row width -> [ARGMAX_ROWS, width] float32


def root_rows(metadata) -> list[int]:
    """[B]: each request's first logits row (its root) in a spec-decode step. vLLM 0.32's
    ``cu_num_sampled_tokens`` is the cumulative sum of ``num_draft_tokens + 1``
    (``GPUModelRunner._calc_spec_decode_metadata``); computed here from the host list, so no
    device-to-host copy of the tensor is needed."""
    drafts = metadata.num_draft_tokens
    return list(itertools.accumulate((n + 1 for n in drafts[:-1]), initial=0)) if drafts else []


@dataclass
class SeededStream:
    """A seeded request's generator during one tree step: ``states[k]`` is the generator after
    the noise of k output positions was drawn (``states[0]``: before the step)."""
    gen: torch.Generator
    states: list

    def rewind(self, num_emitted: int) -> None:
        """Leave the generator after the positions actually emitted: the noise drawn for deeper
        positions is drawn again, for the same positions, by the next step."""
        self.gen.set_state(self.states[num_emitted])


def noise_kind(sampler) -> str:
    """How vLLM's sampler draws one token's noise: ``"fused"`` (vLLM CPU's ``forward_cpu``: one
    seed from the generator, Gumbel noise by ``torch.ops._C.fused_gumbel_argmax``), else the
    exponential race with float32 or float64 noise (``random_sample``)."""
    tts = getattr(sampler, "topk_topp_sampler", None)
    fp64 = bool(getattr(tts, "use_fp64_gumbel", False))
    if getattr(getattr(tts, "forward", None), "__name__", "") == "forward_cpu" and not fp64:
        return "fused"
    return "float64" if fp64 else "float32"


def sample_rows(x: torch.Tensor, reqs: list[RequestRows], generators: dict,
                depths: torch.Tensor, kind: str = "float32"
                ) -> tuple[torch.Tensor, dict[int, SeededStream]]:
    """One draw per row of processed logits ``x`` [M, V] (the rows of ``reqs``, concatenated).

    A row at tree depth d samples the output position d steps after the request's next one, with
    that position's noise: rows at one depth share it. Only one row per depth can lie on the
    accepted path, and the noise of position d is independent of what decided the path up to d,
    so every emitted token is an exact sample (lade_vllm.proposer.verify). A seeded request draws
    the noise of its positions from its generator in order, exactly as vLLM's sampler draws one
    token's noise per step (``kind``, see :func:`noise_kind`); the returned streams are rewound to
    the emitted positions after acceptance, so the request's text does not depend on its trees.
    Returns (tokens [M], {batch index: SeededStream})."""
    M, V = x.shape
    depths = torch.as_tensor(depths, dtype=torch.long)
    fused = kind == "fused"
    if fused:
        seeds = torch.randint(0, 2**31, (M,), dtype=torch.long)
    else:
        probs = x.softmax(dim=-1, dtype=torch.float32)
        q = torch.empty(probs.shape, dtype=torch.float64 if kind == "float64" else torch.float32,
                        device=probs.device)
        q.exponential_()
    streams: dict[int, SeededStream] = {}
    lo = 0
    for r in reqs:
        gen = generators.get(r.batch_idx)
        if gen is not None:
            d = depths[lo:lo + r.num]
            stream = streams[r.batch_idx] = SeededStream(gen, [gen.get_state()])
            if fused:
                per = torch.empty(int(d.max()) + 1, dtype=torch.long)
                for k in range(per.numel()):
                    per[k] = torch.randint(0, 2**31, (1,), generator=gen, dtype=torch.long).item()
                    stream.states.append(gen.get_state())
                seeds[lo:lo + r.num] = per[d]
            else:
                per = torch.empty((int(d.max()) + 1, V), dtype=q.dtype, device=q.device)
                for k in range(per.shape[0]):
                    per[k].exponential_(generator=gen)
                    stream.states.append(gen.get_state())
                q[lo:lo + r.num] = per[d.to(q.device)]
        lo += r.num
    if fused:
        return torch.ops._C.fused_gumbel_argmax(x.to(torch.float32).contiguous(), seeds), streams
    return row_argmax(probs.div_(q)), streams


def row_argmax(x: torch.Tensor) -> torch.Tensor:
    """Per-row argmax of ``x`` [M, V]: the first index of each row's maximum, as ``argmax`` (NaN
    counts as the maximum in both). On the CPU numpy's vectorized argmax over float32 rows
    (other dtypes cast exactly, ARGMAX_ROWS rows at a time) is ~9x faster than torch's
    reductions, which scan a vocabulary-sized row at ~1 ns per element (measured 6 x 49152
    bf16: 64 vs 189 us; float32: 26 vs 166 us); elsewhere ``max(dim=-1).indices``."""
    if x.device.type != "cpu" or x.dim() != 2 or x.requires_grad:
        return x.max(dim=-1).indices
    if x.dtype == torch.float32:
        return torch.from_numpy(x.numpy().argmax(axis=-1))
    if x.dtype == torch.bfloat16 and x.is_contiguous():
        out = _bf16_argmax(x)
        if out is not None:
            return out
    rows = x.shape[0]
    out = np.empty(rows, dtype=np.int64)
    buf = _ARGMAX_BUF.get(x.shape[1])
    if buf is None:   # kept: a fresh buffer of this size would be page-faulted in every call
        buf = _ARGMAX_BUF[x.shape[1]] = torch.empty((ARGMAX_ROWS, x.shape[1]))
    for lo in range(0, rows, ARGMAX_ROWS):
        part = x[lo:lo + ARGMAX_ROWS]
        b = buf[:part.shape[0]]
        b.copy_(part)
        out[lo:lo + part.shape[0]] = b.numpy().argmax(axis=-1)
    return torch.from_numpy(out)


_BF16_NEG_INF = -32641   # bfloat16 -inf (0xFF80) under _bf16_argmax's order-preserving map
_BF16_POS_INF = 0x7F80   # bfloat16 +inf; patterns above it are NaNs
_BF16_NEG_NAN_BELOW = 0xFF80   # unsigned patterns above -inf (0xFF80) are NaNs with the sign bit


def _bf16_argmax(x: torch.Tensor) -> torch.Tensor | None:
    """Row argmax of a contiguous bfloat16 [M, V] through its bits: an int16 map that orders as
    the values do (non-negative patterns as they are, negative ones with the magnitude bits
    flipped, -0 and +0 equal), so numpy's int16 argmax gives the first maximum. None when a row
    holds a NaN with the sign bit set (it would order below -inf; NaN counts as the maximum)."""
    a = x.view(torch.int16).numpy()
    if a.size == 0:
        return None
    # a row whose maximum is positive and finite (a model's logits, nearly always) is its raw
    # int16 argmax, negative patterns lying below every positive one: two vectorized passes
    # (no NaN with the sign bit anywhere, the argmax), no row-sized temporaries
    if int(a.view(np.uint16).max()) <= _BF16_NEG_NAN_BELOW:
        k = a.argmax(axis=-1)
        top = a[np.arange(a.shape[0]), k]
        if bool(((top > 0) & (top <= _BF16_POS_INF)).all()):
            return torch.from_numpy(k)
    neg = a >> 15                                    # -1 for negative patterns, else 0
    k = a ^ (neg & 0x7FFF)
    k -= neg                                         # -0 (0x8000 -> -1) up to 0, in step
    if int(k.min()) < _BF16_NEG_INF:
        return None
    return torch.from_numpy(k.argmax(axis=-1))


@dataclass
class NodeTargets:
    argmax: torch.Tensor                 # [M] greedy token per row
    target: torch.Tensor                 # [M] argmax (greedy rows) or an independent sample
    sampled: torch.Tensor                # [M] bool, row belongs to a sampled request
    processed: torch.Tensor | None       # [M, V] processed logits (processed logprobs modes)
    streams: dict = field(default_factory=dict)  # batch index -> SeededStream (seeded requests)


def node_targets(logits: torch.Tensor, reqs: list[RequestRows], sampling_metadata,
                 min_p_of: list[float], keep_processed: bool = False,
                 need_sample: torch.Tensor | None = None, depths=None,
                 kind: str = "float32", paths: list[list[int]] | None = None) -> NodeTargets:
    """Targets for every logits row of the tree requests ``reqs`` (rows concatenated in order).
    ``depths`` [M]: each row's depth in its tree (rows at one depth share the noise of one output
    position, :func:`sample_rows`); ``kind``: vLLM's noise (:func:`noise_kind`); ``paths``: per
    row the drafted tokens leading to its node (when :func:`needs_paths`).

    ``need_sample`` [M] bool: rows of sampled requests whose target verification reads (the root
    and the trie); the others keep the argmax (window nodes: their targets only feed the pool),
    which saves the top-k/top-p work there."""
    sm = sampling_metadata
    biases = logit_bias_of(sm)
    min_toks = {i: e for i, e in min_tokens_of(sm).items() if len(e[1]) < e[0]}
    rules = bool(biases) or bool(min_toks) or needs_paths(sm) \
        or sm.allowed_token_ids_mask is not None
    if sm.all_greedy and not rules and not keep_processed:
        # argmax straight on the model-dtype rows (the fp32 cast is exact and monotone)
        argmax = row_argmax(logits[reqs[0].start:reqs[0].start + reqs[0].num]) if len(reqs) == 1 \
            else torch.cat([row_argmax(logits[r.start:r.start + r.num]) for r in reqs])
        argmax = argmax.cpu()
        return NodeTargets(argmax, argmax, torch.zeros(argmax.shape[0], dtype=torch.bool), None)
    idx = torch.cat([torch.arange(r.start, r.start + r.num) for r in reqs]).to(logits.device)
    x = logits.index_select(0, idx).to(torch.float32)          # a copy: logits stay untouched
    if rules:    # before the argmax: greedy targets follow them too, as in vLLM's Sampler
        x = apply_token_rules(x, reqs, sm, biases, paths, min_toks, depths)
    argmax = row_argmax(x)
    M = x.shape[0]
    if sampling_metadata.all_greedy:
        return NodeTargets(argmax.cpu(), argmax.cpu(), torch.zeros(M, dtype=torch.bool),
                           x if keep_processed else None)
    temp = expand_rows(sampling_metadata.temperature, reqs)
    req_sampled = temp >= _SAMPLING_EPS
    sampled = req_sampled if need_sample is None else req_sampled & need_sample
    if not bool(sampled.any()) and not keep_processed:
        return NodeTargets(argmax.cpu(), argmax.cpu(), req_sampled, None)
    target = argmax.clone()
    per_req = _per_req(req_sampled, reqs)
    counts = torch.tensor([r.num for r in reqs])
    req_of_row = torch.arange(len(reqs)).repeat_interleave(counts)
    rows = sampled.nonzero()[:, 0]
    # the sampled rows, grouped by request (contiguous, in request order)
    rand_reqs = []
    row_req = req_of_row[rows]
    for q, r in enumerate(reqs):
        if per_req[q]:
            m = int((row_req == q).sum())
            if m:
                rand_reqs.append(RequestRows(r.batch_idx, r.start, m))
    min_p_rand = [min_p_of[q] for q in range(len(reqs)) if per_req[q] and
                  int((row_req == q).sum())]
    rows = rows.to(x.device)
    if keep_processed:   # every row processed (greedy rows at temperature 1, like vLLM)
        x = process_logits(x, reqs, sampling_metadata, min_p_of)
        xr = x.index_select(0, rows)
    elif rand_reqs:      # only the sampled requests' rows
        xr = process_logits(x.index_select(0, rows), rand_reqs, sampling_metadata, min_p_rand)
    streams = {}
    if rand_reqs:
        d = torch.as_tensor(depths, dtype=torch.long)[rows.cpu()]
        tok, streams = sample_rows(xr, rand_reqs, sampling_metadata.generators, d, kind)
        target[rows] = tok.to(target.dtype)
    return NodeTargets(argmax.cpu(), target.cpu(), req_sampled, x if keep_processed else None,
                       streams)


def _per_req(row_flag: torch.Tensor, reqs: list[RequestRows]) -> list[bool]:
    out, lo = [], 0
    for r in reqs:
        out.append(bool(row_flag[lo]))
        lo += r.num
    return out


@dataclass
class TreeOutput:
    """The verified tokens of this step's tree requests, written into vLLM's ``SamplerOutput``
    after vLLM's own ``RejectionSampler.forward`` has filled the other rows."""
    batch_idx: list[int] = field(default_factory=list)
    tokens: list[list[int]] = field(default_factory=list)
    # logprobs of every emitted token (flattened over tree requests), or None
    logprobs: object | None = None
    seeded: list[int] = field(default_factory=list)   # requests sampled from their generators

    def write(self, out) -> None:
        sampled = out.sampled_token_ids
        S = sampled.shape[1]
        flat = []
        for i, toks in zip(self.batch_idx, self.tokens):
            sampled[i, :] = -1
            sampled[i, :len(toks)] = torch.tensor(toks, dtype=sampled.dtype)
            flat.extend(i * S + j for j in range(len(toks)))
        lt = out.logprobs_tensors
        if self.logprobs is not None and lt is not None:
            at = torch.tensor(flat, dtype=torch.long, device=lt.logprobs.device)
            lt.logprob_token_ids[at] = self.logprobs.logprob_token_ids.to(
                lt.logprob_token_ids.dtype)
            lt.logprobs[at] = self.logprobs.logprobs.to(lt.logprobs.dtype)
            lt.selected_token_ranks[at] = self.logprobs.selected_token_ranks.to(
                lt.selected_token_ranks.dtype)


def emitted_logprobs(sampler, logits: torch.Tensor, processed: torch.Tensor | None,
                     rows: list[int], processed_rows: list[int], tokens: list[int],
                     max_num_logprobs: int):
    """``LogprobsTensors`` of ``tokens`` emitted from logits rows ``rows`` (``processed_rows``
    index ``processed`` for the processed modes), as vLLM's ``Sampler.forward`` computes them for
    a one-token step: raw modes from the raw logits, processed modes from the processed ones."""
    mode = sampler.logprobs_mode
    if mode in ("processed_logits", "processed_logprobs"):
        x = processed.index_select(0, torch.tensor(processed_rows, device=processed.device))
    else:
        x = logits.index_select(0, torch.tensor(rows, device=logits.device)).to(torch.float32)
    lp = x if mode in ("raw_logits", "processed_logits") else sampler.compute_logprobs(x)
    return sampler.gather_logprobs(lp, max_num_logprobs,
                                   torch.tensor(tokens, dtype=torch.int64, device=lp.device))


def sample_root_rows(sampler, metadata, logits: torch.Tensor, sampling_metadata,
                     sampled_by_tree: Collection[int] = ()):
    """vLLM's own plain sampling step over ONE logits row per request: the row of its last
    committed token (for a tree request the root; for any other request its only row, or the
    first row of a chain lade did not propose). This is ``Sampler.forward`` exactly as a step
    without speculation runs it (penalties, bad words, logit bias, min_tokens, min_p, allowed
    token ids, logprobs: all vLLM's), so every request lade does not verify gets vanilla's token;
    the tree requests' rows are then overwritten by ``TreeOutput.write``.

    vLLM's chain ``RejectionSampler`` is never used: it would read a tree as a chain, repeat the
    top-k/top-p work over every tree node, ignore min_p and logit bias on draft rows, and (0.32)
    fails on zero draft rows with top-k (``apply_top_k_only``). The result is laid out as
    ``[B, metadata.max_spec_len + 1]`` like the rejection sampler's, logprobs included."""
    from dataclasses import replace

    dev = logits.device
    B = len(metadata.num_draft_tokens)
    S = metadata.max_spec_len + 1
    roots = torch.tensor(root_rows(metadata), dtype=torch.long, device=dev)
    sm = sampling_metadata
    if sm.logprob_token_ids and sm.max_num_logprobs is not None:
        sm = replace(sm, logprob_token_ids=None)   # as vLLM's spec path: top-k logprobs only
    if any(i in sm.generators for i in sampled_by_tree):
        # the tree sampled these requests' tokens from their generators; their root rows here
        # are overwritten, so they must not draw from the generators again
        sm = replace(sm, generators={i: g for i, g in sm.generators.items()
                                     if i not in sampled_by_tree})
    out = sampler(logits=logits.index_select(0, roots), sampling_metadata=sm)
    sampled = out.sampled_token_ids                                            # [B, 1]
    full = torch.full((B, S), -1, dtype=sampled.dtype, device=sampled.device)
    full[:, :1] = sampled
    lt = out.logprobs_tensors
    if lt is not None and S > 1:
        at = torch.arange(B, device=lt.logprobs.device) * S

        def spread(x):
            y = x.new_zeros((B * S,) + tuple(x.shape[1:]))
            y[at] = x
            return y

        lt = type(lt)(spread(lt.logprob_token_ids), spread(lt.logprobs),
                      spread(lt.selected_token_ranks))
    return replace(out, sampled_token_ids=full, logprobs_tensors=lt)
