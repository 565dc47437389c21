"""What one step's proposal looks like between ``LadeEngine.propose`` and ``LadeEngine.accept``:
the proposed trees in the order vLLM sees their nodes ([root | trie | window] per request), the
plan of which of them were scheduled whole, and the subset of a batch's trees to commit."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from lade_vllm.policy import FULL
from lade_vllm.proposer import StepTree
from lade_vllm.proposer import jit
from lade_vllm.proposer.storage_jit import ancestor_kernel, storage_arrays


@dataclass
class Proposal:
    """The trees proposed for the next step, for the requests in ``req_ids``."""
    req_ids: list[str]
    slots: torch.Tensor          # [B]
    last_tokens: torch.Tensor    # [B]
    tree: StepTree | None        # None: CHAIN's chains, proposed without a tree
    drafts: list[list[int]]      # per request: node tokens in storage order, root excluded
    order: list[np.ndarray]      # per request: storage index -> local StepTree node index
    parent: list[np.ndarray]     # per request: storage-order parent (-1 for the root)
    depth: list[np.ndarray]      # per request: storage-order depth
    num_trie: list[int] = field(default_factory=list)  # per request: candidate (trie) nodes
    level: int = FULL            # adaptive policy level of this step
    tree_args: dict = field(default_factory=dict)  # per-request [B] tensors given to propose


@dataclass
class StepPlan:
    """This step's tree requests (batch order) and what verification needs about them."""
    batch_idx: list[int] = field(default_factory=list)
    prop_idx: list[int] = field(default_factory=list)     # index into the Proposal
    num_nodes: list[int] = field(default_factory=list)    # scheduled nodes incl. root
    full: list[bool] = field(default_factory=list)        # whole tree scheduled
    query_start: list[int] = field(default_factory=list)  # first token in the flattened batch
    slot_mapping: list[torch.Tensor] = field(default_factory=list)  # per request [groups, n]

    def add(self, batch_idx: int, prop_idx: int, num_nodes: int, full: bool,
            query_start: int) -> None:
        self.batch_idx.append(batch_idx)
        self.prop_idx.append(prop_idx)
        self.num_nodes.append(num_nodes)
        self.full.append(full)
        self.query_start.append(query_start)


def ancestor_mask(parent: np.ndarray) -> torch.Tensor:
    """[n, n] bool ancestor-or-self mask of a tree whose ``parent`` [n] (int64, -1 for the root) is
    in storage order (a parent before its children)."""
    return torch.from_numpy(ancestor_kernel(np.ascontiguousarray(parent, dtype=np.int64)))


def storage_order(req_ids, slots, lasts, tree: StepTree) -> Proposal:
    """Reorder each request's nodes as [root | trie | window] (parents stay before children).

    On the CPU by a compiled kernel (lade_vllm.proposer.storage_jit; ``LADE_JIT=0``: torch ops),
    with the same fields."""
    if jit.enabled() and tree.tokens.is_cpu:
        return _storage_order_kernel(req_ids, slots, lasts, tree)
    T = tree.total_nodes
    group = torch.where(tree.is_trie, 1, 2)
    group[tree.root_index] = 0
    order = torch.argsort(tree.node_seq * 3 + group, stable=True)       # storage -> tree idx
    inv = torch.empty_like(order)
    inv[order] = torch.arange(T)
    parent_s = torch.where(tree.parent[order] >= 0, inv[tree.parent[order].clamp(min=0)], -1)
    start = tree.seq_start
    tokens_s = tree.tokens[order].numpy()
    parent_s, depth_s = parent_s.numpy(), tree.depth[order].numpy()
    order_np, start_np = order.numpy(), start.numpy()
    drafts, orders, parents, depths = [], [], [], []
    is_trie_s = tree.is_trie[order].numpy()
    num_trie = []
    for b in range(len(req_ids)):
        lo, hi = int(start_np[b]), int(start_np[b + 1])
        drafts.append(tokens_s[lo + 1:hi].tolist())
        orders.append(order_np[lo:hi] - lo)
        parents.append(np.where(parent_s[lo:hi] >= 0, parent_s[lo:hi] - lo, -1))
        depths.append(depth_s[lo:hi])
        num_trie.append(int(is_trie_s[lo:hi].sum()))
    return Proposal(req_ids, slots, lasts, tree, drafts, orders, parents, depths, num_trie)


def _storage_order_kernel(req_ids, slots, lasts, tree: StepTree) -> Proposal:
    """``storage_order`` from ``storage_arrays``: per request, slices of its range."""
    local, parent_s, tokens_s, depth_s, num_trie = storage_arrays(tree)
    tokens = tokens_s.tolist()
    start = tree.seq_start.tolist()
    drafts, orders, parents, depths = [], [], [], []
    for b in range(len(req_ids)):
        lo, hi = start[b], start[b + 1]
        drafts.append(tokens[lo + 1:hi])
        orders.append(local[lo:hi])
        parents.append(parent_s[lo:hi])
        depths.append(depth_s[lo:hi])
    return Proposal(req_ids, slots, lasts, tree, drafts, orders, parents, depths,
                    num_trie.tolist()[:len(req_ids)])


def select_trees(tree: StepTree, sel: torch.Tensor) -> StepTree:
    """The trees of sequences ``sel`` [k] (increasing) of ``tree``, renumbered as a batch of k."""
    num = tree.num_nodes[sel]
    lo = tree.seq_start[sel]
    start = torch.zeros(num.numel() + 1, dtype=tree.seq_start.dtype, device=num.device)
    start[1:] = torch.cumsum(num, 0)
    seq = torch.arange(num.numel(), device=num.device).repeat_interleave(num)
    shift = start[:-1] - lo                                      # new index = old + shift
    old = torch.arange(int(start[-1]), device=num.device) - shift[seq]

    def renumber(index: torch.Tensor, by: torch.Tensor) -> torch.Tensor:
        return torch.where(index >= 0, index + by, -1)

    return StepTree(
        tokens=tree.tokens[old], depth=tree.depth[old],
        parent=renumber(tree.parent[old], shift[seq]), node_seq=seq, is_trie=tree.is_trie[old],
        seq_start=start, num_nodes=num, root_index=start[:-1],
        window_levels=tree.window_levels[sel],
        window_width=tree.window_width[sel],
        top_level_index=renumber(tree.top_level_index[sel], shift[:, None]),
        cand_node_index=renumber(tree.cand_node_index[sel], shift[:, None, None]),
        cand_len=tree.cand_len, max_depth=tree.max_depth)
