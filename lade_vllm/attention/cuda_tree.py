"""Tree-masked attention on vLLM 0.32's CUDA FlashAttention backend.

**Untested on a GPU.** The math (:mod:`lade_vllm.attention.merge`) and the
plumbing of this module (plan, row gathers, the prefix call's arguments, the
merge) are tested on CPU with a pure-torch stand-in for
``flash_attn_varlen_func`` (``tests/test_cuda_tree_math.py``); the real FA
kernels and the CUDA ``merge_attn_states`` kernel have not been run here.

Same interface as the CPU backend (:mod:`lade_vllm.attention.cpu_tree`): the
model runner publishes a per-step :class:`~lade_vllm.attention.TreeLayout`;
the metadata builder turns it into a :class:`CudaTreeAttnPlan` attached to the
metadata; the impl runs vLLM's kernel for the whole batch (exact for non-tree
rows) and then recomputes the rows of tree requests as

    merge( FA paged attention over the prefix [0, p), non-causal, with LSE,
           dense masked attention over the step's T new tokens, with LSE )

where ``p = seq_len - T``. The two key sets are disjoint and together are
exactly what a tree row may see, so the LSE merge is exact
(:mod:`lade_vllm.attention.merge` explains the identity).

What is subclassed / called (vllm 0.32.0, paths under ``vllm/``):

- ``v1/attention/backends/flash_attn.py``
  - ``FlashAttentionBackend``: ``get_impl_cls`` and
    ``get_builder_cls`` overridden; ``get_name`` stays
    "FLASH_ATTN". ``forward_includes_kv_cache_update = False`` is
    inherited, so the step's new K/V are in the paged cache before
    ``forward`` runs (``Attention.forward`` calls ``unified_kv_cache_update``
    -> ``do_kv_cache_update`` first).
  - ``FlashAttentionMetadata``: dataclass subclass adding ``tree``.
  - ``FlashAttentionMetadataBuilder.build``: called via super(),
    result re-wrapped as :class:`LadeFlashAttentionMetadata` with the plan.
    ``update_block_table`` overridden so the plan's block table
    follows the metadata's. ``get_cudagraph_support`` overridden to
    ``NEVER``: the tree path is data-dependent Python and must run eagerly
    (use ``enforce_eager`` or PIECEWISE cudagraphs, where attention is eager).
  - ``FlashAttentionImpl.forward``: super().forward() for the
    batch, then the tree rows are overwritten. The K/V cache split
    ``kv_cache.transpose(1, 2).split(head_size, -1)`` and
    ``canonicalize_singleton_dim_strides`` are copied from ``FlashAttentionImpl.forward``, the
    FA4-hd256 page rounding too.
  - The prefix call mirrors the DCP context call in ``_forward_with_dcp``
   : ``flash_attn_varlen_func(q, k=key_cache,
    v=value_cache, out, cu_seqlens_q, max_seqlen_q, seqused_k=<context lens>,
    max_seqlen_k, softmax_scale, causal=False, alibi_slopes, window_size,
    block_table, softcap, return_softmax_lse=True, scheduler_metadata,
    fa_version, ..., num_splits)`` -> ``(out, lse [H, total_q])``; the merge
    mirrors the end of ``FlashAttentionImpl._forward_with_dcp`` (``merge_attn_states(output, ctx_out, ctx_lse,
    q_out, q_lse)``). Differences: queries are only the tree rows (packed,
    with their own ``cu_seqlens_q``), ``seqused_k`` is ``p`` per tree request,
    ``scheduler_metadata=None`` (vLLM's AOT schedule describes the whole
    batch) and ``num_splits=0``, and the "new tokens" half is
    :func:`~lade_vllm.attention.merge.attention_with_lse` with the tree mask
    instead of a causal FA call.
- ``v1/attention/ops/merge_attn_states.py``: ``merge_attn_states``,
  LSE layout ``[NUM_HEADS, NUM_TOKENS]``; CUDA kernel on CUDA, the torch
  fallback ``_merge_attn_states_torch`` on CPU.
- ``v1/attention/backends/fa_utils.py``: ``flash_attn_varlen_func``
  only exists there on CUDA/XPU/ROCm; it is imported lazily in
  :func:`_flash_attn_varlen_func`, so this module imports on a CPU build.
- ``v1/attention/backends/registry.py``: ``register_backend`` /
  ``AttentionBackendEnum.get_path``, as for the CPU backend.

Unsupported for tree requests (raises ``NotImplementedError``): ALiBi,
sliding window, softcap, sinks, quantized KV cache, decode context parallel,
non-decoder attention. Non-tree requests are untouched by this module.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import torch

from vllm.v1.attention.backend import (
    AttentionCGSupport,
    AttentionType,
    CommonAttentionMetadata,
)
from vllm.v1.attention.backends.flash_attn import (
    FlashAttentionBackend,
    FlashAttentionImpl,
    FlashAttentionMetadata,
    FlashAttentionMetadataBuilder,
)

from lade_vllm.attention import TreeLayout, get_step_layout
from lade_vllm.attention.merge import attention_with_lse
from lade_vllm.attention.tree_rows import tree_rows

__all__ = [
    "CudaTreeAttnPlan",
    "LadeFlashAttentionMetadata",
    "LadeFlashAttentionMetadataBuilder",
    "LadeFlashAttentionImpl",
    "LadeFlashAttentionBackend",
    "build_cuda_tree_plan",
]

# FA4's head_size=256 kernel works on 128-token pages
# (fa_utils.FA4_HD256_PAGE_SIZE); kept here to avoid importing fa_utils at
# module level.
_FA4_HD256_PAGE_SIZE = 128


@dataclass
class CudaTreeAttnPlan:
    """Per-step description of the tree requests, shared by all layers.

    R = number of tree requests, T_r their tree sizes, n = sum T_r,
    Tq = max T_r. "Packed" order is request-major, storage order within a
    request (the order of ``TreeLayout.tree_masks``).
    """

    req_indices: torch.Tensor  # [R] long, batch indices (device)
    rows: torch.Tensor  # [n] long, token rows of the tree queries, packed
    cu_seqlens_q: torch.Tensor  # [R+1] int32, packed query offsets
    prefix_lens: torch.Tensor  # [R] int32, p = seq_len - T (FA seqused_k)
    block_table: torch.Tensor  # [R, nblk] the tree requests' block table rows
    padded_rows: torch.Tensor  # [R, Tq] long token rows (pads repeat the first row)
    tree_allowed: torch.Tensor  # [R, Tq, Tq] bool tree masks, pads False
    flat_src: torch.Tensor  # [n] long: packed row k is padded row flat_src[k]
    max_tree_len: int  # Tq (FA max_seqlen_q)
    max_prefix_len: int  # max p (FA max_seqlen_k)
    covers_all: bool = False  # every scheduled token is a tree token

    @property
    def num_reqs(self) -> int:
        return int(self.req_indices.numel())

    @property
    def num_tokens(self) -> int:
        return int(self.rows.numel())


def build_cuda_tree_plan(
    layout: TreeLayout,
    query_start_loc_cpu: torch.Tensor,
    seq_lens_cpu: torch.Tensor,
    block_table: torch.Tensor,
    num_reqs: int,
    device: torch.device | str | None = None,
) -> CudaTreeAttnPlan | None:
    """Validate ``layout`` against the batch and precompute the plan.

    Pure torch (no vLLM call). ``query_start_loc_cpu`` / ``seq_lens_cpu`` are
    the batch's exact CPU values; ``block_table`` is the batch's
    ``[num_reqs, nblk]`` block table (its device is used unless ``device``
    is given). Returns None when the layout has no tree requests.
    """
    tr = tree_rows(layout, query_start_loc_cpu, seq_lens_cpu, num_reqs)
    if tr is None:
        return None
    dev = torch.device(device) if device is not None else block_table.device
    R, Tq = tr.query_valid.shape
    ridx, T, prefix = tr.req_indices, tr.sizes, tr.prefix_lens
    padded_rows, tree_allowed, flat_src, rows = tr.query_rows, tr.masks, tr.flat_src, tr.flat_dst
    cu = torch.zeros(R + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(T, 0).to(torch.int32)

    bt = block_table.index_select(0, ridx.to(block_table.device))
    return CudaTreeAttnPlan(
        req_indices=ridx.to(dev),
        rows=rows.to(dev),
        cu_seqlens_q=cu.to(dev),
        prefix_lens=prefix.to(torch.int32).to(dev),
        block_table=bt.to(dev),
        padded_rows=padded_rows.to(dev),
        tree_allowed=tree_allowed.to(dev),
        flat_src=flat_src.to(dev),
        max_tree_len=Tq,
        max_prefix_len=int(prefix.max()),
    )


@dataclass
class LadeFlashAttentionMetadata(FlashAttentionMetadata):
    tree: CudaTreeAttnPlan | None = None


class LadeFlashAttentionMetadataBuilder(FlashAttentionMetadataBuilder):
    @classmethod
    def get_cudagraph_support(cls, vllm_config, kv_cache_spec) -> AttentionCGSupport:
        # The tree overwrite is data-dependent eager code: never capture it
        # in a full cudagraph (PIECEWISE keeps attention eager and is fine).
        return AttentionCGSupport.NEVER

    def _is_decoder_self_attention(self) -> bool:
        from vllm.v1.kv_cache_interface import (
            CrossAttentionSpec,
            EncoderOnlyAttentionSpec,
        )

        return not isinstance(
            self.kv_cache_spec, (CrossAttentionSpec, EncoderOnlyAttentionSpec)
        )

    def build(
        self,
        common_prefix_len: int,
        common_attn_metadata: CommonAttentionMetadata,
        fast_build: bool = False,
    ) -> LadeFlashAttentionMetadata:
        md = super().build(common_prefix_len, common_attn_metadata, fast_build)
        tree = None
        layout = get_step_layout()
        if layout is not None and layout.req_indices and self._is_decoder_self_attention():
            cam = common_attn_metadata
            # One device->host sync per step per KV-cache group: the plan
            # needs exact seq_lens (seq_lens_cpu_upper_bound is only a bound).
            tree = build_cuda_tree_plan(
                layout,
                cam.query_start_loc_cpu,
                cam.seq_lens[: cam.num_reqs].cpu(),
                cam.block_table_tensor[: cam.num_reqs],
                cam.num_reqs,
            )
            tree.covers_all = (
                tree.num_reqs == cam.num_reqs
                and tree.num_tokens == cam.num_actual_tokens
            )
        fields = {f.name: getattr(md, f.name) for f in dataclasses.fields(md)}
        return LadeFlashAttentionMetadata(**fields, tree=tree)

    def update_block_table(self, metadata, blk_table, slot_mapping):
        new = super().update_block_table(metadata, blk_table, slot_mapping)
        plan = getattr(new, "tree", None)
        if plan is not None:
            new = copy.copy(new)
            new.tree = dataclasses.replace(
                plan,
                block_table=blk_table.index_select(
                    0, plan.req_indices.to(blk_table.device)
                ),
            )
        return new


def _flash_attn_varlen_func():
    """vLLM's FA entry point, imported lazily (absent on CPU builds)."""
    from vllm.v1.attention.backends import fa_utils

    fn = getattr(fa_utils, "flash_attn_varlen_func", None)
    if fn is None:
        raise RuntimeError(
            "lade tree attention (CUDA): vllm's flash_attn_varlen_func is not "
            "available on this platform"
        )
    return fn


def _merge_attn_states():
    from vllm.v1.attention.ops.merge_attn_states import merge_attn_states

    return merge_attn_states


class LadeFlashAttentionImpl(FlashAttentionImpl):
    def _check_tree_supported(self) -> None:
        unsupported = []
        if self.attn_type != AttentionType.DECODER:
            unsupported.append(f"attn_type={self.attn_type}")
        if self.alibi_slopes is not None:
            unsupported.append("ALiBi")
        if tuple(self.sliding_window) != (-1, -1):
            unsupported.append(f"sliding window ({self.sliding_window})")
        if self.logits_soft_cap:
            unsupported.append(f"logits softcap ({self.logits_soft_cap})")
        if self.sinks is not None:
            unsupported.append("attention sinks")
        if self.kv_cache_dtype not in ("auto", "float16", "bfloat16"):
            unsupported.append(f"kv_cache_dtype={self.kv_cache_dtype!r}")
        if getattr(self, "dcp_world_size", 1) > 1:
            unsupported.append("decode context parallel")
        if unsupported:
            raise NotImplementedError(
                "lade tree attention (CUDA) does not support "
                + ", ".join(unsupported)
                + " for tree-decoded requests"
            )

    def forward(
        self,
        layer: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: FlashAttentionMetadata,
        output: torch.Tensor,
        output_scale: torch.Tensor | None = None,
        output_block_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        plan = getattr(attn_metadata, "tree", None)
        if (
            plan is not None
            and plan.covers_all
            and output_scale is None
            and output_block_scale is None
        ):
            # every row is overwritten below; vLLM's causal kernel would be wasted work
            self._check_tree_supported()
            self._tree_overwrite(query, key, value, kv_cache, attn_metadata, plan, output)
            return output
        result = super().forward(
            layer,
            query,
            key,
            value,
            kv_cache,
            attn_metadata,
            output,
            output_scale,
            output_block_scale,
        )
        if plan is None:
            return result
        self._check_tree_supported()
        self._tree_overwrite(query, key, value, kv_cache, attn_metadata, plan, output)
        return result

    # -- pieces ---------------------------------------------------------------
    def _split_kv_cache(self, kv_cache: torch.Tensor):
        # as FlashAttentionImpl.forward: (B, H, N, 2*D) -> ((B, N, H, D), (B, N, H, D))
        from vllm.utils.torch_utils import canonicalize_singleton_dim_strides

        key_cache, value_cache = kv_cache.transpose(1, 2).split(self.head_size, dim=-1)
        return (
            canonicalize_singleton_dim_strides(key_cache),
            canonicalize_singleton_dim_strides(value_cache),
        )

    def _new_kv(self, key, value, key_cache, value_cache, attn_metadata, plan):
        """K/V of the tree tokens, padded to ``[R, Tq, KVH, d]``."""
        R, Tq = plan.padded_rows.shape
        idx = plan.padded_rows.reshape(-1)
        if (
            key is not None
            and value is not None
            and getattr(self, "kv_sharing_target_layer_name", None) is None
        ):
            k = key.view(key.shape[0], self.num_kv_heads, -1).index_select(0, idx)
            v = value.view(value.shape[0], self.num_kv_heads, -1).index_select(0, idx)
        else:
            # KV-sharing layer (or no key/value passed): read the new tokens
            # back from the (shared) cache at their slots, as the kernel does.
            slots = attn_metadata.slot_mapping.index_select(0, idx).long()
            block_size = key_cache.shape[1]
            blk, off = slots // block_size, slots % block_size
            k = key_cache[blk, off]
            v = value_cache[blk, off]
        return (
            k.reshape(R, Tq, self.num_kv_heads, -1),
            v.reshape(R, Tq, self.num_kv_heads, -1),
        )

    def _prefix_attention(self, q_packed, key_cache, value_cache, plan):
        """FA over each tree request's prefix [0, p): ``(out [n,H,d], lse [H,n])``.

        The call follows the DCP context attention of ``FlashAttentionImpl``.
        """
        # a stand-in set on the impl by the engine-start self-check's CPU tests only
        flash_attn_varlen_func = getattr(self, "lade_flash_attn", None) or _flash_attn_varlen_func()
        max_seqlen_k = plan.max_prefix_len
        block_table = plan.block_table
        num_splits = 0
        if getattr(self, "fa4_hd256", False):  # as FlashAttentionImpl.forward (FA4 hd256)
            num_pages = -(-max_seqlen_k // _FA4_HD256_PAGE_SIZE)
            max_seqlen_k = num_pages * _FA4_HD256_PAGE_SIZE
            block_table = block_table[:, :num_pages]
            num_splits = 1
        out = torch.empty_like(q_packed)
        prefix_out, prefix_lse = flash_attn_varlen_func(
            q=q_packed,
            k=key_cache,
            v=value_cache,
            out=out,
            cu_seqlens_q=plan.cu_seqlens_q,
            max_seqlen_q=plan.max_tree_len,
            seqused_k=plan.prefix_lens,
            max_seqlen_k=max_seqlen_k,
            softmax_scale=self.scale,
            causal=False,
            alibi_slopes=None,
            window_size=list(self.sliding_window),
            block_table=block_table,
            softcap=self.logits_soft_cap,
            return_softmax_lse=True,
            scheduler_metadata=None,
            fa_version=self.vllm_flash_attn_version,
            num_splits=num_splits,
        )
        return prefix_out, prefix_lse

    def _tree_overwrite(
        self,
        query: torch.Tensor,
        key: torch.Tensor | None,
        value: torch.Tensor | None,
        kv_cache: torch.Tensor,
        attn_metadata,
        plan: CudaTreeAttnPlan,
        output: torch.Tensor,
    ) -> None:
        H, d = self.num_heads, self.head_size
        R, Tq = plan.padded_rows.shape
        key_cache, value_cache = self._split_kv_cache(kv_cache)
        q = query.view(query.shape[0], H, d)

        # tree part: dense masked attention over the step's new tokens
        qp = q.index_select(0, plan.padded_rows.reshape(-1)).view(R, Tq, H, d)
        kp, vp = self._new_kv(key, value, key_cache, value_cache, attn_metadata, plan)
        tree_out, tree_lse = attention_with_lse(qp, kp, vp, plan.tree_allowed, self.scale)
        dv = tree_out.shape[-1]
        tree_out = tree_out.reshape(R * Tq, H, dv).index_select(0, plan.flat_src)
        tree_lse = (
            tree_lse.transpose(0, 1).reshape(H, R * Tq).index_select(1, plan.flat_src)
        )

        out_view = output.view(output.shape[0], H, -1)
        if plan.max_prefix_len == 0:
            # no request has a prefix: the tree part is the whole answer
            out_view.index_copy_(0, plan.rows, tree_out.to(output.dtype))
            return

        # prefix part: paged FA over [0, p) with LSE (FA: +inf LSE if p == 0)
        q_packed = q.index_select(0, plan.rows)  # contiguous [n, H, d]
        prefix_out, prefix_lse = self._prefix_attention(
            q_packed, key_cache, value_cache, plan
        )
        merged = torch.empty(
            (plan.num_tokens, H, dv), dtype=output.dtype, device=output.device
        )
        _merge_attn_states()(
            merged,
            prefix_out.contiguous(),
            prefix_lse.contiguous(),
            tree_out.to(prefix_out.dtype).contiguous(),
            tree_lse.contiguous(),
        )
        out_view.index_copy_(0, plan.rows, merged)


class LadeFlashAttentionBackend(FlashAttentionBackend):
    """FLASH_ATTN with the tree-aware builder and impl (its name stays "FLASH_ATTN")."""
    get_impl_cls = staticmethod(lambda: LadeFlashAttentionImpl)
    get_builder_cls = staticmethod(lambda: LadeFlashAttentionMetadataBuilder)


BACKEND_PATH = "lade_vllm.attention.cuda_tree.LadeFlashAttentionBackend"
