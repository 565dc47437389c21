"""Self-check of lade's tree attention and KV move, run when a lade engine starts.

Why: lade's CUDA path (:mod:`lade_vllm.attention.cuda_tree`) has never run on a GPU in this
project. Instead of trusting it, the engine checks it on its own device, dtype and KV block layout
before it serves anything, and refuses to start when the answer is wrong (a wrong tree mask would
not crash: it would verify drafts against wrong logits and change the output silently).

What :func:`run_self_check` does, for a few tree shapes (the fixtures live in
:mod:`lade_vllm.attention.check_fixtures`; :func:`check_cases`: a chain, a branching
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
from lade_vllm.attention.check_fixtures import (Case, ancestor_mask, cache_like, check_cases,
                                                dense_reference, flash_layout_cache, index_write,
                                                lookahead_step_parents, node_depths, paged_batch,
                                                reference_flash_attn_varlen_func)

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
        depth = node_depths(parents)
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
