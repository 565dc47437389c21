"""Dense tree-masked attention in pure torch (no vLLM import).

The CPU tree-attention backend runs :func:`masked_attention` for the query rows
of requests decoded as a token tree; every other row goes through vLLM's own
kernel. :func:`tree_attention_dense` is the same math behind a boolean mask.
"""

from __future__ import annotations

import torch

__all__ = ["tree_attention_dense", "mask_bias", "masked_attention"]


def tree_attention_dense(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    allowed: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Masked softmax attention with GQA and fp32 accumulation.

    Args:
        q: [R, Tq, H, hd] queries.
        k: [R, L, KVH, hd] keys (H must be a multiple of KVH).
        v: [R, L, KVH, hd_v] values.
        allowed: [R, Tq, L] bool; ``allowed[r, i, j]`` means query i of
            request r may attend to key j. Padded key columns and padded
            query rows are simply ``False``.
        scale: softmax scale applied to q·k.

    Returns:
        [R, Tq, H, hd_v] in ``q.dtype``. Rows with no allowed key return 0
        (never NaN).
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"expected 4-D q/k/v, got {tuple(q.shape)}, {tuple(k.shape)}, "
            f"{tuple(v.shape)}"
        )
    R, Tq, H, hd = q.shape
    Rk, L, KVH, hdk = k.shape
    hd_v = v.shape[-1]
    if Rk != R or v.shape[:3] != k.shape[:3] or hdk != hd:
        raise ValueError(
            f"shape mismatch: q {tuple(q.shape)}, k {tuple(k.shape)}, "
            f"v {tuple(v.shape)}"
        )
    if H % KVH != 0:
        raise ValueError(f"num_heads {H} not a multiple of num_kv_heads {KVH}")
    if allowed.shape != (R, Tq, L):
        raise ValueError(
            f"allowed has shape {tuple(allowed.shape)}, expected {(R, Tq, L)}"
        )
    # Rows with no allowed key attend to everything and are zeroed afterwards (never NaN).
    empty = ~allowed.any(dim=-1)                                   # [R, Tq]
    has_empty = bool(empty.any())
    safe = allowed | empty[..., None] if has_empty else allowed
    out = masked_attention(q, k.transpose(1, 2), v.transpose(1, 2), mask_bias(safe, q.dtype),
                           scale)
    if has_empty:
        out = out.masked_fill(empty[:, :, None, None], 0)
    return out


def mask_bias(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[R, Tq, L]`` bool -> ``[R, 1, Tq, L]`` additive mask (0 allowed, -inf masked)."""
    bias = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(
        ~allowed, float("-inf"))
    return bias[:, None]


def masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Attention of ``q`` [R, Tq, H, hd] over ``k``/``v`` [R, KVH, L, hd] with an additive
    ``bias`` [R, 1, Tq, L] (every row must allow at least one key). One fused call (torch's
    CPU flash attention with fp32 accumulation); head h reads KV head h // (H / KVH).
    Returns [R, Tq, H, hd_v]."""
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k, v, attn_mask=bias, scale=scale,
        enable_gqa=q.shape[2] != k.shape[1])
    return out.transpose(1, 2)
