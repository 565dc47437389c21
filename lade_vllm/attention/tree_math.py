"""Dense tree-masked attention in pure torch (no vLLM import).

Used by the CPU tree-attention backend for the few query rows of requests that
are decoded as a token tree; every other row goes through vLLM's own kernel.
"""

from __future__ import annotations

import torch

__all__ = ["tree_attention_dense"]


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
    # One fused kernel (torch's CPU flash attention, fp32 accumulation): ~2x faster per layer than
    # the explicit matmul/softmax below on this machine (W2/N3/G2 step profile: attention was 18%).
    # Rows with no allowed key would give NaN there, so they attend to everything and are zeroed.
    empty = ~allowed.any(dim=-1)                                   # [R, Tq]
    safe = allowed | empty[..., None] if bool(empty.any()) else allowed
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=safe[:, None],
        scale=scale, enable_gqa=H != KVH).transpose(1, 2)
    if bool(empty.any()):
        out = out.masked_fill(empty[:, :, None, None], 0)
    return out


def tree_attention_reference(q, k, v, allowed, scale):
    """Explicit fp32 matmul/softmax version of :func:`tree_attention_dense` (same contract)."""
    R, Tq, H, hd = q.shape
    L, KVH, hd_v = k.shape[1], k.shape[2], v.shape[-1]
    g = H // KVH
    out_dtype = q.dtype

    # [R, KVH, g, Tq, hd]; head h = kvh * g + gi (vLLM / HF GQA convention).
    qf = q.float().reshape(R, Tq, KVH, g, hd).permute(0, 2, 3, 1, 4)
    kf = k.float().permute(0, 2, 1, 3)  # [R, KVH, L, hd]
    vf = v.float().permute(0, 2, 1, 3)  # [R, KVH, L, hd_v]

    # [R, KVH, g*Tq, L]
    scores = torch.matmul(qf.reshape(R, KVH, g * Tq, hd), kf.transpose(-1, -2))
    scores = scores.view(R, KVH, g, Tq, L).mul_(scale)
    mask = allowed.view(R, 1, 1, Tq, L)
    scores = scores.masked_fill_(~mask, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = torch.where(
        torch.isfinite(row_max), row_max, torch.zeros_like(row_max)
    )
    probs = torch.exp_(scores.sub_(row_max))  # exp(-inf) = 0 for masked keys
    denom = probs.sum(dim=-1, keepdim=True)
    out = torch.matmul(probs.view(R, KVH, g * Tq, L), vf).view(R, KVH, g, Tq, hd_v)
    # Fully-masked rows: numerator 0, denom 0 -> 0 (clamp avoids 0/0).
    out = out / denom.clamp_min(torch.finfo(torch.float32).tiny)
    # -> [R, Tq, KVH, g, hd_v] -> [R, Tq, H, hd_v]
    out = out.permute(0, 3, 1, 2, 4).reshape(R, Tq, H, hd_v)
    return out.to(out_dtype)
