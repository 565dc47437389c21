"""One step's tree requests as batch rows: the validation and index math both tree backends share
(CPU and CUDA), in pure torch (no vLLM import)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lade_vllm.attention import TreeLayout


@dataclass
class TreeRows:
    """R tree requests of one step, padded to Tq = the largest tree (all tensors on the CPU)."""

    req_indices: torch.Tensor   # [R] long, batch indices
    sizes: torch.Tensor         # [R] long, tree size T per request
    kv_lens: torch.Tensor       # [R] long, p + T
    prefix_lens: torch.Tensor   # [R] long, p
    query_valid: torch.Tensor   # [R, Tq] bool
    query_rows: torch.Tensor    # [R, Tq] long rows of the flattened token dim (padding: row 0)
    masks: torch.Tensor         # [R, Tq, Tq] bool tree masks, padded
    flat_src: torch.Tensor      # [n] long, the valid entries of the R*Tq padded rows
    flat_dst: torch.Tensor      # [n] long, their token rows

    @property
    def max_query_len(self) -> int:
        return int(self.query_valid.shape[1])


def _check_indices(layout: TreeLayout, num_reqs: int) -> torch.Tensor:
    if len(layout.req_indices) != len(layout.tree_masks):
        raise ValueError(f"lade TreeLayout: {len(layout.req_indices)} req_indices but "
                         f"{len(layout.tree_masks)} tree_masks")
    ridx = torch.as_tensor(layout.req_indices, dtype=torch.long)
    if ridx.min() < 0 or ridx.max() >= num_reqs:
        raise ValueError(f"lade TreeLayout: req_indices {layout.req_indices} out of range "
                         f"for a batch of {num_reqs} requests")
    if torch.unique(ridx).numel() != ridx.numel():
        raise ValueError(f"lade TreeLayout: duplicate req_indices {layout.req_indices}")
    for r, m in enumerate(layout.tree_masks):
        if m.dim() != 2 or m.shape[0] != m.shape[1] or m.shape[0] == 0:
            raise ValueError(f"lade TreeLayout: tree_masks[{r}] must be a non-empty square "
                             f"[T, T] tensor, got shape {tuple(m.shape)}")
    return ridx


def tree_rows(layout: TreeLayout, query_start_loc_cpu: torch.Tensor,
              seq_lens_cpu: torch.Tensor, num_reqs: int) -> TreeRows | None:
    """Validate ``layout`` against the batch (query lengths, sequence lengths) and lay its trees
    out as padded rows. None when the layout has no tree requests."""
    if not layout.req_indices and not layout.tree_masks:
        return None
    ridx = _check_indices(layout, num_reqs)
    T = torch.tensor([m.shape[0] for m in layout.tree_masks], dtype=torch.long)
    qsl = query_start_loc_cpu.to(device="cpu", dtype=torch.long)
    q_start = qsl[ridx]
    q_len = qsl[ridx + 1] - q_start
    bad = (q_len != T).nonzero().flatten().tolist()
    if bad:
        r = bad[0]
        raise ValueError(
            f"lade tree attention: request at batch index {int(ridx[r])} has {int(q_len[r])} "
            f"scheduled query tokens but its tree mask has T={int(T[r])} nodes; they must be "
            "equal (was the request's token budget truncated?)")
    kv_lens = seq_lens_cpu.to(device="cpu", dtype=torch.long)[ridx]
    prefix = kv_lens - T
    if (prefix < 0).any():
        r = int((prefix < 0).nonzero()[0])
        raise ValueError(f"lade tree attention: request at batch index {int(ridx[r])} has "
                         f"seq_len {int(kv_lens[r])} < tree size {int(T[r])}")
    R, Tq = len(layout.tree_masks), int(T.max())
    ar = torch.arange(Tq)
    valid = ar[None, :] < T[:, None]
    rows = q_start[:, None] + torch.where(valid, ar[None, :], 0)
    masks = torch.zeros(R, Tq, Tq, dtype=torch.bool)
    for r, m in enumerate(layout.tree_masks):
        t = int(T[r])
        masks[r, :t, :t] = m.to(device="cpu", dtype=torch.bool)
    flat_src = valid.reshape(-1).nonzero().flatten()
    return TreeRows(req_indices=ridx, sizes=T, kv_lens=kv_lens, prefix_lens=prefix,
                    query_valid=valid, query_rows=rows, masks=masks, flat_src=flat_src,
                    flat_dst=rows.reshape(-1)[flat_src])
