"""One decoding step's token tree for a batch, flattened across sequences.

Per sequence b, nodes are laid out contiguously from ``seq_start[b]``:

    [ root t | window nodes | candidate trie nodes ]

* root: the last committed token t, at position p (depth 0).
* window nodes, level-major (row-major): row 0 columns 1..w-1, then level 1 columns 0..w-1, ...,
  level f-1 columns 0..w-1 (f = filled levels, w = the sequence's window width). With the root taken
  as row 0 column 0, grid cell (l, c) is node ``seq_start[b] + l*w + c``. Depth (position offset from
  p) is l+c. Parent: row 0 column c -> row 0 column c-1; level l >= 1 column c -> level l-1 column c.
* trie nodes, depth-major (all depth-1 nodes, then depth-2, ...; inside one depth in lexicographic
  order of the node's token prefix). Candidates sharing a prefix share nodes; children of a node have distinct tokens
  (unless ``merge=False``, used by tests). A node at depth j+1 is token j of a candidate; its parent is
  the root (j = 0) or the node of the candidate's first j tokens.

Every node's ancestors (itself included) are exactly the tokens it may attend to besides the
committed prefix, and they occupy consecutive positions p..p+depth. This reproduces the lookahead
attention rules (DESIGN.md section 1): window nodes never see candidates and vice versa.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

@dataclass
class StepTree:
    """Flattened step trees; T = total nodes, B = sequences, W = window columns, G x D candidates."""

    tokens: torch.Tensor           # [T] int64
    depth: torch.Tensor            # [T] position offset from the sequence's p
    parent: torch.Tensor           # [T] flattened parent index, -1 for roots
    node_seq: torch.Tensor         # [T] sequence index of each node
    is_trie: torch.Tensor          # [T] bool, candidate trie node
    seq_start: torch.Tensor        # [B+1] node offsets (cumsum of num_nodes)
    num_nodes: torch.Tensor        # [B]
    root_index: torch.Tensor       # [B] == seq_start[:-1]
    num_window_nodes: torch.Tensor  # [B] window nodes besides the root
    window_levels: torch.Tensor    # [B] levels fed (0 = no lookahead window for that sequence)
    window_width: torch.Tensor     # [B] columns fed
    top_level_index: torch.Tensor  # [B, W] nodes whose outputs form the next level, -1 pad
    cand_node_index: torch.Tensor  # [B, G, D] node of each candidate token, -1 if not fed
    cand_len: int                  # D, the candidate length fed
    max_depth: int                 # a static upper bound of depth

    @property
    def num_seqs(self) -> int:
        return self.num_nodes.numel()

    @property
    def total_nodes(self) -> int:
        return self.tokens.numel()

    def positions(self, base_positions: torch.Tensor) -> torch.Tensor:
        """Absolute positions [T] given p [B] per sequence."""
        return base_positions.long()[self.node_seq] + self.depth

    def ancestors(self) -> torch.Tensor:
        """[T, max_depth+1]: column k is the k-th ancestor (0 = the node itself), -1 past the root.

        Node i's ancestor at column k sits at depth[i]-k, so row i lists its visible tree tokens
        from the newest position down to p.
        """
        T = self.total_nodes
        out = torch.full((T, self.max_depth + 1), -1, dtype=torch.long, device=self.tokens.device)
        cur = torch.arange(T, device=self.tokens.device)
        out[:, 0] = cur
        for k in range(1, self.max_depth + 1):
            cur = torch.where(cur >= 0, self.parent[cur.clamp(min=0)], -1)
            out[:, k] = cur
        return out

    def mask_dense(self) -> torch.Tensor:
        """[T, T] bool, mask[i, j] = j is i or an ancestor of i (block diagonal over sequences)."""
        T = self.total_nodes
        anc = self.ancestors()
        mask = torch.zeros((T, T), dtype=torch.bool, device=self.tokens.device)
        rows = torch.arange(T, device=self.tokens.device)[:, None].expand_as(anc)
        ok = anc >= 0
        mask[rows[ok], anc[ok]] = True
        return mask

    def ancestor_mask(self, seq: int) -> torch.Tensor:
        """[T_b, T_b] bool ancestor-or-self mask of sequence ``seq`` (local node indices)."""
        lo, hi = int(self.seq_start[seq]), int(self.seq_start[seq + 1])
        parent = self.parent[lo:hi] - lo
        n = hi - lo
        mask = torch.eye(n, dtype=torch.bool, device=self.tokens.device)
        cur = torch.arange(n, device=self.tokens.device)
        for _ in range(self.max_depth):
            cur = torch.where(cur >= 0, parent[cur.clamp(min=0)], -1)
            ok = cur >= 0
            mask[torch.arange(n, device=cur.device)[ok], cur[ok]] = True
        return mask


def build_step_trees(last_tokens: torch.Tensor, window_levels: torch.Tensor, num_filled: torch.Tensor,
                     cands: torch.Tensor, cand_valid: torch.Tensor, max_cand_len: int | None = None,
                     window_size: torch.Tensor | None = None, num_cands: torch.Tensor | None = None,
                     merge: bool = True) -> StepTree:
    """Build the step trees of B sequences.

    last_tokens [B]: t. window_levels [B, L, W]: ``JacobiWindows`` levels (``[:, 0, 0]`` ignored).
    num_filled [B]: levels to feed (0 = no window, the tree is root + candidates; use 0 together with
    no valid candidates to disable lookahead for a sequence). cands [B, G, D0] / cand_valid [B, G]:
    candidates from ``NgramPool.lookup``; a candidate with a negative token is dropped.
    max_cand_len: feed only the first tokens of each candidate. window_size [B]: columns per sequence
    (<= W, default W). num_cands [B]: use only the first candidates per sequence (default all).
    merge=False keeps every candidate as its own chain (for tests).
    """
    dev = last_tokens.device
    B, L, W = window_levels.shape
    G, D = cands.shape[1], cands.shape[2]
    if max_cand_len is not None:
        D = max(min(D, max_cand_len), 0)
    cands = cands[:, :, :D].long()
    last_tokens = last_tokens.long()
    width = torch.full((B,), W, dtype=torch.long, device=dev) if window_size is None \
        else window_size.long().clamp(0, W)
    filled = num_filled.long().clamp(0, L)
    filled = torch.where(width > 0, filled, 0)
    width = torch.where(filled > 0, width, 0)
    n_win = torch.where(filled > 0, filled * width - 1, 0)

    # ---- candidate trie. Candidates are sorted lexicographically per sequence (invalid last), so
    # candidates sharing a prefix are adjacent; the first of a run of equal prefixes owns the node.
    # Trie nodes are laid out in (depth j, sorted candidate i) order.
    valid = cand_valid.bool() & (cands >= 0).all(-1)
    if num_cands is not None:
        valid = valid & (torch.arange(G, device=dev)[None, :] < num_cands.long()[:, None])
    if D == 0:
        valid = torch.zeros_like(valid)
    perm = torch.arange(G, device=dev).expand(B, G)
    if merge and G > 1 and D > 0:
        keyed = torch.where(valid[:, :, None], cands + 1, 0)                 # tokens + 1 <= 2**31
        for j in reversed(range(0, D, 2)):  # LSD radix sort, two tokens per int64 key
            hi = keyed[:, :, j]
            lo = keyed[:, :, j + 1] if j + 1 < D else torch.zeros_like(hi)
            key = torch.where(valid, hi * ((1 << 31) + 1) + lo, torch.iinfo(torch.int64).max)
            perm = perm.gather(1, key.gather(1, perm).argsort(dim=1, stable=True))
        sc = cands.gather(1, perm[:, :, None].expand(B, G, D))
        sv = valid.gather(1, perm)
        new_prefix = torch.ones((B, G, D), dtype=torch.bool, device=dev)
        new_prefix[:, 1:] = (sc[:, 1:] != sc[:, :-1]).long().cumsum(2) > 0
    else:
        sc, sv = cands, valid
        new_prefix = torch.ones((B, G, D), dtype=torch.bool, device=dev)
    owner = new_prefix & sv[:, :, None]                                       # [B, G, D] sorted
    owner_jg = owner.transpose(1, 2).reshape(B, D * G)                        # (j, i) order
    n_trie = owner_jg.sum(1)
    num_nodes = 1 + n_win + n_trie
    seq_start = torch.zeros(B + 1, dtype=torch.long, device=dev)
    torch.cumsum(num_nodes, 0, out=seq_start[1:])
    T = int(seq_start[-1])
    root = seq_start[:-1]

    # every node is written through a scatter whose dump slot T takes what does not exist
    tokens = torch.empty(T + 1, dtype=torch.long, device=dev)
    depth = torch.empty(T + 1, dtype=torch.long, device=dev)
    parent = torch.empty(T + 1, dtype=torch.long, device=dev)
    is_trie = torch.zeros(T + 1, dtype=torch.bool, device=dev)

    # ---- window grid cells (l, c); (0, 0) is the root
    lvl = torch.arange(L, device=dev)[None, :, None]
    col = torch.arange(W, device=dev)[None, None, :]
    wid = width[:, None, None]
    exists = (lvl < filled[:, None, None]) & (col < wid)
    grid = root[:, None, None] + lvl * wid + col                              # [B, L, W]
    grid_parent = torch.where(lvl == 0, grid - 1, grid - wid)
    win_tokens = window_levels.long().clone()
    win_tokens[:, 0, 0] = last_tokens
    dest = torch.where(exists, grid, T).reshape(-1)
    tokens.scatter_(0, dest, win_tokens.reshape(-1))
    depth.scatter_(0, dest, (lvl + col).expand(B, L, W).reshape(-1))
    parent.scatter_(0, dest, grid_parent.reshape(-1))
    # roots (also when there is no window)
    tokens[root] = last_tokens
    depth[root] = 0
    parent[root] = -1
    top_col = torch.arange(W, device=dev)[None, :]
    top = root[:, None] + (filled[:, None] - 1) * width[:, None] + top_col
    top_level_index = torch.where((filled[:, None] > 0) & (top_col < width[:, None]), top, -1)

    # ---- trie nodes
    rank = owner_jg.long().cumsum(1) - 1                                      # [B, D*G]
    node_jg = (root + 1 + n_win)[:, None] + rank
    node = torch.where(owner, node_jg.reshape(B, D, G).transpose(1, 2), -1)   # [B, G, D] sorted
    node_of = node.cummax(1).values                                           # owner of each prefix
    node_of = torch.where(sv[:, :, None], node_of, -1)
    cand_node_index = torch.empty_like(node_of).scatter_(1, perm[:, :, None].expand(B, G, D), node_of)
    par = torch.cat([root[:, None, None].expand(B, G, 1), node_of[:, :, :-1]], 2)
    dest = torch.where(owner, node, T).reshape(-1)
    tokens.scatter_(0, dest, sc.reshape(-1))
    depth.scatter_(0, dest, torch.arange(1, D + 1, device=dev).expand(B, G, D).reshape(-1))
    parent.scatter_(0, dest, par.reshape(-1))
    is_trie.scatter_(0, dest, torch.ones_like(dest, dtype=torch.bool))

    node_seq = torch.repeat_interleave(torch.arange(B, device=dev), num_nodes, output_size=T)
    return StepTree(
        tokens=tokens[:T], depth=depth[:T], parent=parent[:T], node_seq=node_seq,
        is_trie=is_trie[:T], seq_start=seq_start, num_nodes=num_nodes, root_index=root,
        num_window_nodes=n_win, window_levels=filled, window_width=width,
        top_level_index=top_level_index, cand_node_index=cand_node_index, cand_len=D,
        max_depth=max(W - 1 + L - 1, D, 0))
