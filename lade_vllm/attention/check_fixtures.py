"""The fixtures of the engine-start self-check (lade_vllm.attention.self_check): tree shapes, a
small synthetic paged KV batch and the dense references the backends' tree rows are compared with.
Plain torch; also used by the tree-attention tests."""
from __future__ import annotations

import types
from dataclasses import dataclass

import torch


def ancestor_mask(parents) -> torch.Tensor:
    """[T, T] bool ancestor-or-self mask of a tree given by its parent list (root: -1)."""
    T = len(parents)
    m = torch.zeros(T, T, dtype=torch.bool)
    for i in range(T):
        j = i
        while j >= 0:
            m[i, j] = True
            j = parents[j]
    return m


def node_depths(parents) -> list[int]:
    d = []
    for p in parents:
        d.append(0 if p < 0 else d[p] + 1)
    return d


def lookahead_step_parents() -> list[list[int]]:
    """Parent lists of real lookahead step trees (W=5, N=4, 2 candidates; the proposer's
    ``build_step_trees``): window cells and trie nodes in lade's storage order."""
    from lade_vllm.proposer import build_step_trees

    W, N = 5, 4
    levels = torch.arange(100, 100 + 2 * (N - 1) * W).reshape(2, N - 1, W)
    cands = torch.tensor([[[1, 2, 3], [1, 5, 6]], [[7, 8, 9], [4, 4, 4]]])
    tree = build_step_trees(torch.tensor([7, 8]), levels, torch.tensor([N - 1, 2]),
                            cands, torch.tensor([[True, True], [True, False]]))
    out = []
    for b in range(tree.num_seqs):
        lo, hi = int(tree.seq_start[b]), int(tree.seq_start[b + 1])
        out.append([int(p) - lo if int(p) >= lo else -1 for p in tree.parent[lo:hi].tolist()])
    return out


@dataclass
class Case:
    """One shape: per request (prefix length, parents of its tree, or None with a query length
    for an ordinary causal request)."""
    name: str
    reqs: list  # [(prefix_len, parents | None, query_len)]


def check_cases(block_size: int) -> list[Case]:
    window = lookahead_step_parents()
    return [
        Case("chain", [(7, [-1, 0, 1, 2, 3], 5)]),
        Case("branching trie", [(block_size + 3, [-1, 0, 0, 1, 1, 2, 3, 3], 8)]),
        Case("lookahead window + trie", [(2, window[0], len(window[0]))]),
        Case("two requests, different prefixes",
             [(0, [-1, 0, 0, 1], 4), (5, None, 2), (9, window[1], len(window[1]))]),
    ]


# ---- the synthetic batch ------------------------------------------------------------------------
def flash_layout_cache(num_blocks, block_size, num_kv_heads, head_size, dtype, device):
    """A zero cache in FlashAttention's layout: logical ``[nb, kvh, bs, 2*hd]`` (K =
    ``[..., :hd]``) over physical ``[nb, bs, kvh, 2*hd]``, the order ``FlashAttentionImpl`` reads
    through ``kv_cache.transpose(1, 2)``. For tests; on an engine :func:`cache_like` copies the real
    cache's stride order instead."""
    phys = torch.zeros(num_blocks, block_size, num_kv_heads, 2 * head_size, dtype=dtype,
                       device=device)
    return phys.transpose(1, 2)


def cache_like(cache: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """A zero cache of ``num_blocks`` blocks with the same logical shape, dtype, device and
    stride order as ``cache`` (an engine's real layer cache)."""
    order = sorted(range(cache.dim()), key=lambda d: cache.stride(d), reverse=True)
    shape = list(cache.shape)
    shape[0] = num_blocks
    phys = torch.zeros([shape[d] for d in order], dtype=cache.dtype, device=cache.device)
    inverse = [order.index(d) for d in range(cache.dim())]
    return phys.permute(inverse)


def index_write(kv_cache, k, v, slots) -> None:
    """Write K/V ``[M, kvh, hd]`` at ``slots`` of a logical ``[nb, kvh, bs, 2*hd]`` cache by
    plain indexing (FlashAttention's layout, any strides)."""
    bs, hd = kv_cache.shape[2], k.shape[-1]
    slots = slots.long()
    blk, off = slots // bs, slots % bs
    kv_cache[blk, :, off, :hd] = k.to(kv_cache.dtype)
    kv_cache[blk, :, off, hd:] = v.to(kv_cache.dtype)


def paged_batch(reqs, H=4, KVH=2, d=16, bs=4, seed=0, *, dtype=torch.float32, device="cpu",
                write=index_write, new_cache=None):
    """A batch of requests whose K/V (prefix and new tokens) sit in a paged cache.

    ``reqs``: per request ``(query_len, seq_len, tree_mask or None)``. Blocks are shuffled, one
    spare block per request, plus three unused ones. ``write(kv_cache, k, v, slots)`` is the
    cache writer (default: FlashAttention's layout by indexing); ``new_cache(num_blocks)`` makes
    the empty cache (default: :func:`flash_layout_cache`). Returns a namespace with ``query``,
    ``key``, ``value`` (the step's new rows), ``slot_mapping``, ``kv_cache``, ``block_table``,
    ``query_start_loc``, ``seq_lens`` (CPU int32), and ``kfull`` / ``vfull`` per request."""
    gen = torch.Generator().manual_seed(seed)
    dev = torch.device(device)
    nblk = max(-(-s // bs) for _, s, _ in reqs) + 1
    num_blocks = nblk * len(reqs) + 3
    perm = torch.randperm(num_blocks, generator=gen)
    block_table = perm[: nblk * len(reqs)].view(len(reqs), nblk).to(torch.int32)
    kv_cache = (new_cache(num_blocks) if new_cache is not None
                else flash_layout_cache(num_blocks, bs, KVH, d, dtype, dev))
    qs, ks, vs, slots, kfull, vfull = [], [], [], [], [], []
    for r, (ql, sl, _) in enumerate(reqs):
        kf = torch.randn(sl, KVH, d, generator=gen).to(device=dev, dtype=dtype)
        vf = torch.randn(sl, KVH, d, generator=gen).to(device=dev, dtype=dtype)
        pos = torch.arange(sl)
        s = (block_table[r, pos // bs].long() * bs + pos % bs).to(dev)
        if sl:
            write(kv_cache, kf, vf, s)
        qs.append(torch.randn(ql, H, d, generator=gen).to(device=dev, dtype=dtype))
        ks.append(kf[sl - ql:])
        vs.append(vf[sl - ql:])
        slots.append(s[sl - ql:])
        kfull.append(kf)
        vfull.append(vf)
    qlens = torch.tensor([ql for ql, _, _ in reqs])
    qsl = torch.zeros(len(reqs) + 1, dtype=torch.int32)
    qsl[1:] = torch.cumsum(qlens, 0)
    return types.SimpleNamespace(
        query=torch.cat(qs), key=torch.cat(ks), value=torch.cat(vs),
        slot_mapping=torch.cat(slots), kv_cache=kv_cache, block_table=block_table.to(dev),
        query_start_loc=qsl, seq_lens=torch.tensor([s for _, s, _ in reqs], dtype=torch.int32),
        kfull=kfull, vfull=vfull, H=H, KVH=KVH, d=d, bs=bs, num_reqs=len(reqs), reqs=reqs)


def dense_reference(q, k, v, allowed, scale) -> torch.Tensor:
    """float32 masked attention on ``q``'s device: q ``[N, H, d]``, k/v ``[L, KVH, d]``, allowed
    ``[N, L]`` bool -> ``[N, H, d]`` float32 (every row must allow a key)."""
    g = q.shape[1] // k.shape[1]
    kf = k.float().repeat_interleave(g, dim=1)                       # [L, H, d]
    vf = v.float().repeat_interleave(g, dim=1)
    scores = torch.einsum("nhd,lhd->hnl", q.float(), kf) * scale
    scores = scores.masked_fill(~allowed.to(q.device)[None], float("-inf"))
    return torch.einsum("hnl,lhd->nhd", torch.softmax(scores, dim=-1), vf)


def reference_flash_attn_varlen_func(*, q, k, v, out, cu_seqlens_q, max_seqlen_q, seqused_k,
                                     max_seqlen_k, block_table, softmax_scale, causal,
                                     return_softmax_lse, window_size, alibi_slopes, softcap,
                                     scheduler_metadata, fa_version, num_splits):
    """Pure-torch stand-in for ``flash_attn_varlen_func`` as cuda_tree calls it: paged,
    non-causal attention with FA's varlen conventions (LSE ``[H, total_q]``, ``+inf`` LSE and zero
    output for rows with ``seqused_k == 0``). Checks the arguments cuda_tree must pass."""
    from lade_vllm.attention.merge import attention_with_lse

    assert causal is False and return_softmax_lse is True
    assert alibi_slopes is None and softcap == 0 and list(window_size) == [-1, -1]
    assert cu_seqlens_q.dtype == torch.int32 and seqused_k.dtype == torch.int32
    assert q.is_contiguous() and out.shape == q.shape
    n, H, _ = q.shape
    bs = k.shape[1]
    lse = torch.empty(H, n, device=q.device)
    cu, used = cu_seqlens_q.tolist(), seqused_k.tolist()
    assert max(used) <= max_seqlen_k
    assert max(b - a for a, b in zip(cu, cu[1:])) <= max_seqlen_q
    for r, p in enumerate(used):
        a, b = cu[r], cu[r + 1]
        pos = torch.arange(p, device=block_table.device)
        blk, off = block_table[r, pos // bs].long(), pos % bs
        o, l_ = attention_with_lse(q[a:b], k[blk, off], v[blk, off],
                                   torch.ones(b - a, p, dtype=torch.bool, device=q.device),
                                   softmax_scale)
        out[a:b] = o
        lse[:, a:b] = l_ if p > 0 else float("inf")
    return out, lse
