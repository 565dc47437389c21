"""Reading vLLM's CPU paged KV cache without hard-coding its layout.

vLLM 0.32's CPU backend (``vllm/v1/attention/backends/cpu_attn.py``) stores
each layer's cache as ``kv_cache[num_blocks, num_kv_heads, block_size,
2 * head_size]``; ``forward`` / ``do_kv_cache_update`` view it as
``[nb, kvh, 2 * bs, hd]`` and ``chunk(2, dim=2)`` it into a K half and a V half. The element order inside one (block, head) region is
whatever ``ops.cpu_attn_reshape_and_cache`` writes for the ISA picked by
``_get_attn_isa``: ``vec``/``vec16`` store K transposed
``[hd, bs]`` and V ``[bs, hd]``; ``amx`` uses packed tiles; other ISAs may
differ again. Rather than hard-code any of that, :func:`probe_layout` asks the
real writer where each (token offset, dim) element lands and returns the
permutation; :func:`token_gather_index` turns it into flat element indices
for one step's tokens (shared by every layer) and :func:`gather_kv` reads them.
"""

from __future__ import annotations

import functools
import math

import torch

__all__ = ["probe_layout", "token_gather_index", "gather_kv"]

# Digits written per pass. Values 1..16 are exact in fp32, fp16 and bf16
# (0 is the "not written by this pass" sentinel).
_BASE = 16


def _write(kv_cache: torch.Tensor, key, value, slots, isa, kv_cache_dtype):
    from vllm import _custom_ops as ops

    nb, kvh, bs, two_hd = kv_cache.shape
    key_cache, value_cache = kv_cache.view(nb, kvh, 2 * bs, two_hd // 2).chunk(
        2, dim=2
    )
    ops.cpu_attn_reshape_and_cache(
        key,
        value,
        key_cache,
        value_cache,
        slots,
        isa,
        k_scale=1.0,
        v_scale=1.0,
        kv_cache_dtype=kv_cache_dtype,
    )


def _probe_one(
    which: int, isa: str, dtype: torch.dtype, bs: int, hd: int, kv_cache_dtype: str
) -> torch.Tensor:
    """Return pos[o, d] for K (which=0) or V (which=1)."""
    n = bs * hd
    region = 2 * bs * hd
    ndig = max(1, math.ceil(math.log(n, _BASE)))
    ids = torch.arange(n, dtype=torch.long)
    # Use 2 blocks x 2 heads and read block 1 / head 1, so that the probe also
    # goes through the block and head strides the kernel uses.
    nb, kvh = 2, 2
    slots = torch.arange(bs, dtype=torch.long) + bs  # every offset of block 1
    decoded = torch.zeros(region, dtype=torch.long)
    written = None
    for dig in range(ndig):
        digit = (ids // (_BASE**dig)) % _BASE + 1  # 1..16
        vals = digit.to(dtype).view(bs, 1, hd).expand(bs, kvh, hd).contiguous()
        zeros = torch.zeros_like(vals)
        kv_cache = torch.zeros(nb, kvh, bs, 2 * hd, dtype=dtype)
        if which == 0:
            _write(kv_cache, vals, zeros, slots, isa, kv_cache_dtype)
        else:
            _write(kv_cache, zeros, vals, slots, isa, kv_cache_dtype)
        got = kv_cache[1, 1].reshape(-1).float()
        if not torch.equal(kv_cache[1, 0].reshape(-1).float(), got) or bool(
            kv_cache[0].ne(0).any()
        ):
            raise RuntimeError(
                f"CPU KV layout probe (isa={isa!r}, dtype={dtype}, "
                f"block_size={bs}, head_size={hd}): heads or blocks are not "
                "independent regions; cannot derive a per-head permutation"
            )
        w = got != 0
        if written is None:
            written = w
        elif not torch.equal(written, w):
            raise RuntimeError(
                f"CPU KV layout probe (isa={isa!r}): written positions differ "
                "between passes"
            )
        decoded += (got.round().long() - 1).clamp_min(0) * (_BASE**dig)
    assert written is not None
    pos = written.nonzero().flatten()
    if pos.numel() != n:
        raise RuntimeError(
            f"CPU KV layout probe (isa={isa!r}, dtype={dtype}, block_size={bs}, "
            f"head_size={hd}): {pos.numel()} positions written for {n} "
            f"{'K' if which == 0 else 'V'} elements; layout is not a permutation"
        )
    elem = decoded[pos]
    if elem.min() < 0 or elem.max() >= n or torch.bincount(elem, minlength=n).ne(1).any():
        raise RuntimeError(
            f"CPU KV layout probe (isa={isa!r}, dtype={dtype}): decoded element "
            "ids are not a permutation"
        )
    out = torch.empty(n, dtype=torch.long)
    out[elem] = pos
    return out.view(bs, hd)


@functools.lru_cache(maxsize=64)
def probe_layout(
    isa: str,
    dtype: torch.dtype,
    block_size: int,
    head_size: int,
    kv_cache_dtype: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Find where vLLM's CPU cache writer puts each K/V element.

    Returns ``(k_perm, v_perm)``, LongTensors ``[block_size, head_size]``:
    for a token at in-block offset ``o`` and dim ``d``, ``k_perm[o, d]``
    (``v_perm[o, d]``) is the flat index of its K (V) element inside one
    (block, kv-head) region of ``2 * block_size * head_size`` elements, i.e.
    ``kv_cache[blk, h].reshape(-1)[k_perm[o, d]]``. Results are cached; treat
    the returned tensors as read-only.
    """
    if kv_cache_dtype != "auto":
        raise NotImplementedError(
            f"lade tree attention: kv_cache_dtype={kv_cache_dtype!r} is not "
            "supported (only 'auto', i.e. the model dtype)"
        )
    k_perm = _probe_one(0, isa, dtype, block_size, head_size, kv_cache_dtype)
    v_perm = _probe_one(1, isa, dtype, block_size, head_size, kv_cache_dtype)
    if torch.isin(k_perm, v_perm).any():
        raise RuntimeError(
            f"CPU KV layout probe (isa={isa!r}): K and V positions overlap"
        )
    return k_perm, v_perm


def token_gather_index(
    kv_cache: torch.Tensor,
    block_table_rows: torch.Tensor,
    k_perm: torch.Tensor,
    v_perm: torch.Tensor,
    length: int,
    start: int = 0,
) -> torch.Tensor:
    """Flat element indices of tokens ``[start, length)``' K and V in a CPU paged cache.

    Args:
        kv_cache: one layer's cache, ``[num_blocks, kvh, bs, 2 * hd]``, contiguous. Every layer
            of one KV-cache group has the same shape, so one index serves all of them.
        block_table_rows: ``[R, nblk]`` block ids covering ``[0, length)`` (entries past a
            request's length may be any valid id; they are clamped).
        k_perm, v_perm: from :func:`probe_layout` for this cache.
        length: the end of the token range to index (per request).
        start: its first token.

    Returns:
        ``[2, R, kvh, length - start, hd]`` indices into ``kv_cache.view(-1)`` (int32 when they
        fit): ``kv_cache.view(-1)[idx[0, r, h, t, d]]`` is K of token ``start + t`` of request
        ``r``.
    """
    nb, kvh, bs, two_hd = kv_cache.shape
    hd = two_hd // 2
    if k_perm.shape != (bs, hd) or v_perm.shape != (bs, hd):
        raise ValueError(
            f"perm shape {tuple(k_perm.shape)} does not match cache block ({bs}, {hd})"
        )
    if not kv_cache.is_contiguous():
        raise ValueError("token_gather_index needs a contiguous KV cache")
    R = block_table_rows.shape[0]
    tok = torch.arange(start, length)
    blk = block_table_rows.to(torch.long).clamp(0, nb - 1)[:, tok // bs]      # [R, L]
    region = 2 * bs * hd
    base = (blk[:, None, :] * (kvh * region)
            + (torch.arange(kvh) * region)[None, :, None])                    # [R, kvh, L]
    within = torch.stack([k_perm[tok % bs], v_perm[tok % bs]])                 # [2, L, hd]
    idx = base[None, :, :, :, None] + within[:, None, None, :, :]             # [2,R,kvh,L,hd]
    return idx.to(torch.int32) if kv_cache.numel() < 2**31 else idx


def gather_kv(
    kv_cache: torch.Tensor,
    block_table_rows: torch.Tensor,
    k_perm: torch.Tensor,
    v_perm: torch.Tensor,
    index: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather the tokens of a CPU paged KV cache into dense K and V.

    Args:
        kv_cache, block_table_rows, k_perm, v_perm: as for :func:`token_gather_index`.
        index: a :func:`token_gather_index` result for this cache; built here when None
            (covering ``nblk * bs`` tokens).

    Returns:
        ``(K, V)``, each ``[R, kvh, L, hd]`` in the cache dtype (a view of one gathered
        tensor); ``K[r, h, t]`` is logical token ``t`` of request ``r``.
    """
    if index is None:
        bs = kv_cache.shape[2]
        index = token_gather_index(kv_cache, block_table_rows, k_perm, v_perm,
                                   block_table_rows.shape[1] * bs)
    kv = kv_cache.view(-1).index_select(0, index.view(-1)).view(index.shape)
    return kv[0], kv[1]


def _affine(perm: torch.Tensor) -> tuple[int, int, int] | None:
    bs, hd = perm.shape
    off = int(perm[0, 0])
    so = int(perm[1, 0]) - off if bs > 1 else 0
    sd = int(perm[0, 1]) - off if hd > 1 else 0
    expect = off + torch.arange(bs)[:, None] * so + torch.arange(hd)[None, :] * sd
    return (off, so, sd) if torch.equal(perm, expect) else None


def strided_layout(k_perm: torch.Tensor, v_perm: torch.Tensor) -> tuple | None:
    """``((k_offset, k_token_stride, k_dim_stride), (v_...))`` inside one (block, kv-head)
    region when both :func:`probe_layout` permutations are affine in (token, dim), as for vLLM
    0.32's ``vec`` ISA (K stored [hd, bs], V [bs, hd]); None otherwise."""
    k, v = _affine(k_perm), _affine(v_perm)
    return None if k is None or v is None else (k, v)


@functools.lru_cache(maxsize=64)
def probe_strided(isa: str, dtype: torch.dtype, block_size: int, head_size: int,
                  kv_cache_dtype: str = "auto") -> tuple | None:
    """:func:`strided_layout` of :func:`probe_layout`'s result, once per cache kind."""
    return strided_layout(*probe_layout(isa, dtype, block_size, head_size, kv_cache_dtype))


def gather_blocks(
    kv_cache: torch.Tensor,
    block_table_rows: torch.Tensor,
    layout: tuple,
    length: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`gather_kv` for a :func:`strided_layout` cache: the requests' whole blocks are
    copied (one index per block, not per element), then K and V are read from them as strided
    views. Returns ``(K, V)``, each ``[R, kvh, length, hd]``."""
    nb, kvh, bs, two_hd = kv_cache.shape
    hd, region = two_hd // 2, bs * two_hd
    R, nblk = block_table_rows.shape
    ids = block_table_rows.to(torch.long).clamp(0, nb - 1).reshape(-1)
    blocks = kv_cache.view(nb, kvh, region).index_select(0, ids)   # [R * nblk, kvh, region]

    def part(off: int, so: int, sd: int) -> torch.Tensor:
        view = blocks.as_strided((R, nblk, kvh, bs, hd),
                                 (nblk * kvh * region, kvh * region, region, so, sd), off)
        return view.permute(0, 2, 1, 3, 4).reshape(R, kvh, nblk * bs, hd)[:, :, :length]

    (k, v) = layout
    return part(*k), part(*v)
