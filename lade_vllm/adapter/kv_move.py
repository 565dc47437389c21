"""Move the accepted path's K/V to the canonical slots p+1..p+a of vLLM's paged cache.

vLLM's scheduler assumes the KV of accepted draft tokens sits right after the committed prefix
(``Scheduler.update_from_output`` rolls ``num_computed_tokens`` back by the rejected count). A tree's
accepted path can be anywhere in the step's storage order, so after verification each of its nodes is
copied, in every layer, from the slot it was written to into the slot of its depth. Sources are
gathered before anything is written, so overlapping moves are safe. The in-block layout of the CPU
cache depends on the ISA; lade_vllm.attention.kv_layout probes it instead of hard-coding it.

Models with several KV-cache groups (e.g. Gemma 3's sliding-window and global layers) address each
group's layers through that group's own block table, so slots come per group ([G, M]).
"""
from __future__ import annotations

import torch


class KVMover:
    def __init__(self, runner):
        self.runner = runner
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
        if self._perm is None:
            from vllm.config import get_layers_from_vllm_config
            from vllm.model_executor.layers.attention import Attention

            from lade_vllm.attention.kv_layout import probe_layout
            layers = get_layers_from_vllm_config(self.runner.vllm_config, Attention)
            isa = next(iter(layers.values())).isa
            nb, kvh, bs, two_hd = cache.shape
            self._perm = probe_layout(isa, cache.dtype, bs, two_hd // 2)
        return self._perm

    def _flat_index(self, slots: torch.Tensor, cache: torch.Tensor, perm: torch.Tensor):
        """[M, kvh, hd] flat element indices of ``slots`` in one layer's cache."""
        nb, kvh, bs, two_hd = cache.shape
        blk, off = slots // bs, slots % bs
        head = torch.arange(kvh)[None, :, None] * (bs * two_hd)
        return blk[:, None, None] * (kvh * bs * two_hd) + head + perm[off][:, None, :]

    def move(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy slots ``src`` [G, M] to ``dst`` [G, M] (row g: KV-cache group g's slots)."""
        src, dst = src.long().reshape(-1, src.shape[-1]), dst.long().reshape(-1, dst.shape[-1])
        for g, caches in enumerate(self.group_caches()):
            if not caches:
                continue
            k_perm, v_perm = self._layout(caches[0])
            idx_src = torch.cat([self._flat_index(src[g], caches[0], k_perm),
                                 self._flat_index(src[g], caches[0], v_perm)]).reshape(-1)
            idx_dst = torch.cat([self._flat_index(dst[g], caches[0], k_perm),
                                 self._flat_index(dst[g], caches[0], v_perm)]).reshape(-1)
            for cache in caches:
                flat = cache.view(-1)
                flat[idx_dst] = flat[idx_src]
