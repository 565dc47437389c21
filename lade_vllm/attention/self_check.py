"""Self-check of lade's tree attention and KV move, run when a lade engine starts.

Why: lade's CUDA path (:mod:`lade_vllm.attention.cuda_tree`) has never run on a GPU in this
project. Instead of trusting it, the engine checks it on its own device, dtype and KV block layout
before it serves anything, and refuses to start when the answer is wrong (a wrong tree mask would
not crash: it would verify drafts against wrong logits and change the output silently).

What :func:`run_self_check` does, for a few tree shapes (:func:`check_cases`: a chain, a branching
trie crossing a block boundary, the layout of a real lookahead step with window and trie nodes,
and two tree requests with different prefix lengths beside an ordinary request):

1. builds a small synthetic paged KV cache (:func:`paged_batch`) in the engine's dtype and block
   layout, written by the backend's own cache writer (``TreePath.write``);
2. runs the backend's tree-attention path (``TreePath.attend``: on CUDA, cuda_tree's plan, FA over
   the prefix with LSE, the dense tree part and vLLM's merge; on CPU, the CPU tree backend) and
   compares its tree rows with a dense masked reference computed in float32 on the same device
   (:func:`dense_reference`), within :data:`TOLERANCE` for the dtype; rows of ordinary requests
   must stay untouched;
3. moves one accepted path's K/V per tree request with the KV mover's function
   (:func:`lade_vllm.adapter.kv_move.move_slots`) and compares the cache bit for bit with a copy in
   which the backend's writer put the same K/V at the destination slots.

A mismatch raises :class:`SelfCheckError` naming the shape, the largest error and the tolerance.
This module is plain torch; vLLM is imported only inside the functions that need it.
"""
from __future__ import annotations

import math
import time
import types
from dataclasses import dataclass
from typing import Callable

import torch

from lade_vllm.attention import TreeLayout

__all__ = ["SelfCheckError", "TOLERANCE", "Case", "TreePath", "ancestor_mask", "check_cases",
           "cache_like", "flash_layout_cache", "index_write",
           "dense_reference", "paged_batch", "reference_flash_attn_varlen_func",
           "run_self_check", "cuda_tree_path", "cpu_tree_path", "stub_flash_impl",
           "lookahead_step_parents", "check_runner"]

#: max abs error allowed against the float32 reference, per dtype. fp32: both sides compute in
#: float32, differences are summation order (~1e-6). bf16/fp16: the backend rounds its result to
#: the dtype up to three times (FA's prefix output, the dense tree output, the merged output), each
#: at most half an ulp of a value |x| <= ~4 (bf16: 2**-8 * 4 / 2 = 7.8e-3); inputs are the same
#: rounded values on both sides. A dropped key in the short-prefix shapes moves rows by > 0.05.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 2e-2}

_SENTINEL = 123.0


class SelfCheckError(RuntimeError):
    """lade's tree attention or KV move disagrees with the reference on this engine."""


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


def _depths(parents) -> list[int]:
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


# ---- the backends' tree paths -------------------------------------------------------------------
@dataclass
class TreePath:
    """How one backend writes its cache, runs its tree rows, and lays out K/V for the mover."""
    name: str
    write: Callable           # (kv_cache, k [M,kvh,hd], v, slots [M]) -> None
    attend: Callable          # (batch, TreeLayout, output [N, H*hd]) -> None: tree rows written
    new_cache: Callable       # (num_blocks) -> empty kv cache in the engine's layout
    move_perms: Callable      # (kv_cache) -> (k_perm, v_perm) for kv_move.move_slots, or None
    scale: float


def stub_flash_impl(H, KVH, d, dtype=None):
    """A ``LadeFlashAttentionImpl`` with the attributes the tree path reads, without
    ``FlashAttentionImpl.__init__`` (which wants a CUDA FA build)."""
    from vllm.v1.attention.backend import AttentionType

    from lade_vllm.attention.cuda_tree import LadeFlashAttentionImpl

    impl = object.__new__(LadeFlashAttentionImpl)
    impl.num_heads, impl.num_kv_heads, impl.head_size = H, KVH, d
    impl.scale = 1.0 / math.sqrt(d)
    impl.alibi_slopes = None
    impl.sliding_window = (-1, -1)
    impl.kv_cache_dtype = "auto"
    impl.logits_soft_cap = 0
    impl.attn_type = AttentionType.DECODER
    impl.sinks = None
    impl.vllm_flash_attn_version = 2
    impl.fa4_hd256 = False
    impl.dcp_world_size = 1
    impl.kv_sharing_target_layer_name = None
    return impl


def cuda_tree_path(impl, *, flash_attn=None, real_writer=None) -> TreePath:
    """cuda_tree's tree rows (:meth:`LadeFlashAttentionImpl._tree_overwrite`: plan, dense tree
    part, FA over the prefix with LSE, vLLM's ``merge_attn_states``) with ``impl`` (the engine's
    layer impl, or :func:`stub_flash_impl`). ``flash_attn``: a stand-in for FA (CPU tests);
    ``real_writer``: write the cache with vLLM's ``reshape_and_cache_flash`` through
    ``impl.do_kv_cache_update`` (default: on CUDA; else by indexing FA's layout)."""
    from lade_vllm.attention import cuda_tree as ct

    def attend(b, layout, output):
        plan = ct.build_cuda_tree_plan(layout, b.query_start_loc, b.seq_lens, b.block_table,
                                       b.num_reqs)
        md = types.SimpleNamespace(slot_mapping=b.slot_mapping, tree=plan)
        impl._check_tree_supported()
        if flash_attn is not None:
            impl.lade_flash_attn = flash_attn
        impl._tree_overwrite(b.query, b.key, b.value, b.kv_cache, md, plan, output)

    def write(kv_cache, k, v, slots):
        use_real = real_writer if real_writer is not None else kv_cache.is_cuda
        if not use_real:
            index_write(kv_cache, k, v, slots)
            return
        one = torch.ones((), dtype=torch.float32, device=kv_cache.device)
        layer = types.SimpleNamespace(_k_scale=one, _v_scale=one, _k_scale_float=1.0,
                                      _v_scale_float=1.0)
        impl.do_kv_cache_update(layer, k, v, kv_cache, slots)

    return TreePath("cuda_tree (FlashAttention prefix + dense tree + merge)", write, attend,
                    None, lambda cache: None, impl.scale)


def cpu_tree_path(impl, isa: str) -> TreePath:
    """The CPU tree backend's rows (:meth:`LadeCPUAttentionImpl._tree_overwrite`: vLLM's cache
    writer for ``isa``, the probed layout, the dense prefix copies, masked attention) with
    ``impl`` (the engine's layer impl, or a stub with ``num_heads``, ``head_size``, ``scale``,
    ``kv_cache_dtype``)."""
    from lade_vllm.attention.cpu_tree import build_tree_plan
    from lade_vllm.attention.dense_kv import DenseKV
    from lade_vllm.attention.kv_layout import _write, probe_layout

    layer = types.SimpleNamespace(isa=isa)

    def attend(b, layout, output):
        plan = build_tree_plan(layout, b.query_start_loc, b.seq_lens, b.block_table,
                               b.num_reqs, b.bs)
        plan.req_keys = [f"lade-self-check-{i}" for i in range(plan.num_reqs)]
        plan.starts = [0] * plan.num_reqs
        try:
            impl._tree_overwrite(layer, b.query, b.key, b.value, b.kv_cache, plan, output)
        finally:
            impl.__dict__.get("_lade_dense", DenseKV()).drop(plan.req_keys)

    def write(kv_cache, k, v, slots):
        _write(kv_cache, k.contiguous(), v.contiguous(), slots, isa, "auto")

    def move_perms(cache):
        nb, kvh, bs, two_hd = cache.shape
        return probe_layout(isa, cache.dtype, bs, two_hd // 2)

    return TreePath(f"CPU tree backend (isa={isa})", write, attend, None, move_perms,
                    impl.scale)


# ---- the check ----------------------------------------------------------------------------------
def _case_batch(case: Case, path: TreePath, H, KVH, hd, bs, dtype, device, seed):
    reqs = []
    for p, parents, ql in case.reqs:
        mask = ancestor_mask(parents) if parents is not None else None
        reqs.append((ql, p + ql, mask))
    b = paged_batch(reqs, H, KVH, hd, bs, seed, dtype=dtype, device=device, write=path.write,
                    new_cache=path.new_cache)
    b.parents = [parents for _, parents, _ in case.reqs]
    return b


def _check_attention(case, b, path, tol) -> float:
    tree_idx = [i for i, (_, _, m) in enumerate(b.reqs) if m is not None]
    layout = TreeLayout(req_indices=tree_idx, tree_masks=[b.reqs[i][2] for i in tree_idx])
    n_tok = b.query.shape[0]
    output = torch.full((n_tok, b.H * b.d), _SENTINEL, dtype=b.query.dtype,
                        device=b.query.device)
    path.attend(b, layout, output)
    out = output.view(n_tok, b.H, b.d)
    worst = 0.0
    for r, (ql, sl, mask) in enumerate(b.reqs):
        a = int(b.query_start_loc[r])
        rows = out[a:a + ql]
        if mask is None:
            if not bool((rows == _SENTINEL).all()):
                raise SelfCheckError(
                    f"lade self-check ({path.name}, shape {case.name!r}): the rows of an "
                    f"ordinary request (batch index {r}) were overwritten by the tree path")
            continue
        p = sl - ql
        allowed = torch.cat([torch.ones(ql, p, dtype=torch.bool), mask], dim=1)
        ref = dense_reference(b.query[a:a + ql], b.kfull[r], b.vfull[r], allowed, path.scale)
        err = (rows.float() - ref).abs().max().item() if ql else 0.0
        if not math.isfinite(err) or err > tol:
            raise SelfCheckError(
                f"lade self-check ({path.name}, {b.query.dtype}, block_size={b.bs}): tree "
                f"attention of shape {case.name!r}, request {r} (prefix {p}, {ql} tree nodes) "
                f"differs from the dense float32 reference by max abs error {err:.3g} > "
                f"tolerance {tol:.3g}; the engine will not start. Unset LADE_VLLM_CUDA to run "
                "without lade's CUDA path, and report this with the model and GPU.")
        worst = max(worst, err)
    return worst


def _check_move(case, b, path) -> None:
    """Move one accepted path per tree request (its deepest node's ancestors, which are not in
    depth order in storage) to the slots of depths 1..a and compare with the writer's answer."""
    from lade_vllm.adapter import kv_move

    src, dst, k_new, v_new = [], [], [], []
    for r, (ql, sl, mask) in enumerate(b.reqs):
        if mask is None:
            continue
        a = int(b.query_start_loc[r])
        parents = b.parents[r]
        depth = _depths(parents)
        node, chain = max(range(ql), key=lambda i: (depth[i], i)), []
        while node > 0:
            chain.append(node)
            node = parents[node]
        for s in reversed(chain):
            d = depth[s]
            src.append(b.slot_mapping[a + s])
            dst.append(b.slot_mapping[a + d])
            k_new.append(b.key[a + s])
            v_new.append(b.value[a + s])
    if not src:
        return
    src_t, dst_t = torch.stack(src).long(), torch.stack(dst).long()
    expected = b.kv_cache.clone()
    path.write(expected, torch.stack(k_new), torch.stack(v_new), dst_t)
    moved = b.kv_cache.clone()
    kv_move.move_slots([moved], src_t, dst_t, path.move_perms(moved))
    if not torch.equal(moved, expected):
        bad = int((moved != expected).sum())
        err = (moved.float() - expected.float()).abs().max().item()
        raise SelfCheckError(
            f"lade self-check ({path.name}, {b.kv_cache.dtype}, block_size={b.bs}): the KV "
            f"mover's result for shape {case.name!r} ({len(src)} slots moved) differs from the "
            f"cache writer's in {bad} elements (max abs difference {err:.3g}, tolerance 0: a move "
            "is a copy); the engine will not start.")


def run_self_check(path: TreePath, *, device, dtype, block_size, num_heads, num_kv_heads,
                   head_size, cases=None, seed=0) -> dict:
    """Run every shape of :func:`check_cases` through ``path``; raise :class:`SelfCheckError` on
    the first mismatch. Returns ``{"shapes": n, "max_abs_error": e, "tolerance": t,
    "seconds": s}``."""
    t0 = time.perf_counter()
    tol = TOLERANCE.get(dtype)
    if tol is None:
        raise SelfCheckError(f"lade self-check: no tolerance for dtype {dtype}; lade's tree "
                             "attention supports float32, float16 and bfloat16 caches")
    cases = check_cases(block_size) if cases is None else cases
    worst = 0.0
    with torch.inference_mode():
        for i, case in enumerate(cases):
            b = _case_batch(case, path, num_heads, num_kv_heads, head_size, block_size, dtype,
                            device, seed + i)
            worst = max(worst, _check_attention(case, b, path, tol))
            _check_move(case, b, path)
    return {"shapes": len(cases), "max_abs_error": worst, "tolerance": tol,
            "seconds": time.perf_counter() - t0}


# ---- at engine start ----------------------------------------------------------------------------
def _lade_impls() -> dict:
    """lade's tree-attention impl classes that import on this vLLM build, by backend."""
    out = {}
    try:
        from lade_vllm.attention.cpu_tree import LadeCPUAttentionImpl
        out["cpu"] = LadeCPUAttentionImpl
    except ImportError:
        pass
    try:
        from lade_vllm.attention.cuda_tree import LadeFlashAttentionImpl
        out["cuda"] = LadeFlashAttentionImpl
    except ImportError:
        pass
    return out


def _first_tree_layer(runner):
    from vllm.config import get_layers_from_vllm_config
    from vllm.model_executor.layers.attention import Attention
    from vllm.v1.attention.backend import AttentionType

    kinds = list(_lade_impls().values())
    layers = get_layers_from_vllm_config(runner.vllm_config, Attention)
    seen, found = [], []
    for name, layer in layers.items():
        if getattr(layer, "attn_type", AttentionType.DECODER) != AttentionType.DECODER:
            continue
        impl = getattr(layer, "impl", None)
        if isinstance(impl, tuple(kinds)):
            found.append((name, layer, impl))
        seen.append(type(impl).__name__)
    # a full-attention layer where there is one (sliding-window layers only see trees that fit
    # inside their window, lade_vllm.adapter.runner.install)
    full = [f for f in found if getattr(f[2], "sliding_window", None) in (None, -1, (-1, -1))]
    if full or found:
        return (full or found)[0]
    raise SelfCheckError(
        "lade self-check: no decoder attention layer of this engine runs lade's tree backend "
        f"(their impls: {sorted(set(seen)) or 'none'}); tree steps would be computed with a "
        "causal mask. On CUDA lade overrides FLASH_ATTN only: pass attention_backend="
        "'FLASH_ATTN' (or unset LADE_VLLM_CUDA).")


def _layer_cache(layer):
    kv = getattr(layer, "kv_cache", None)
    if isinstance(kv, (list, tuple)):
        kv = kv[0] if kv else None
    return kv if isinstance(kv, torch.Tensor) and kv.dim() == 4 else None


def check_runner(runner, log=None) -> dict | None:
    """Run :func:`run_self_check` for an engine's model runner once its KV cache exists: the first
    decoder layer's impl, cache dtype, block size, heads and stride order."""
    name, layer, impl = _first_tree_layer(runner)
    cache = _layer_cache(layer)
    if cache is None:
        raise SelfCheckError(f"lade self-check: layer {name} has no KV cache tensor")
    _, kvh, bs, two_hd = cache.shape
    hd = two_hd // 2
    cpu_impl = _lade_impls().get("cpu")
    if cpu_impl is not None and isinstance(impl, cpu_impl):
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa
        isa = getattr(layer, "isa", None) or _get_attn_isa(cache.dtype, bs, hd)
        path = cpu_tree_path(impl, isa)
    else:
        path = cuda_tree_path(impl)
    path.new_cache = lambda nb: cache_like(cache, nb)     # the engine's stride order
    report = run_self_check(path, device=cache.device, dtype=cache.dtype, block_size=bs,
                            num_heads=impl.num_heads, num_kv_heads=kvh, head_size=hd)
    if log is not None:
        log.info("lade: tree-attention self-check passed on %s (%s, %s, block_size=%d, "
                 "%d shapes, max abs error %.2g <= %.2g, %.0f ms)", cache.device, path.name,
                 cache.dtype, bs, report["shapes"], report["max_abs_error"],
                 report["tolerance"], 1000 * report["seconds"])
    return report
