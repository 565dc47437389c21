"""Tree-masked attention on vLLM 0.32's CPU attention backend.

What is subclassed / overridden (vllm 0.32.0, paths under ``vllm/``):

- ``v1/attention/backends/cpu_attn.py``
  - ``CPUAttentionBackend``: ``get_impl_cls`` and
    ``get_builder_cls`` overridden to return the Lade classes.
    ``get_name`` stays "CPU_ATTN".
  - ``CPUAttentionMetadata``: dataclass subclass adding ``tree``.
  - ``CPUAttentionMetadataBuilder.build``: called via super(), its
    result re-wrapped as ``LadeCPUAttentionMetadata`` with a per-step
    :class:`TreeAttnPlan` (built once per step, shared by all layers).
  - ``CPUAttentionBackendImpl.forward``: super().forward() runs
    vLLM's kernel ``ops.cpu_attention_with_kv_cache`` for the whole
    batch (exact for non-tree rows), then the rows of tree requests are
    overwritten: by lade's compiled kernel reading the paged cache in place
    (:mod:`lade_vllm.attention.tree_kernel`, built by ``make setup``; vLLM's
    ``vec`` layout) where it is built and fits, else by a dense masked attention
    over the request's K/V gathered from the paged cache (or, when the layout
    names its requests, opt-in
    ``LADE_DENSE_KV=1``: a per-layer dense copy of the prefix extended by the
    tokens committed since its last tree step, :mod:`lade_vllm.attention.dense_kv`,
    plus the step's own K/V from the layer's ``key``/``value`` inputs). The cache element order is probed, not assumed
    (:mod:`lade_vllm.attention.kv_layout`); the ISA is ``layer.isa`` as set by
    ``CPUAttentionMetadataBuilder._set_isa_to_layers``.
- ``v1/attention/backends/registry.py``: ``register_backend(backend,
  class_path)`` stores the override in ``_ATTN_OVERRIDES``;
  ``AttentionBackendEnum.get_path`` honours it, and
  ``CpuPlatform.get_attn_backend_cls`` always
  returns ``AttentionBackendEnum.CPU_ATTN.get_path()`` for non-MLA models.
  ``v1/attention/selector.py:_cached_get_attn_backend`` caches the
  resolution, so registration must precede model construction (we also clear
  that cache when registering).

Why the new tokens' K/V are already in the cache when ``forward`` runs:
``CPUAttentionBackend.forward_includes_kv_cache_update = False``,
so ``Attention.forward`` (``vllm.model_executor.layers.attention.attention``) first calls ``unified_kv_cache_update``, which calls
``impl.do_kv_cache_update`` (writing through
``ops.cpu_attn_reshape_and_cache`` at the step's ``slot_mapping``), and only
then ``unified_attention_with_output`` -> ``impl.forward``; the
``kv_cache_dummy_dep`` result threads a data dependency between the two so
torch.compile keeps that order. vLLM's own kernel relies on the same fact: it
reads all of ``[0, seq_len)`` from the paged cache.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from vllm.v1.attention.backend import AttentionType, CommonAttentionMetadata
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadata,
    CPUAttentionMetadataBuilder,
    _get_attn_isa,
)

from lade_vllm.attention import TreeLayout, get_step_layout, tree_kernel
from lade_vllm.attention.dense_kv import DenseKV, PrefixLedger
from lade_vllm.attention.kv_layout import (gather_blocks, gather_kv, probe_layout, probe_strided,
                                           token_gather_index)
from lade_vllm.attention.tree_math import mask_bias, masked_attention
from lade_vllm.attention.tree_rows import tree_rows

__all__ = [
    "TreeAttnPlan",
    "LadeCPUAttentionMetadata",
    "LadeCPUMetadataBuilder",
    "LadeCPUAttentionImpl",
    "LadeCPUAttentionBackend",
    "build_tree_plan",
]


@dataclass
class TreeAttnPlan:
    """Per-step description of the tree requests, shared by all layers.

    R = number of tree requests, Tq = max tree size, L = max(p + T).
    """

    req_indices: torch.Tensor  # [R] long, batch indices
    query_rows: torch.Tensor  # [R, Tq] long rows of the flattened token dim
    query_valid: torch.Tensor  # [R, Tq] bool
    block_table: torch.Tensor  # [R, nblk] block ids (cover [0, L))
    prefix_lens: torch.Tensor  # [R] long, p = seq_len - T
    kv_lens: torch.Tensor  # [R] long, p + T
    allowed: torch.Tensor  # [R, Tq, L] bool
    flat_src: torch.Tensor  # [n] long, indices into the R*Tq padded rows
    flat_dst: torch.Tensor  # [n] long, the matching token rows
    max_query_len: int  # Tq
    max_kv_len: int  # L
    sizes: list[int] = field(default_factory=list)      # [R] tree size T
    prefixes: list[int] = field(default_factory=list)   # [R] p
    tree_masks: torch.Tensor | None = None  # [R, Tq, Tq] bool ancestor masks (padded)
    covers_all: bool = False  # every scheduled token is a tree token: skip vLLM's kernel
    # dense prefix copies (set by the builder when the layout names its requests)
    req_keys: list[str] | None = None
    starts: list[int] = field(default_factory=list)     # [R] rows every layer's copy holds
    dropped: list[str] = field(default_factory=list)    # copies every layer drops this step
    # built by the first layer that needs them, reused by the others (same step, same group)
    # (isa, dtype, cache shape[, r, start]) -> gather index, or a strided layout (a tuple)
    kv_index: dict = field(default_factory=dict)
    bias: dict = field(default_factory=dict)      # dtype[, r] -> additive mask [R|1, 1, Tq, L]

    @property
    def num_reqs(self) -> int:
        return int(self.req_indices.numel())


@dataclass
class LadeCPUAttentionMetadata(CPUAttentionMetadata):
    tree: TreeAttnPlan | None = None


def build_tree_plan(
    layout: TreeLayout,
    query_start_loc_cpu: torch.Tensor,
    seq_lens_cpu: torch.Tensor,
    block_table: torch.Tensor,
    num_reqs: int,
    block_size: int,
) -> TreeAttnPlan | None:
    """Validate ``layout`` against the batch and precompute the plan."""
    rows = tree_rows(layout, query_start_loc_cpu, seq_lens_cpu, num_reqs)
    if rows is None:
        return None
    R, Tq = rows.query_valid.shape
    T, prefix, kv_lens, masks = rows.sizes, rows.prefix_lens, rows.kv_lens, rows.masks
    query_valid = rows.query_valid
    L = int(kv_lens.max())
    ar_l = torch.arange(L)
    rel = ar_l[None, :] - prefix[:, None]  # [R, L] index into the new tokens
    in_new = (rel >= 0) & (rel < T[:, None])
    new_part = torch.gather(
        masks, 2, rel.clamp(0, Tq - 1)[:, None, :].expand(R, Tq, L)
    ) & in_new[:, None, :]
    in_prefix = ar_l[None, :] < prefix[:, None]
    allowed = (in_prefix[:, None, :] | new_part) & query_valid[:, :, None]
    # padded query rows (discarded) see key 0, so that no softmax row is empty
    allowed[:, :, 0] |= ~query_valid

    nblk = (L + block_size - 1) // block_size
    if nblk > block_table.shape[1]:
        raise ValueError(
            f"lade tree attention: need {nblk} blocks per request but the "
            f"block table has {block_table.shape[1]} columns"
        )
    bt = block_table.index_select(0, rows.req_indices.to(block_table.device))[:, :nblk]
    return TreeAttnPlan(req_indices=rows.req_indices, query_rows=rows.query_rows,
                        query_valid=query_valid, block_table=bt, prefix_lens=prefix,
                        kv_lens=kv_lens, allowed=allowed, flat_src=rows.flat_src,
                        flat_dst=rows.flat_dst, max_query_len=Tq, max_kv_len=L,
                        sizes=T.tolist(), prefixes=prefix.tolist(), tree_masks=masks)


class LadeCPUMetadataBuilder(CPUAttentionMetadataBuilder):
    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> LadeCPUAttentionMetadata:
        md = super().build(common_prefix_len, common_attn_metadata, fast_build)
        layout, tree = get_step_layout(), None
        # Cross-attention (over encoder states) has no intra-step mask and
        # encoder-only attention has no decode step: tree layouts only apply
        # to decoder self-attention groups.
        if (
            layout is not None
            and layout.req_indices
            and not self.is_cross_attention
            and not self.is_encoder_only_attention
        ):
            cam = common_attn_metadata
            tree = build_tree_plan(
                layout,
                cam.query_start_loc_cpu,
                cam.seq_lens.cpu(),
                cam.block_table_tensor,
                cam.num_reqs,
                self.block_size,
            )
            tree.covers_all = (tree.num_reqs == cam.num_reqs
                               and int(tree.flat_dst.numel()) == cam.num_actual_tokens)
            if layout.req_keys is not None:
                tree.req_keys = list(layout.req_keys)
                tree.starts, tree.dropped = self._ledger().plan(
                    tree.req_keys, tree.prefixes, tree.sizes, tree.block_table,
                    self.block_size, layout.stale)
        fields = {f.name: getattr(md, f.name) for f in dataclasses.fields(md)}
        return LadeCPUAttentionMetadata(**fields, tree=tree)

    def _ledger(self) -> PrefixLedger:
        """The dense prefix copies of this group's layers; together they may hold a quarter of
        the paged cache's tokens (32768 rows when the cache size is not known)."""
        ledger = getattr(self, "_lade_ledger", None)
        if ledger is None:
            cache = getattr(getattr(self, "vllm_config", None), "cache_config", None)
            blocks = getattr(cache, "num_gpu_blocks", None)
            budget = blocks * self.block_size // 4 if blocks else 32768
            ledger = self._lade_ledger = PrefixLedger(budget)
        return ledger


class LadeCPUAttentionImpl(CPUAttentionBackendImpl):
    def _check_tree_supported(self, plan: TreeAttnPlan | None = None) -> None:
        unsupported = []
        if self.attn_type != AttentionType.DECODER:
            unsupported.append(f"attn_type={self.attn_type}")
        if self.alibi_slopes is not None:
            unsupported.append("ALiBi")
        if self.sliding_window not in (-1, None) and (
                plan is None or plan.max_kv_len >= self.sliding_window - 1):
            # a window that covers every key changes nothing; the driver only builds trees for
            # requests that fit inside the model's smallest window (LadeDriver.max_tree_len)
            unsupported.append(f"sliding window ({self.sliding_window}) shorter than the sequence")
        if self.logits_soft_cap:
            unsupported.append(f"logits softcap ({self.logits_soft_cap})")
        if self.sinks is not None:
            unsupported.append("attention sinks")
        if self.is_fp8_kv_cache or self.kv_cache_dtype != "auto":
            unsupported.append(f"kv_cache_dtype={self.kv_cache_dtype!r}")
        if unsupported:
            raise NotImplementedError(
                "lade tree attention (CPU) does not support "
                + ", ".join(unsupported)
                + " for tree-decoded requests"
            )

    def forward(
        self,
        layer,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: CPUAttentionMetadata | None,
        output: torch.Tensor,
        output_scale: torch.Tensor | None = None,
        output_block_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        plan = getattr(attn_metadata, "tree", None)
        if plan is not None and plan.covers_all:
            # every row is overwritten below; vLLM's causal kernel would be wasted work
            self._check_tree_supported(plan)
            self._tree_overwrite(layer, query, key, value, kv_cache, plan, output)
            return output
        result = super().forward(layer, query, key, value, kv_cache, attn_metadata, output,
                                 output_scale, output_block_scale)
        if plan is None:
            return result
        self._check_tree_supported(plan)
        self._tree_overwrite(layer, query, key, value, kv_cache, plan, output)
        return result

    def _tree_overwrite(
        self,
        layer,
        query: torch.Tensor,
        key: torch.Tensor | None,
        value: torch.Tensor | None,
        kv_cache: torch.Tensor,
        plan: TreeAttnPlan,
        output: torch.Tensor,
    ) -> None:
        _, _, block_size, two_hd = kv_cache.shape
        head_size = two_hd // 2
        isa = getattr(layer, "isa", None) or _get_attn_isa(
            kv_cache.dtype, block_size, head_size, self.kv_cache_dtype
        )
        cache_key = (isa, kv_cache.dtype, tuple(kv_cache.shape))
        strided = probe_strided(isa, kv_cache.dtype, block_size, head_size, self.kv_cache_dtype)
        if strided is not None and self._kernel_overwrite(query, kv_cache, plan, output,
                                                          strided):
            return
        if plan.req_keys is not None and key is not None and value is not None:
            self._tree_rows_dense(query, key, value, kv_cache, plan, output, cache_key)
            return
        index = plan.kv_index.get(cache_key)
        if index is None:
            # a strided layout (vLLM's vec ISA) is read block by block; any other element by
            # element through a per-step index
            index = strided
            if index is None:
                k_perm, v_perm = probe_layout(isa, kv_cache.dtype, block_size, head_size,
                                              self.kv_cache_dtype)
                index = token_gather_index(kv_cache, plan.block_table, k_perm, v_perm,
                                           plan.max_kv_len)
            plan.kv_index[cache_key] = index
        if isinstance(index, tuple):
            k, v = gather_blocks(kv_cache, plan.block_table, index, plan.max_kv_len)
        else:
            k, v = gather_kv(kv_cache, plan.block_table, None, None, index)   # [R, kvh, L, hd]
        bias = plan.bias.get(query.dtype)
        if bias is None:
            bias = plan.bias[query.dtype] = mask_bias(plan.allowed, query.dtype)
        R, Tq = plan.query_rows.shape
        q = query.view(query.shape[0], self.num_heads, self.head_size)
        q = q.index_select(0, plan.query_rows.reshape(-1)).view(
            R, Tq, self.num_heads, self.head_size
        )
        out = masked_attention(q, k, v, bias, self.scale)
        out_rows = out.reshape(R * Tq, self.num_heads, -1).index_select(
            0, plan.flat_src
        )
        out_view = output.view(output.shape[0], self.num_heads, -1)
        out_view.index_copy_(0, plan.flat_dst, out_rows.to(output.dtype))

    def _kernel_overwrite(self, query, kv_cache, plan: TreeAttnPlan, output, layout) -> bool:
        """The tree rows through the compiled kernel, reading the paged cache in place
        (lade_vllm.attention.tree_kernel); False where it is not built or does not fit."""
        fn = tree_kernel.kernel()
        _, _, block_size, two_hd = kv_cache.shape
        if fn is None or query.dtype != kv_cache.dtype or output.dtype != kv_cache.dtype \
                or not tree_kernel.supports(layout, kv_cache.dtype, block_size, two_hd // 2):
            return False
        args = plan.kv_index.get("kernel")
        if args is None:   # once per step, shared by the layers
            args = plan.kv_index["kernel"] = (
                plan.block_table.to(torch.int32).contiguous(), plan.query_rows.contiguous(),
                torch.tensor(plan.sizes, dtype=torch.long),
                torch.tensor(plan.prefixes, dtype=torch.long),
                plan.tree_masks.to(torch.uint8).contiguous())
        q = query.reshape(query.shape[0], -1)
        out = output.view(output.shape[0], -1)
        tree_kernel.tree_attention(fn, q, out, kv_cache, *args, layout, self.num_heads,
                                   self.scale)
        return True

    def _tree_rows_dense(self, query, key, value, kv_cache, plan: TreeAttnPlan, output,
                         cache_key) -> None:
        """Per tree request: extend this layer's dense copy of its prefix by the rows committed
        since ``plan.starts[r]`` (read from the paged cache) and by the step's tree tokens (the
        layer's ``key``/``value`` rows), then one masked attention over it."""
        dense = self.__dict__.get("_lade_dense")
        if dense is None:
            dense = self._lade_dense = DenseKV()
        dense.drop(plan.dropped)
        isa, dtype, _ = cache_key
        _, kvh, block_size, two_hd = kv_cache.shape
        hd = two_hd // 2
        k_perm, v_perm = probe_layout(isa, dtype, block_size, hd, self.kv_cache_dtype)
        q_all = query.view(query.shape[0], self.num_heads, self.head_size)
        k_all = key.view(key.shape[0], kvh, hd)
        v_all = value.view(value.shape[0], kvh, hd)
        out_view = output.view(output.shape[0], self.num_heads, -1)
        flat = kv_cache.view(-1)
        for r, req in enumerate(plan.req_keys):
            p, T = plan.prefixes[r], plan.sizes[r]
            start = plan.starts[r] if dense.length(req) == plan.starts[r] else 0
            index = plan.kv_index.get((cache_key, r, start))
            if index is None:
                index = plan.kv_index[(cache_key, r, start)] = token_gather_index(
                    kv_cache, plan.block_table[r:r + 1], k_perm, v_perm, p, start)
            new = flat.index_select(0, index.view(-1)).view(2, kvh, p - start, hd)
            rows = plan.query_rows[r, :T]
            k, v = dense.extend(req, start, new[0], new[1], k_all.index_select(0, rows),
                                v_all.index_select(0, rows))
            bias = plan.bias.get((query.dtype, r))
            if bias is None:
                bias = plan.bias[(query.dtype, r)] = mask_bias(
                    plan.allowed[r:r + 1, :T, :p + T], query.dtype)
            out = masked_attention(q_all.index_select(0, rows)[None], k[None], v[None], bias,
                                   self.scale)
            out_view.index_copy_(0, rows, out[0].to(output.dtype))


class LadeCPUAttentionBackend(CPUAttentionBackend):
    """CPU_ATTN with the tree-aware builder and impl (its name stays "CPU_ATTN")."""
    get_impl_cls = staticmethod(lambda: LadeCPUAttentionImpl)
    get_builder_cls = staticmethod(lambda: LadeCPUMetadataBuilder)


BACKEND_PATH = "lade_vllm.attention.cpu_tree.LadeCPUAttentionBackend"
