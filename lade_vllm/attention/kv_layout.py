"""Reading vLLM's CPU paged KV cache without hard-coding its layout.

vLLM 0.32's CPU backend (``vllm/v1/attention/backends/cpu_attn.py``) stores
each layer's cache as ``kv_cache[num_blocks, num_kv_heads, block_size,
2 * head_size]``; ``forward``/``do_kv_cache_update`` (cpu_attn.py:414-416,
474-476) view it as ``[nb, kvh, 2 * bs, hd]`` and ``chunk(2, dim=2)`` it into a
K half and a V half. The element order inside one (block, head) region is
whatever ``ops.cpu_attn_reshape_and_cache`` writes for the ISA picked by
``_get_attn_isa`` (cpu_attn.py:520-558): ``vec``/``vec16`` store K transposed
``[hd, bs]`` and V ``[bs, hd]``; ``amx`` uses packed tiles; other ISAs may
differ again. Rather than hard-code any of that, :func:`probe_layout` asks the
real writer where each (token offset, dim) element lands and returns the
permutation; :func:`gather_kv` then reads whole blocks and applies it.
"""

from __future__ import annotations

import functools
import math

import torch

__all__ = ["probe_layout", "gather_kv", "combined_perm"]

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


@functools.lru_cache(maxsize=64)
def _vec_perms(bs: int, hd: int) -> tuple[torch.Tensor, torch.Tensor]:
    o = torch.arange(bs)[:, None]
    d = torch.arange(hd)[None, :]
    return d * bs + o, bs * hd + o * hd + d


def _is_vec_layout(k_perm: torch.Tensor, v_perm: torch.Tensor) -> bool:
    """True for the ``vec``/``vec16`` layout (K transposed per block, V row-major after it)."""
    key = (k_perm.data_ptr(), v_perm.data_ptr())
    hit = _VEC_CACHE.get(key)
    if hit is None:
        vk, vv = _vec_perms(*k_perm.shape)
        hit = bool(torch.equal(k_perm, vk) and torch.equal(v_perm, vv))
        _VEC_CACHE[key] = hit
    return hit


_VEC_CACHE: dict[tuple[int, int], bool] = {}


def combined_perm(k_perm: torch.Tensor, v_perm: torch.Tensor) -> torch.Tensor:
    """``cat(k_perm.flatten(), v_perm.flatten())`` (one index for both)."""
    return torch.cat([k_perm.reshape(-1), v_perm.reshape(-1)])


def gather_kv(
    kv_cache: torch.Tensor,
    block_table_rows: torch.Tensor,
    k_perm: torch.Tensor,
    v_perm: torch.Tensor,
    perm: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather whole blocks of a CPU paged KV cache into dense K and V.

    Args:
        kv_cache: one layer's cache, ``[num_blocks, kvh, bs, 2 * hd]``.
        block_table_rows: ``[R, nblk]`` block ids (entries past a request's
            length may be any valid id, e.g. 0 padding; they are clamped).
        k_perm, v_perm: from :func:`probe_layout` for this cache.
        perm: optional precomputed :func:`combined_perm` (saves a cat).

    Returns:
        ``(K, V)``, each ``[R, nblk * bs, kvh, hd]`` in the cache dtype;
        row ``t`` is logical token ``t`` of the request.
    """
    nb, kvh, bs, two_hd = kv_cache.shape
    hd = two_hd // 2
    if k_perm.shape != (bs, hd) or v_perm.shape != (bs, hd):
        raise ValueError(
            f"perm shape {tuple(k_perm.shape)} does not match cache block "
            f"({bs}, {hd})"
        )
    R, nblk = block_table_rows.shape
    ids = block_table_rows.reshape(-1).to(torch.long).clamp(0, nb - 1)
    if _is_vec_layout(k_perm, v_perm):
        # K stored [hd, bs] (transposed), V [bs, hd]: strided views and one copy each, ~10x
        # faster than a 2*bs*hd-wide index_select (profiled: it was 27% of a lade step).
        blocks = kv_cache.index_select(0, ids).view(R, nblk, kvh, 2 * bs * hd)
        k = blocks[..., : bs * hd].view(R, nblk, kvh, hd, bs).permute(0, 1, 4, 2, 3)
        v = blocks[..., bs * hd:].view(R, nblk, kvh, bs, hd).permute(0, 1, 3, 2, 4)
        return (k.reshape(R, nblk * bs, kvh, hd), v.reshape(R, nblk * bs, kvh, hd))
    if perm is None:
        perm = combined_perm(k_perm, v_perm)
    blocks = kv_cache.index_select(0, ids).view(R * nblk, kvh, 2 * bs * hd)
    kv = blocks.index_select(2, perm)  # [R*nblk, kvh, 2*bs*hd] in (K|V, o, d)
    kv = kv.view(R, nblk, kvh, 2, bs, hd).permute(3, 0, 1, 4, 2, 5)
    # [2, R, nblk, bs, kvh, hd] -> [2, R, nblk*bs, kvh, hd]
    kv = kv.reshape(2, R, nblk * bs, kvh, hd)
    return kv[0], kv[1]
