"""Attention with log-sum-exp and LSE merging, in pure torch (no vLLM import).

This is the math of the CUDA tree-attention path
(:mod:`lade_vllm.attention.cuda_tree`): a tree query row attends to the
already-computed prefix ``[0, p)`` (all of it) and to the tree-visible new
tokens of its own step. Softmax over a union of two disjoint key sets splits
exactly::

    attn(q, K_prefix ++ K_tree, mask) = merge(
        attn(q, K_prefix)          -> (o_a, lse_a),   # FlashAttention, paged, non-causal
        attn(q, K_tree, tree_mask) -> (o_b, lse_b),   # attention_with_lse below
    )

    merge: m = max(lse_a, lse_b)
           o = (o_a * exp(lse_a - m) + o_b * exp(lse_b - m))
               / (exp(lse_a - m) + exp(lse_b - m))
           lse = m + log(exp(lse_a - m) + exp(lse_b - m))

LSE layout: **[H, N]** (heads first), natural log, float32 -- the convention of
vLLM's ``merge_attn_states`` (``v1/attention/ops/merge_attn_states.py``, the
``prefix_lse`` / ``suffix_lse`` args are ``[NUM_HEADS, NUM_TOKENS]``) and of
``flash_attn_varlen_func(..., return_softmax_lse=True)`` (``softmax_lse`` is
``(nheads, total_q)``, ``vllm_flash_attn/flash_attn_interface.py``; see also
the comment "FA returns LSE in shape [ H, B ]" in ``flash_attn.py``).

A row with no visible key has LSE ``-inf`` and output 0 here. FlashAttention
reports such rows (``seqused_k == 0``) with LSE ``+inf`` instead;
:func:`merge_attention_states` treats any infinite LSE as "no keys", exactly
like vLLM's ``_merge_attn_states_torch`` and its CUDA kernel, so either
convention merges correctly.
"""

from __future__ import annotations

import torch

__all__ = ["attention_with_lse", "merge_attention_states"]


def _check_shapes(q, k, v, allowed) -> None:
    """Raise ValueError unless q/k/v/allowed fit :func:`attention_with_lse`'s contract."""
    if q.dim() < 3 or k.dim() != q.dim() or v.dim() != q.dim():
        raise ValueError(
            f"expected q/k/v with the same rank >= 3, got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    batch = q.shape[:-3]
    N, H, d = q.shape[-3:]
    L, KVH, dk = k.shape[-3:]
    dv = v.shape[-1]
    if k.shape[:-3] != batch or v.shape[:-3] != batch:
        raise ValueError(
            f"batch dims differ: q {tuple(q.shape)}, k {tuple(k.shape)}, "
            f"v {tuple(v.shape)}"
        )
    if dk != d or v.shape[-3:-1] != (L, KVH):
        raise ValueError(
            f"shape mismatch: q {tuple(q.shape)}, k {tuple(k.shape)}, "
            f"v {tuple(v.shape)}"
        )
    if KVH == 0 or H % KVH != 0:
        raise ValueError(f"num_heads {H} not a multiple of num_kv_heads {KVH}")
    if tuple(allowed.shape) != (*batch, N, L):
        raise ValueError(
            f"allowed has shape {tuple(allowed.shape)}, expected "
            f"{(*batch, N, L)}"
        )


def attention_with_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    allowed: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked softmax attention returning the output and its log-sum-exp.

    Leading batch dimensions ``*B`` are optional (the same on all inputs);
    the CUDA path uses ``B = (R,)``, one slice per tree request.

    Args:
        q: ``[*B, N, H, d]`` queries.
        k: ``[*B, L, KVH, d]`` keys; ``H`` must be a multiple of ``KVH``
            (query head ``h`` uses kv head ``h // (H // KVH)``, the vLLM/FA
            GQA convention).
        v: ``[*B, L, KVH, dv]`` values.
        allowed: ``[*B, N, L]`` bool; ``allowed[..., i, j]``: query i sees key j.
        scale: softmax scale applied to ``q @ k``.

    Returns:
        ``(out, lse)``: ``out`` ``[*B, N, H, dv]`` in ``q.dtype`` (computed in
        float32); ``lse`` ``[*B, H, N]`` float32, natural log of
        ``sum_j exp(scale * q_i . k_j)`` over allowed j. Rows with no allowed
        key get ``out = 0`` and ``lse = -inf`` (never NaN). ``L = 0`` is
        allowed (every row empty).
    """
    _check_shapes(q, k, v, allowed)
    batch = q.shape[:-3]
    N, H, d = q.shape[-3:]
    L, KVH = k.shape[-3:-1]
    dv = v.shape[-1]
    g = H // KVH
    B = 1
    for s in batch:
        B *= s

    # [B, KVH, g*N, d]; head h = kvh * g + gi.
    qf = (q.reshape(B, N, KVH, g, d).permute(0, 2, 3, 1, 4)
          .reshape(B, KVH, g * N, d).float())
    kf = k.reshape(B, L, KVH, d).permute(0, 2, 1, 3).float()  # [B, KVH, L, d]
    vf = v.reshape(B, L, KVH, dv).permute(0, 2, 1, 3).float()  # [B, KVH, L, dv]

    scores = torch.matmul(qf, kf.transpose(-1, -2)).mul_(scale)  # [B,KVH,g*N,L]
    scores = scores.view(B, KVH, g, N, L)
    mask = allowed.reshape(B, 1, 1, N, L).to(torch.bool)
    scores = scores.masked_fill_(~mask, float("-inf"))
    if L > 0:
        row_max = scores.amax(dim=-1, keepdim=True)  # [B,KVH,g,N,1]
    else:
        row_max = scores.new_full((B, KVH, g, N, 1), float("-inf"))
    safe_max = torch.where(torch.isfinite(row_max), row_max,
                           torch.zeros_like(row_max))
    probs = torch.exp_(scores.sub_(safe_max))  # masked keys: exp(-inf) = 0
    denom = probs.sum(dim=-1, keepdim=True)  # [B,KVH,g,N,1]
    out = torch.matmul(probs.view(B, KVH, g * N, L), vf).view(B, KVH, g, N, dv)
    out = out / denom.clamp_min(torch.finfo(torch.float32).tiny)
    # log(0) = -inf for empty rows; safe_max is 0 there.
    lse = (torch.log(denom) + safe_max).squeeze(-1)  # [B, KVH, g, N]

    out = out.permute(0, 3, 1, 2, 4).reshape(*batch, N, H, dv).to(q.dtype)
    lse = lse.reshape(*batch, H, N)
    return out, lse


def merge_attention_states(
    out_a: torch.Tensor,
    lse_a: torch.Tensor,
    out_b: torch.Tensor,
    lse_b: torch.Tensor,
    *,
    return_lse: bool = False,
    out_dtype: torch.dtype | None = None,
):
    """Merge two partial attentions over disjoint key sets by their LSE.

    Args:
        out_a, out_b: ``[N, H, dv]`` partial outputs (any float dtype).
        lse_a, lse_b: ``[H, N]`` log-sum-exps (vLLM ``merge_attn_states``
            layout). ``-inf`` or ``+inf`` means "no keys on that side" (FA
            writes ``+inf`` for empty rows); that side then gets weight 0.
        return_lse: also return the merged ``[H, N]`` float32 LSE.
        out_dtype: dtype of the result (default ``out_a.dtype``).

    Returns:
        ``out`` ``[N, H, dv]`` (and ``lse`` if ``return_lse``). Rows empty on
        both sides give ``out = 0``, ``lse = -inf``. Computed in float32;
        numerically stable (the larger LSE is factored out).
    """
    if out_a.shape != out_b.shape or out_a.dim() != 3:
        raise ValueError(
            f"outputs must both be [N, H, d], got {tuple(out_a.shape)} and "
            f"{tuple(out_b.shape)}"
        )
    N, H, _ = out_a.shape
    if tuple(lse_a.shape) != (H, N) or tuple(lse_b.shape) != (H, N):
        raise ValueError(
            f"LSEs must be [H, N] = {(H, N)}, got {tuple(lse_a.shape)} and "
            f"{tuple(lse_b.shape)}"
        )
    neg_inf = float("-inf")
    la = lse_a.float()
    lb = lse_b.float()
    la = torch.where(torch.isinf(la), torch.full_like(la, neg_inf), la)
    lb = torch.where(torch.isinf(lb), torch.full_like(lb, neg_inf), lb)
    m = torch.maximum(la, lb)
    both_empty = m == neg_inf
    m_safe = torch.where(both_empty, torch.zeros_like(m), m)
    wa = torch.exp(la - m_safe)  # in [0, 1]; 0 for an empty side
    wb = torch.exp(lb - m_safe)
    s = wa + wb  # >= 1 unless both sides are empty
    s_safe = torch.where(both_empty, torch.ones_like(s), s)
    sa = (wa / s_safe).transpose(0, 1).unsqueeze(-1)  # [N, H, 1]
    sb = (wb / s_safe).transpose(0, 1).unsqueeze(-1)
    # An empty side may carry garbage (even NaN) in its output: select, don't
    # multiply by 0.
    oa = torch.where(sa > 0, out_a.float() * sa, torch.zeros((), device=out_a.device))
    ob = torch.where(sb > 0, out_b.float() * sb, torch.zeros((), device=out_b.device))
    out = (oa + ob).to(out_dtype or out_a.dtype)
    if not return_lse:
        return out
    lse = torch.where(both_empty, torch.full_like(m, neg_inf), m + torch.log(s_safe))
    return out, lse
