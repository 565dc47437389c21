"""Move the accepted path's K/V to the canonical slots p+1..p+a of vLLM's paged cache.

vLLM's scheduler assumes the KV of accepted draft tokens sits right after the committed prefix
(``Scheduler.update_from_output`` rolls ``num_computed_tokens`` back by the rejected count). A tree's
accepted path can be anywhere in the step's storage order, so after verification each of its nodes is
copied, in every layer, from the slot it was written to into the slot of its depth. Sources are
gathered before anything is written, so overlapping moves are safe. The in-block layout of the CPU
cache depends on the ISA; lade_vllm.attention.kv_layout probes it instead of hard-coding it. On
CUDA (FlashAttention) a token's K/V are one ``[kvh, 2*hd]`` slice of the logical cache, moved by
indexing whatever the stride order. Both are checked at engine start
(lade_vllm.attention.self_check) against the backend's own cache writer.

Models with several KV-cache groups (e.g. Gemma 3's sliding-window and global layers) address each
group's layers through that group's own block table, so slots come per group ([G, M]).
"""
from __future__ import annotations

import torch


class KVMover:
    """``layout``: ``"cpu"`` (vLLM's CPU cache, in-block order probed per ISA) or ``"flash"``
    (FlashAttention's: K/V of a token at ``[blk, :, off, :hd]`` / ``[blk, :, off, hd:]`` of the
    logical ``[nb, kvh, bs, 2*hd]`` cache, any stride order); default from ``runner.device``."""

    def __init__(self, runner, layout: str | None = None):
        self.runner = runner
        if layout is None:
            device = getattr(runner, "device", None)
            layout = "flash" if getattr(device, "type", "cpu") == "cuda" else "cpu"
        if layout not in ("cpu", "flash"):
            raise ValueError(f"KVMover layout must be 'cpu' or 'flash', got {layout!r}")
        self.layout = layout
        self._perm = None
        self._groups: list[list[torch.Tensor]] | None = None

    def group_caches(self) -> list[list[torch.Tensor]]:
        """Per KV-cache group, its layers' cache tensors (each tensor once per group).

        ``runner.kv_caches`` lists the layers' caches in layer-index order (vLLM 0.32
        ``v1/worker/utils.py`` ``bind_kv_cache``); the groups name their layers."""
        if self._groups is None:
            from vllm.model_executor.models.utils import extract_layer_index
            caches = [c for c in self.runner.kv_caches if c is not None]
            groups = self.runner.kv_cache_config.kv_cache_groups
            if len(groups) <= 1:
                self._groups = [caches]
            else:
                names = sorted((n for g in groups for n in g.layer_names), key=extract_layer_index)
                by_name = dict(zip(names, caches))
                self._groups = []
                for g in groups:
                    seen, tensors = set(), []
                    for n in g.layer_names:
                        t = by_name.get(n)
                        if t is not None and t.data_ptr() not in seen:
                            seen.add(t.data_ptr())
                            tensors.append(t)
                    self._groups.append(tensors)
        return self._groups

    def _layout(self, cache: torch.Tensor):
        """(k_perm, v_perm) of the CPU layout, or None for FlashAttention's."""
        if self.layout == "flash":
            return None
        if self._perm is None:
            from vllm.config import get_layers_from_vllm_config
            from vllm.model_executor.layers.attention import Attention

            from lade_vllm.attention.kv_layout import probe_layout
            layers = get_layers_from_vllm_config(self.runner.vllm_config, Attention)
            isa = next(iter(layers.values())).isa
            nb, kvh, bs, two_hd = cache.shape
            self._perm = probe_layout(isa, cache.dtype, bs, two_hd // 2)
        return self._perm

    def move(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy slots ``src`` [G, M] to ``dst`` [G, M] (row g: KV-cache group g's slots)."""
        src, dst = src.long().reshape(-1, src.shape[-1]), dst.long().reshape(-1, dst.shape[-1])
        for g, caches in enumerate(self.group_caches()):
            if caches:
                move_slots(caches, src[g], dst[g], self._layout(caches[0]))


def _flat_index(slots: torch.Tensor, cache: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """[M, kvh, hd] flat element indices of ``slots`` in one contiguous CPU-layout cache."""
    nb, kvh, bs, two_hd = cache.shape
    blk, off = slots // bs, slots % bs
    head = torch.arange(kvh, device=slots.device)[None, :, None] * (bs * two_hd)
    return blk[:, None, None] * (kvh * bs * two_hd) + head + perm.to(slots.device)[off][:, None, :]


def move_slots(caches: list[torch.Tensor], src: torch.Tensor, dst: torch.Tensor,
               perms: tuple[torch.Tensor, torch.Tensor] | None) -> None:
    """Copy the K/V of slots ``src`` [M] to slots ``dst`` [M] in every cache of ``caches`` (one
    KV-cache group: same shape). ``perms``: the CPU layout's ``(k_perm, v_perm)``
    (lade_vllm.attention.kv_layout.probe_layout); None: FlashAttention's layout. Every source is
    read before any destination is written."""
    if not caches or src.numel() == 0:
        return
    cache0 = caches[0]
    src = src.long().to(cache0.device)
    dst = dst.long().to(cache0.device)
    if perms is None:
        bs = cache0.shape[2]
        sb, so, db, do = src // bs, src % bs, dst // bs, dst % bs
        for cache in caches:
            cache[db, :, do] = cache[sb, :, so]          # [M, kvh, 2*hd], gathered first
        return
    k_perm, v_perm = perms
    idx_src = torch.cat([_flat_index(src, cache0, k_perm),
                         _flat_index(src, cache0, v_perm)]).reshape(-1)
    idx_dst = torch.cat([_flat_index(dst, cache0, k_perm),
                         _flat_index(dst, cache0, v_perm)]).reshape(-1)
    for cache in caches:
        flat = cache.view(-1)
        flat[idx_dst] = flat[idx_src]
