"""The logits processing of vLLM 0.32's ``Sampler`` applied to every node row of lookahead trees:
the per-token rules (allowed_token_ids, bad words, min_tokens, logit bias, penalties; a node's
context is the committed output plus its path) and temperature / min_p / top-k / top-p. Steps
1-4 of ``lade_vllm.adapter.sampling``'s docstring; the draws and the targets are there."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from vllm.v1.sample.logits_processor import LogitBiasLogitsProcessor, MinTokensLogitsProcessor
from vllm.v1.sample.ops.bad_words import apply_bad_words
from vllm.v1.sample.ops.penalties import apply_all_penalties
from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p
from vllm.v1.sample.sampler import Sampler


@dataclass
class RequestRows:
    """Logits rows of one tree request inside this step's logits tensor."""
    batch_idx: int      # row of the request in vLLM's input batch
    start: int          # first logits row (the root's)
    num: int            # rows = scheduled tree nodes incl. the root


def _row_batch_idx(reqs: list[RequestRows]) -> torch.Tensor:
    """[M] the batch index of each row of ``reqs`` (rows concatenated in order)."""
    return torch.tensor([r.batch_idx for r in reqs], dtype=torch.long).repeat_interleave(
        torch.tensor([r.num for r in reqs], dtype=torch.long))


def expand_rows(per_req: torch.Tensor, reqs: list[RequestRows]) -> torch.Tensor:
    """A per-request tensor of vLLM's batch, one entry per row of ``reqs``."""
    return per_req.cpu()[_row_batch_idx(reqs)]


def logit_bias_of(sampling_metadata) -> dict:
    """{batch index: {token id: bias}} as vLLM's ``LogitBiasLogitsProcessor`` holds it this step
    (built under lade by the ``build_logitsprocs`` record, lade_vllm.adapter.runtime), or {} when there is none."""
    procs = getattr(sampling_metadata, "logitsprocs", None)
    for proc in (procs.non_argmax_invariant if procs is not None else ()):
        if isinstance(proc, LogitBiasLogitsProcessor):
            return proc.biases
    return {}


def min_tokens_of(sampling_metadata) -> dict:
    """{batch index: (min_tokens, output token ids, stop token ids, uses structured output)} as
    vLLM's ``MinTokensLogitsProcessor`` holds it this step (``min_toks``), or {} when none."""
    procs = getattr(sampling_metadata, "logitsprocs", None)
    for proc in (procs.non_argmax_invariant if procs is not None else ()):
        if isinstance(proc, MinTokensLogitsProcessor):
            return proc.min_toks
    return {}


def apply_min_tokens(x: torch.Tensor, reqs: list[RequestRows], min_toks: dict,
                     depths) -> torch.Tensor:
    """``MinTokensLogitsProcessor`` on every node row of ``reqs`` (rows concatenated in order), in
    place: a row at tree depth d is the request's output position len(output) + d, so its stop
    tokens (EOS and stop_token_ids, the processor's set) are masked while len(output) + d <
    min_tokens, as ``apply_with_spec_decode`` masks the first min_tokens - len(output) positions
    of a chain. For a structured-output request the processor's exception holds too: a row that
    the masking (after the grammar's bitmask) leaves all -inf gets its stop tokens back."""
    rows, toks, restore = [], [], []
    lo = 0
    d_all = np.asarray(depths, dtype=np.int64)
    for r in reqs:
        entry = min_toks.get(r.batch_idx)
        if entry is not None and entry[2]:
            min_tok, out_ids, stop_ids = entry[0], entry[1], list(entry[2])
            at = lo + np.nonzero(len(out_ids) + d_all[lo:lo + r.num] < min_tok)[0]
            rows.extend(np.repeat(at, len(stop_ids)).tolist())
            toks.extend(stop_ids * len(at))
            if len(entry) > 3 and entry[3]:
                restore.extend(range(len(rows) - len(at) * len(stop_ids), len(rows)))
        lo += r.num
    if rows:
        at = (torch.tensor(rows, device=x.device), torch.tensor(toks, device=x.device))
        kept = x[at] if restore else None
        x[at] = float("-inf")
        if restore:
            sel = torch.tensor(restore, device=x.device)
            r_rows, r_toks, r_vals = at[0][sel], at[1][sel], kept[sel]
            back = torch.isneginf(x[r_rows]).all(dim=-1) & torch.isfinite(r_vals)
            x[r_rows[back], r_toks[back]] = r_vals[back]
    return x


def apply_logit_bias(x: torch.Tensor, reqs: list[RequestRows], biases: dict) -> torch.Tensor:
    """``LogitBiasLogitsProcessor.apply`` on every node row of ``reqs`` (rows concatenated in
    order): the request's float32 biases added to the float32 logits, in place."""
    rows, toks, vals = [], [], []
    lo = 0
    for r in reqs:
        b = biases.get(r.batch_idx)
        if b:
            for row in range(lo, lo + r.num):
                rows.extend([row] * len(b))
                toks.extend(b.keys())
                vals.extend(b.values())
        lo += r.num
    if rows:
        at = (torch.tensor(rows, device=x.device), torch.tensor(toks, device=x.device))
        x[at] += torch.tensor(vals, dtype=torch.float32, device=x.device)
    return x


def _apply_min_p(x: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """``MinPLogitsProcessor.apply`` with a per-row ``min_p`` [M] (0 = off)."""
    probs = torch.softmax(x, dim=-1)
    threshold = probs.amax(dim=-1, keepdim=True).mul_(min_p[:, None])
    return x.masked_fill_(probs < threshold, -float("inf"))


def process_logits(x: torch.Tensor, reqs: list[RequestRows], sampling_metadata,
                   min_p_of: list[float]) -> torch.Tensor:
    """Steps 2-4 of the module docstring, in place on ``x`` [M, V] float32 (rows of ``reqs``)."""
    temp = expand_rows(sampling_metadata.temperature, reqs).to(x.device)
    x = Sampler.apply_temperature(x, temp, all_random=False)
    counts = [r.num for r in reqs]
    if any(m > 0 for m in min_p_of):
        min_p = torch.tensor(min_p_of, dtype=torch.float32).repeat_interleave(
            torch.tensor(counts)).to(x.device)
        x = _apply_min_p(x, min_p)
    k = None if sampling_metadata.top_k is None else expand_rows(sampling_metadata.top_k, reqs)
    p = None if sampling_metadata.top_p is None else expand_rows(sampling_metadata.top_p, reqs)
    if k is not None:
        k = k.to(x.device)
    if p is not None:
        p = p.to(x.device)
    return apply_top_k_top_p(x, k, p)


def needs_paths(sampling_metadata) -> bool:
    """Whether this step's logits processing reads each node's tokens (penalties, bad words)."""
    return not sampling_metadata.no_penalties or bool(sampling_metadata.bad_words_token_ids)


def apply_token_rules(x: torch.Tensor, reqs: list[RequestRows], sm, biases: dict,
                      paths: list[list[int]] | None, min_toks: dict | None = None,
                      depths=None) -> torch.Tensor:
    """``Sampler.apply_logits_processors`` on every node row of ``reqs``, in vLLM's order:
    allowed_token_ids, bad words, min_tokens, logit bias, then repetition / frequency / presence
    penalties. A node's generated tokens are the request's committed output followed by
    ``paths[row]`` (the drafted tokens from the root's child down to the node), as vLLM's
    rejection sampler builds them for each draft position of a chain; its output position is
    len(output) + ``depths[row]`` (min_tokens, ``min_toks``: :func:`min_tokens_of`)."""
    b_rows = _row_batch_idx(reqs)
    if sm.allowed_token_ids_mask is not None:
        x.masked_fill_(sm.allowed_token_ids_mask.index_select(0, b_rows.to(x.device)),
                       float("-inf"))
    past = None
    if paths is not None:
        past = [sm.output_token_ids[b] + p for b, p in zip(b_rows.tolist(), paths)]
    if sm.bad_words_token_ids:
        apply_bad_words(x, {row: sm.bad_words_token_ids[b] for row, b in enumerate(b_rows.tolist())
                            if b in sm.bad_words_token_ids}, past)
    if min_toks:
        x = apply_min_tokens(x, reqs, min_toks, depths)
    if biases:
        x = apply_logit_bias(x, reqs, biases)
    if not sm.no_penalties:
        on = ((sm.presence_penalties != 0) | (sm.frequency_penalties != 0)
              | (sm.repetition_penalties != 1.0)).cpu()[b_rows]
        rows = on.nonzero()[:, 0]
        if rows.numel():
            b = b_rows[rows].to(x.device)
            at = rows.to(x.device)
            x[at] = apply_all_penalties(
                x.index_select(0, at), sm.prompt_token_ids.index_select(0, b),
                sm.presence_penalties.index_select(0, b), sm.frequency_penalties.index_select(0, b),
                sm.repetition_penalties.index_select(0, b), [past[i] for i in rows.tolist()])
    return x
