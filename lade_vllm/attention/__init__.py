"""Tree-masked attention for lade-vllm.

Per-step API used by the model runner (no vLLM import here, so it is cheap to
import from anywhere):

    set_step_layout(TreeLayout(req_indices=[...], tree_masks=[...]))
    ... build attention metadata / run the forward ...
    set_step_layout(None)

The CPU backend (:mod:`lade_vllm.attention.cpu_tree`) reads the layout in its
metadata builder's ``build()``; the patch record
``lade_vllm.adapter.runtime.CPU_TREE_BACKEND`` registers it in every process.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = [
    "TreeLayout",
    "set_step_layout",
    "get_step_layout",
]


@dataclass
class TreeLayout:
    """Tree structure of one step's scheduled tokens.

    req_indices: batch indices (in ``query_start_loc`` order) of the requests
        decoded as trees this step.
    tree_masks: per such request a ``[T_r, T_r]`` bool tensor in storage
        order (the root, i.e. the last committed token, included):
        ``tree_masks[r][i, j]`` is True iff new token j is visible to new
        token i (its ancestors and itself). The request's scheduled query
        length must be exactly ``T_r``; every new token also sees the whole
        already-computed prefix.
    req_keys: optional, per such request a stable id (the request id). When given, the CPU
        backend keeps a dense copy of each request's prefix K/V between steps.
    stale: request ids whose copies must go (finished, or resumed from preemption since the
        last layout).
    """

    req_indices: list[int] = field(default_factory=list)
    tree_masks: list[torch.Tensor] = field(default_factory=list)
    req_keys: list[str] | None = None
    stale: list[str] = field(default_factory=list)


_STEP_LAYOUT: TreeLayout | None = None


def set_step_layout(layout: TreeLayout | None) -> None:
    """Publish (or clear, with None) the tree layout of the current step."""
    global _STEP_LAYOUT
    if layout is not None and len(layout.req_indices) != len(layout.tree_masks):
        raise ValueError(
            f"TreeLayout has {len(layout.req_indices)} req_indices but "
            f"{len(layout.tree_masks)} tree_masks"
        )
    _STEP_LAYOUT = layout


def get_step_layout() -> TreeLayout | None:
    """The layout published for the current step, or None."""
    return _STEP_LAYOUT
