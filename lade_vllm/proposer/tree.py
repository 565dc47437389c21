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
attention rules of the paper (Fu et al. 2024): window nodes never see candidates and vice versa.
"""
from __future__ import annotations

import collections
import functools
from dataclasses import dataclass

import torch

from . import jit
from .tree_jit import step_tree_fields

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


_I64_MAX = torch.iinfo(torch.int64).max
_I64_MIN = torch.iinfo(torch.int64).min


@functools.lru_cache(maxsize=16)
def _shape_consts(L: int, W: int, G: int, D: int, device: torch.device) -> dict:
    """Batch-independent constants of the padded layout (see ``build_step_trees``)."""
    lvl = torch.arange(L, device=device)[:, None].expand(L, W).reshape(-1)
    col = torch.arange(W, device=device)[None, :].expand(L, W).reshape(-1)
    cell = torch.arange(L * W, device=device)
    root = torch.zeros(L * W, dtype=torch.bool, device=device)
    root[0] = True
    return dict(
        lvl=lvl, col=col, root=root,
        # padded parent of grid cells (the root points at itself; fixed after compaction)
        grid_parent=torch.where(lvl == 0, cell - 1, cell - W).clamp(min=0),
        depth=torch.cat([lvl + col, torch.arange(1, D + 1, device=device).repeat_interleave(G)]),
        cand_col=torch.arange(G, device=device)[None, :, None],
        win_col=torch.arange(W, device=device)[None, :],
        cand_range=torch.arange(G, device=device)[None, :])


#: (L, W, G, D, device) -> (capacity, constants, views by batch size); the most recently used
#: MAX_LAYOUTS layouts are kept (per-request options make the layout vary step to step)
_BATCH_CONSTS: collections.OrderedDict = collections.OrderedDict()
MAX_LAYOUTS = 16


def _batch_consts(B: int, L: int, W: int, G: int, D: int, device: torch.device) -> dict:
    """Constants of the padded layout for B sequences, per padded slot b*P + k. Built once for a
    capacity of batch sizes (a power of two) and handed out as views of its first B rows."""
    shape = (L, W, G, D, device)
    entry = _BATCH_CONSTS.get(shape)
    if entry is None or entry[0] < B:
        cap = 1 << max(B - 1, 0).bit_length()
        entry = (cap, _build_batch_consts(cap, L, W, G, D, device), {})
        _BATCH_CONSTS[shape] = entry
        if len(_BATCH_CONSTS) > MAX_LAYOUTS:
            _BATCH_CONSTS.popitem(last=False)
    _BATCH_CONSTS.move_to_end(shape)
    cap, full, views = entry
    out = views.get(B)
    if out is None:
        P = L * W + D * G
        out = {k: (v[:B * P] if v.dim() == 1 else v[:B]) for k, v in full.items()}
        out["seq_start0"] = full["seq_start0"]
        views[B] = out
    return out


def _build_batch_consts(B: int, L: int, W: int, G: int, D: int, device: torch.device) -> dict:
    c = _shape_consts(L, W, G, D, device)
    LW, P = L * W, L * W + D * G
    bP = torch.arange(B, device=device) * P
    return dict(
        seq=torch.arange(B, device=device).repeat_interleave(P),                  # [B*P]
        depth=c["depth"].repeat(B),                                               # [B*P]
        trie=(torch.arange(P, device=device) >= LW).repeat(B),                    # [B*P]
        grid_parent=c["grid_parent"][None, :] + bP[:, None],                      # [B, L*W]
        trie_base=(bP[:, None] + LW + torch.arange(D, device=device) * G)[:, None, :],  # [B, 1, D]
        first_row=torch.ones((B, 1, D), dtype=torch.bool, device=device),
        root_parent=torch.zeros((B, G, 1), dtype=torch.long, device=device) + bP[:, None, None],
        seq_start0=torch.zeros(1, dtype=torch.long, device=device),
        top_base=bP[:, None] + c["win_col"])                                      # [B, W]


def _lex_sort(cands: torch.Tensor, valid: torch.Tensor):
    """Sort each row of candidates [B, G, D] (tokens >= 0 where valid) lexicographically, invalid
    ones last (stable). Returns (perm [B, G], sorted keys [B, G] or None, bits per token).

    The keys pack the D tokens of a valid candidate into one int64 (``bits`` bits each, most
    significant first): the tokens themselves when they fit, else their dense per-row ranks; invalid
    candidates get the largest int64. Falls back to an LSD radix sort (keys None) when even the ranks
    do not fit."""
    B, G, D = cands.shape
    bits = (int(cands.max()) + 1).bit_length()   # tokens <= 2**bits - 2: no valid key is all ones
    if bits * D > 64:
        # dense per-row ranks of the tokens (same order)
        bits = (G * D + 1).bit_length()
        if bits * D > 64:
            return _lex_perm_radix(cands, valid), None, 0
        sv, si = cands.reshape(B, G * D).sort(1)
        step = torch.ones_like(sv)
        step[:, 1:] = sv[:, 1:] != sv[:, :-1]
        cands = torch.empty_like(sv).scatter_(1, si, step.cumsum(1)).view(B, G, D)
    weights = torch.tensor([1 << (bits * (D - 1 - j)) for j in range(D)], device=cands.device)
    key = cands @ weights if cands.device.type == "cpu" else (cands * weights).sum(-1)
    if bits * D == 64:  # the top bit is the sign bit: flip it so that signed order = unsigned order
        key = key ^ _I64_MIN
    ks, perm = torch.where(valid, key, _I64_MAX).sort(dim=1, stable=True)
    return perm, ks, bits


def _lex_perm_radix(cands: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """The permutation of ``_lex_sort`` by an LSD radix sort, two tokens per pass (any length)."""
    B, G, D = cands.shape
    perm = torch.arange(G, device=cands.device).expand(B, G)
    keyed = torch.where(valid[:, :, None], cands + 1, 0)                 # tokens + 1 <= 2**31
    for j in reversed(range(0, D, 2)):
        hi = keyed[:, :, j]
        lo = keyed[:, :, j + 1] if j + 1 < D else torch.zeros_like(hi)
        key = torch.where(valid, hi * ((1 << 31) + 1) + lo, torch.iinfo(torch.int64).max)
        perm = perm.gather(1, key.gather(1, perm).argsort(dim=1, stable=True))
    return perm


def _usable(cands: torch.Tensor, cand_valid: torch.Tensor, num_cands: torch.Tensor | None):
    """(cands, valid [B, G], tok_ok [B, G, D] or None): a candidate ends before its first negative
    token (one starting with it is dropped); with ``num_cands`` only the newest valid ones stay.
    Where a candidate ends early its padding becomes a token larger than all, so that it sorts
    after the longer candidates sharing its prefix (tok_ok then marks its real tokens)."""
    B, G, D = cands.shape
    if D == 0:
        return cands, torch.zeros(cand_valid.shape, dtype=torch.bool, device=cands.device), None
    tok_ok = (cands >= 0).cumprod(2).bool()                                   # [B, G, D]
    valid = cand_valid.bool() & tok_ok[:, :, 0]
    if bool(tok_ok[valid].all()):
        tok_ok = None
    else:
        cands = torch.where(tok_ok, cands, int(cands.max()) + 1)
    if num_cands is not None:
        # keep the newest valid candidates (pools list them oldest first):
        # a continuation seen again is refreshed to newest, so the newest are the likeliest
        newer = valid.flip(1).cumsum(1).flip(1)          # valid candidates at this index or after
        valid = valid & (newer <= num_cands.long()[:, None])
    return cands, valid, tok_ok


def _candidate_trie(cands, cand_valid, num_cands, cand_len, merge, sc_, bc):
    """The candidate trie. Candidates are sorted lexicographically per sequence (invalid last), so
    candidates sharing a prefix are adjacent; the first of a run of equal prefixes owns the node.

    Returns (perm [B, G] or None, sorted candidates [B, G, D], sv [B, G, 1|D] token fed, owner
    [B, G, D] token owns a node, node_g [B, G, D] padded global slot of each token's node)."""
    B, G, D = cands.shape
    dev = cands.device
    cands, valid, tok_ok = _usable(cands, cand_valid, num_cands)
    if merge and G > 1 and D > 0 and B > 0:
        perm, ks, bits = _lex_sort(cands, valid)
        sc = cands.gather(1, perm[:, :, None].expand(B, G, D))
        if ks is not None:
            sv = ks != _I64_MAX
            # sorted candidate i owns its depth-j node iff its first j+1 tokens differ from i-1's,
            # i.e. the keys differ in their top (j+1)*bits bits
            shifts = torch.tensor([bits * (D - 1 - j) for j in range(D)], device=dev)
            diff = ((ks[:, 1:] ^ ks[:, :-1])[:, :, None] >> shifts) != 0
        else:
            sv = valid.gather(1, perm)
            diff = (sc[:, 1:] != sc[:, :-1]).long().cumsum(2) > 0
        owner = torch.cat([bc["first_row"], diff], 1)
        owner &= sv[:, :, None]                                               # [B, G, D] sorted
        # the node of a sorted candidate's depth-j prefix: its first candidate's (padded, global)
        node_g = torch.where(owner, sc_["cand_col"], 0).cummax(1).values + bc["trie_base"]
    else:
        perm, sc, sv = None, cands, valid
        owner = sv[:, :, None].expand(B, G, D)
        node_g = sc_["cand_col"] + bc["trie_base"]
    sv = sv[:, :, None]                                                       # [B, G, 1|D]
    if tok_ok is not None:
        tok_sorted = tok_ok if perm is None else tok_ok.gather(1, perm[:, :, None].expand(B, G, D))
        owner = owner & tok_sorted
        sv = sv & tok_sorted
    if cand_len is not None and D > 0:
        deep_ok = torch.arange(D, device=dev)[None, None, :] < cand_len.long()[:, None, None]
        owner = owner & deep_ok
        sv = sv & deep_ok
    return perm, sc, sv, owner, node_g


def _use_kernel(*tensors) -> bool:
    """The compiled kernel builds the trees: every input is on the CPU and LADE_JIT is not 0."""
    if not jit.enabled():
        return False
    return all(t is None or t.is_cpu for t in tensors)


def build_step_trees(last_tokens: torch.Tensor, window_levels: torch.Tensor, num_filled: torch.Tensor,
                     cands: torch.Tensor, cand_valid: torch.Tensor, max_cand_len: int | None = None,
                     window_size: torch.Tensor | None = None, num_cands: torch.Tensor | None = None,
                     merge: bool = True, cand_len: torch.Tensor | None = None) -> StepTree:
    """Build the step trees of B sequences.

    last_tokens [B]: t. window_levels [B, L, W]: ``JacobiWindows`` levels (``[:, 0, 0]`` ignored).
    num_filled [B]: levels to feed (0 = no window, the tree is root + candidates; use 0 together with
    no valid candidates to disable lookahead for a sequence). cands [B, G, D0] / cand_valid [B, G]:
    candidates from ``NgramPool.lookup``; a candidate with a negative token is dropped.
    max_cand_len: feed only the first tokens of each candidate. window_size [B]: columns per sequence
    (<= W, default W). num_cands [B]: use only the newest candidates per sequence (default all).
    cand_len [B]: feed only the first cand_len[b] tokens of sequence b's candidates (default all).
    merge=False keeps every candidate as its own chain (for tests).

    On the CPU the trees come from a compiled kernel (lade_vllm.proposer.tree_jit; ``LADE_JIT=0``
    keeps the torch code below), with the same fields.

    Implementation: every sequence gets a padded row of P = L*W + D*G node slots, [window grid cell
    (l, c) at l*W + c | trie slot (depth j, sorted candidate i) at L*W + j*G + i], of which the
    existing nodes are kept in row order (which is the documented node order) by one compaction.
    """
    dev = last_tokens.device
    B, L, W = window_levels.shape
    G, D = cands.shape[1], cands.shape[2]
    if max_cand_len is not None:
        D = max(min(D, max_cand_len), 0)
    if _use_kernel(last_tokens, window_levels, num_filled, cands, cand_valid, window_size,
                   num_cands, cand_len):
        return StepTree(**step_tree_fields(last_tokens, window_levels, num_filled, cands,
                                           cand_valid, D, window_size, num_cands, cand_len, merge),
                        cand_len=D, max_depth=max(W - 1 + L - 1, D, 0))
    LW = L * W
    P = LW + D * G
    sc_ = _shape_consts(L, W, G, D, dev)
    bc = _batch_consts(B, L, W, G, D, dev)
    cands = cands[:, :, :D].long()
    filled = num_filled.long().clamp(0, L)
    if window_size is None:
        width = torch.where(filled > 0, W, 0)
    else:
        width = window_size.long().clamp(0, W)
        filled = torch.where(width > 0, filled, 0)
        width = torch.where(filled > 0, width, 0)

    perm, sc, sv, owner, node_g = _candidate_trie(cands, cand_valid, num_cands, cand_len, merge,
                                                  sc_, bc)

    # ---- padded rows: [grid cell (l, c) at l*W + c | trie (depth j, sorted candidate i) at
    # L*W + j*G + i]; the existing slots, in row order, are the nodes in the documented order
    grid_ok = (sc_["lvl"] < filled[:, None]) & (sc_["col"] < width[:, None])   # [B, L*W]
    grid_ok |= sc_["root"]
    ex = torch.cat([grid_ok, owner.transpose(1, 2).reshape(B, D * G)], 1).view(-1)   # [B*P]
    tok_pad = torch.cat([window_levels.reshape(B, LW), sc.transpose(1, 2).reshape(B, D * G)], 1)
    tok_pad[:, 0] = last_tokens
    trie_par = torch.cat([bc["root_parent"], node_g[:, :, :-1]], 2)[:, :, :D]
    par_pad = torch.cat([bc["grid_parent"], trie_par.transpose(1, 2).reshape(B, D * G)], 1)

    # ---- compaction
    idx = ex.nonzero().view(-1)                                               # [T]
    newidx = ex.cumsum(0)                                                     # padded -> node + 1
    seq_start = torch.cat([bc["seq_start0"], newidx.view(B, P)[:, -1]])
    newidx -= 1
    root = seq_start[:-1]
    tokens = tok_pad.view(-1).index_select(0, idx)
    parent = newidx.index_select(0, par_pad.view(-1).index_select(0, idx))
    parent.index_fill_(0, root, -1)

    top_col = sc_["win_col"]
    top = newidx.index_select(0, (bc["top_base"] + (filled[:, None] - 1).clamp(min=0) * W).view(-1))
    top_level_index = torch.where((top_col < width[:, None]), top.view(B, W), -1)
    # node of each candidate token, back in the input candidate order
    node_of = torch.where(sv, newidx.index_select(0, node_g.reshape(-1)).view(B, G, D),
                          -1)
    if perm is None:
        cand_node_index = node_of
    else:
        cand_node_index = torch.empty_like(node_of).scatter_(1, perm[:, :, None].expand(B, G, D),
                                                             node_of)
    return StepTree(
        tokens=tokens, depth=bc["depth"].index_select(0, idx), parent=parent,
        node_seq=bc["seq"].index_select(0, idx), is_trie=bc["trie"].index_select(0, idx),
        seq_start=seq_start, num_nodes=seq_start.diff(), root_index=root,
        window_levels=filled, window_width=width,
        top_level_index=top_level_index, cand_node_index=cand_node_index, cand_len=D,
        max_depth=max(W - 1 + L - 1, D, 0))
