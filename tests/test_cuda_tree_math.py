"""Math and plumbing of the CUDA tree-attention path, run on CPU (fast, no model).

- attention_with_lse vs a naive float64 reference (GQA, fully-masked rows);
- the split-and-merge identity the CUDA path relies on:
  attn(prefix ++ tree, ancestor mask) == merge(attn(prefix), attn(tree, mask)),
  including an empty prefix (LSE -inf, or +inf as FlashAttention writes it);
- merge_attention_states vs vLLM's own merge_attn_states (CPU torch fallback);
- the backend module imports on a CPU build, and its tree overwrite (plan,
  gathers, FA call arguments, vLLM's merge) is exact with a pure-torch
  stand-in for flash_attn_varlen_func.

The math tests are parametrized over "cpu" and "cuda" (skipped without a GPU)
and need only torch; the vLLM-dependent tests skip when vLLM is absent.
"""
from __future__ import annotations

import math
import types

import pytest
import torch

from lade_vllm.attention import TreeLayout
from lade_vllm.attention.merge import attention_with_lse, merge_attention_states
from lade_vllm.attention.self_check import ancestor_mask as _ancestor_mask
from lade_vllm.attention.self_check import lookahead_step_parents
from lade_vllm.attention.self_check import paged_batch as _batch
from lade_vllm.attention.self_check import stub_flash_impl as _make_impl
from lade_vllm.attention.self_check import (
    reference_flash_attn_varlen_func as _fake_flash_attn_varlen_func,
)
from lade_vllm.attention.tree_math import tree_attention_dense

pytestmark = pytest.mark.timeout(120)

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(
            not torch.cuda.is_available(), reason="no CUDA device"
        ),
    ),
]
NEG_INF = float("-inf")


# ----------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------
def _naive(q, k, v, allowed, scale):
    """Per-head, per-row float64 reference: (out [N,H,dv], lse [H,N])."""
    N, H, d = q.shape
    L, KVH, _ = k.shape
    g = H // KVH
    out = torch.zeros(N, H, v.shape[-1], dtype=torch.float64)
    lse = torch.full((H, N), NEG_INF, dtype=torch.float64)
    qd, kd, vd = q.double().cpu(), k.double().cpu(), v.double().cpu()
    al = allowed.cpu()
    for h in range(H):
        kvh = h // g
        for i in range(N):
            js = al[i].nonzero().flatten()
            if js.numel() == 0:
                continue
            s = (kd[js, kvh] @ qd[i, h]) * scale
            lse[h, i] = torch.logsumexp(s, 0)
            out[i, h] = torch.softmax(s, 0) @ vd[js, kvh]
    return out, lse


def _random_parents(T, gen):
    return [-1] + [int(torch.randint(0, i, (1,), generator=gen)) for i in range(1, T)]


def _step_tree_masks():
    """Ancestor masks of real lookahead step trees (W=5, N=4, 2 candidates)."""
    return [_ancestor_mask(p) for p in lookahead_step_parents()]



def _check(out, lse, ref_out, ref_lse, atol=1e-5):
    torch.testing.assert_close(out.double().cpu(), ref_out, atol=atol, rtol=1e-5)
    lse = lse.double().cpu()
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    fin = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse[fin], ref_lse[fin], atol=atol, rtol=1e-5)


# ----------------------------------------------------------------------------
# (a) attention_with_lse
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("H,KVH", [(4, 4), (8, 2), (6, 1)])
def test_attention_with_lse_matches_naive(device, H, KVH):
    gen = torch.Generator().manual_seed(H * 10 + KVH)
    N, L, d, dv = 9, 13, 16, 8
    q = torch.randn(N, H, d, generator=gen)
    k = torch.randn(L, KVH, d, generator=gen)
    v = torch.randn(L, KVH, dv, generator=gen)
    allowed = torch.rand(N, L, generator=gen) < 0.5
    allowed[2] = False  # fully masked rows
    allowed[5] = False
    allowed[0] = True
    scale = 1.0 / math.sqrt(d)
    out, lse = attention_with_lse(q.to(device), k.to(device), v.to(device),
                                  allowed.to(device), scale)
    assert out.shape == (N, H, dv) and lse.shape == (H, N)
    assert out.device.type == device and lse.dtype == torch.float32
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    ref_out, ref_lse = _naive(q, k, v, allowed, scale)
    _check(out, lse, ref_out, ref_lse)
    assert (out[2] == 0).all() and torch.isneginf(lse[:, 5]).all()


@pytest.mark.parametrize("device", DEVICES)
def test_attention_with_lse_batched_and_empty(device):
    gen = torch.Generator().manual_seed(1)
    R, N, L, H, KVH, d = 3, 5, 6, 4, 2, 8
    q = torch.randn(R, N, H, d, generator=gen)
    k = torch.randn(R, L, KVH, d, generator=gen)
    v = torch.randn(R, L, KVH, d, generator=gen)
    allowed = torch.rand(R, N, L, generator=gen) < 0.6
    allowed[1] = False  # a whole request with no keys
    out, lse = attention_with_lse(q.to(device), k.to(device), v.to(device),
                                  allowed.to(device), 0.3)
    assert out.shape == (R, N, H, d) and lse.shape == (R, H, N)
    for r in range(R):
        ref_out, ref_lse = _naive(q[r], k[r], v[r], allowed[r], 0.3)
        _check(out[r], lse[r], ref_out, ref_lse)
    # L = 0: every row empty
    out0, lse0 = attention_with_lse(q[0].to(device), k[0, :0].to(device),
                                    v[0, :0].to(device),
                                    torch.zeros(N, 0, dtype=torch.bool, device=device), 0.3)
    assert (out0 == 0).all() and torch.isneginf(lse0).all()
    # half precision in, half out; LSE stays float32
    outh, lseh = attention_with_lse(q[0].to(device, torch.bfloat16),
                                    k[0].to(device, torch.bfloat16),
                                    v[0].to(device, torch.bfloat16),
                                    allowed[0].to(device), 0.3)
    assert outh.dtype == torch.bfloat16 and lseh.dtype == torch.float32


# ----------------------------------------------------------------------------
# (b) split-and-merge identity
# ----------------------------------------------------------------------------
def _identity_case(device, T, p, mask, H=8, KVH=2, d=16, seed=0, fa_empty_lse=False):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(T, H, d, generator=gen)
    k = torch.randn(p + T, KVH, d, generator=gen)
    v = torch.randn(p + T, KVH, d, generator=gen)
    scale = 1.0 / math.sqrt(d)
    full_allowed = torch.cat([torch.ones(T, p, dtype=torch.bool), mask], dim=1)
    to = lambda x: x.to(device)  # noqa: E731

    ref_out, ref_lse = attention_with_lse(to(q), to(k), to(v), to(full_allowed), scale)
    pre_out, pre_lse = attention_with_lse(
        to(q), to(k[:p]), to(v[:p]), torch.ones(T, p, dtype=torch.bool, device=device), scale)
    if fa_empty_lse and p == 0:
        pre_lse = torch.full_like(pre_lse, float("inf"))  # FlashAttention's empty-row LSE
    tree_out, tree_lse = attention_with_lse(to(q), to(k[p:]), to(v[p:]), to(mask), scale)
    merged, merged_lse = merge_attention_states(pre_out, pre_lse, tree_out, tree_lse,
                                                return_lse=True)
    torch.testing.assert_close(merged, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(merged_lse, ref_lse, atol=1e-5, rtol=1e-5)
    # and against the CPU backend's dense tree math
    dense = tree_attention_dense(to(q)[None], to(k)[None], to(v)[None],
                                 to(full_allowed)[None], scale)[0]
    torch.testing.assert_close(merged, dense, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("p", [0, 1, 7, 40])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_split_merge_identity_random_trees(device, p, seed):
    gen = torch.Generator().manual_seed(100 + seed)
    T = int(torch.randint(1, 24, (1,), generator=gen))
    mask = _ancestor_mask(_random_parents(T, gen))
    _identity_case(device, T, p, mask, seed=seed)
    _identity_case(device, T, p, mask, seed=seed, fa_empty_lse=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("p", [0, 11])
def test_split_merge_identity_step_trees(device, p):
    for b, mask in enumerate(_step_tree_masks()):
        _identity_case(device, mask.shape[0], p, mask, H=4, KVH=4, seed=b)


@pytest.mark.parametrize("device", DEVICES)
def test_merge_attention_states_edge_rows(device):
    N, H, d = 4, 2, 4
    a = torch.randn(N, H, d, device=device)
    b = torch.randn(N, H, d, device=device)
    la = torch.tensor([[0.5, NEG_INF, float("inf"), NEG_INF]] * H, device=device)
    lb = torch.tensor([[NEG_INF, 1.0, 2.0, NEG_INF]] * H, device=device)
    a[1] = float("nan")  # an empty side's output must not leak, even as NaN
    out, lse = merge_attention_states(a, la, b, lb, return_lse=True)
    torch.testing.assert_close(out[0], a[0])
    torch.testing.assert_close(out[1], b[1])
    torch.testing.assert_close(out[2], b[2])
    assert (out[3] == 0).all() and torch.isneginf(lse[:, 3]).all()
    torch.testing.assert_close(lse[:, :3].cpu(), torch.tensor([[0.5, 1.0, 2.0]] * H))
    # huge LSEs: no overflow
    big = torch.full((H, N), 1e4, device=device)
    out2 = merge_attention_states(a.nan_to_num(), big, b, big + 1)
    w = 1 / (1 + math.e)
    torch.testing.assert_close(out2, a.nan_to_num() * w + b * (1 - w))


# ----------------------------------------------------------------------------
# (c) agreement with vLLM's merge_attn_states
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_matches_vllm(dtype):
    mas = pytest.importorskip("vllm.v1.attention.ops.merge_attn_states")
    gen = torch.Generator().manual_seed(3)
    N, H, d = 12, 4, 16
    pa = torch.randn(N, H, d, generator=gen).to(dtype)
    pb = torch.randn(N, H, d, generator=gen).to(dtype)
    la = torch.randn(H, N, generator=gen) * 5
    lb = torch.randn(H, N, generator=gen) * 5
    la[:, 1] = NEG_INF
    lb[:, 2] = NEG_INF
    la[:, 3] = float("inf")  # FA's "no keys"
    la[:, 4] = NEG_INF
    lb[:, 4] = NEG_INF
    mine, mine_lse = merge_attention_states(pa, la, pb, lb, return_lse=True)
    atol = 1e-6 if dtype == torch.float32 else 1e-2
    for fn in (mas._merge_attn_states_torch, mas.merge_attn_states):
        out = torch.empty(N, H, d, dtype=dtype)
        out_lse = torch.empty(H, N)
        fn(out, pa, la, pb, lb, out_lse)
        torch.testing.assert_close(mine, out, atol=atol, rtol=1e-3)
        torch.testing.assert_close(mine_lse, out_lse, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------
# (d) the backend module imports on CPU
# ----------------------------------------------------------------------------
def test_cuda_tree_imports_on_cpu():
    pytest.importorskip("vllm")
    import lade_vllm.attention.cuda_tree as ct
    from vllm.v1.attention.backends.flash_attn import (
        FlashAttentionBackend,
        FlashAttentionImpl,
        FlashAttentionMetadataBuilder,
    )

    assert issubclass(ct.LadeFlashAttentionBackend, FlashAttentionBackend)
    assert ct.LadeFlashAttentionBackend.get_impl_cls() is ct.LadeFlashAttentionImpl
    assert issubclass(ct.LadeFlashAttentionImpl, FlashAttentionImpl)
    assert ct.LadeFlashAttentionBackend.get_builder_cls() is ct.LadeFlashAttentionMetadataBuilder
    assert issubclass(ct.LadeFlashAttentionMetadataBuilder, FlashAttentionMetadataBuilder)
    assert ct.LadeFlashAttentionBackend.get_name() == "FLASH_ATTN"


def test_register_cuda_tree_backend():
    pytest.importorskip("vllm")
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    import lade_vllm.attention.cuda_tree as ct

    had = AttentionBackendEnum.FLASH_ATTN.is_overridden()
    try:
        from lade_vllm.adapter.patches import ensure
        from lade_vllm.adapter.runtime import CUDA_TREE_BACKEND
        ensure(CUDA_TREE_BACKEND)
        assert AttentionBackendEnum.FLASH_ATTN.get_path() == ct.BACKEND_PATH
        assert AttentionBackendEnum.FLASH_ATTN.get_class() is ct.LadeFlashAttentionBackend
    finally:
        if not had:
            AttentionBackendEnum.FLASH_ATTN.clear_override()


# ----------------------------------------------------------------------------
# plumbing: the impl's tree overwrite with a pure-torch flash_attn_varlen_func
# (the stand-in, the stub impl and the paged batch are the engine-start
# self-check's, lade_vllm.attention.self_check)
# ----------------------------------------------------------------------------
def _reference_rows(b, reqs, r, scale):
    ql, sl, mask = reqs[r]
    p = sl - ql
    a = int(b.query_start_loc[r])
    allowed = torch.cat([torch.ones(ql, p, dtype=torch.bool), mask], dim=1)
    return tree_attention_dense(b.query[a:a + ql][None], b.kfull[r][None],
                                b.vfull[r][None], allowed[None], scale)[0]


@pytest.mark.parametrize("use_key", [True, False])
def test_tree_overwrite_with_fake_fa(monkeypatch, use_key):
    pytest.importorskip("vllm")
    import lade_vllm.attention.cuda_tree as ct

    monkeypatch.setattr(ct, "_flash_attn_varlen_func", lambda: _fake_flash_attn_varlen_func)
    gen = torch.Generator().manual_seed(7)
    masks = _step_tree_masks()
    reqs = [
        (3, 10, None),                                   # ordinary request
        (masks[0].shape[0], masks[0].shape[0] + 9, masks[0]),   # tree, p = 9
        (5, 5, _ancestor_mask(_random_parents(5, gen))),        # tree, p = 0
        (1, 6, None),                                    # ordinary decode
        (masks[1].shape[0], masks[1].shape[0] + 17, masks[1]),  # tree, p = 17
    ]
    b = _batch(reqs)
    tree_idx = [i for i, (_, _, m) in enumerate(reqs) if m is not None]
    layout = TreeLayout(req_indices=tree_idx, tree_masks=[reqs[i][2] for i in tree_idx])
    plan = ct.build_cuda_tree_plan(layout, b.query_start_loc, b.seq_lens, b.block_table,
                                   len(reqs))
    assert plan.prefix_lens.tolist() == [9, 0, 17]
    assert plan.max_prefix_len == 17 and plan.num_tokens == sum(reqs[i][0] for i in tree_idx)
    impl = _make_impl(b.H, b.KVH, b.d)
    md = types.SimpleNamespace(slot_mapping=b.slot_mapping, tree=plan)
    n_tok = b.query.shape[0]
    output = torch.full((n_tok, b.H * b.d), 123.0)
    impl._tree_overwrite(b.query, b.key if use_key else None, b.value if use_key else None,
                         b.kv_cache, md, plan, output)
    out = output.view(n_tok, b.H, b.d)
    for r, (ql, _, mask) in enumerate(reqs):
        a = int(b.query_start_loc[r])
        if mask is None:
            assert (out[a:a + ql] == 123.0).all()
        else:
            torch.testing.assert_close(out[a:a + ql], _reference_rows(b, reqs, r, impl.scale),
                                       atol=1e-5, rtol=1e-5)


def test_forward_covers_all_skips_vllm_kernel(monkeypatch):
    pytest.importorskip("vllm")
    import lade_vllm.attention.cuda_tree as ct

    monkeypatch.setattr(ct, "_flash_attn_varlen_func", lambda: _fake_flash_attn_varlen_func)

    def _boom(*a, **k):
        raise AssertionError("vLLM's FA forward must not run when trees cover the batch")

    monkeypatch.setattr(ct.FlashAttentionImpl, "forward", _boom)
    gen = torch.Generator().manual_seed(8)
    reqs = [(6, 20, _ancestor_mask(_random_parents(6, gen))),
            (3, 3, _ancestor_mask([-1, 0, 0]))]
    b = _batch(reqs, H=6, KVH=3, d=8, bs=16)
    layout = TreeLayout(req_indices=[0, 1], tree_masks=[m for _, _, m in reqs])
    plan = ct.build_cuda_tree_plan(layout, b.query_start_loc, b.seq_lens, b.block_table, 2)
    plan.covers_all = True
    impl = _make_impl(b.H, b.KVH, b.d)
    md = types.SimpleNamespace(slot_mapping=b.slot_mapping, tree=plan)
    output = torch.full((b.query.shape[0], b.H * b.d), float("nan"))
    impl.forward(None, b.query, b.key, b.value, b.kv_cache, md, output)
    out = output.view(-1, b.H, b.d)
    for r in range(2):
        a = int(b.query_start_loc[r])
        torch.testing.assert_close(out[a:a + reqs[r][0]],
                                   _reference_rows(b, reqs, r, impl.scale),
                                   atol=1e-5, rtol=1e-5)
    # unsupported features are refused, not silently wrong
    impl.logits_soft_cap = 30.0
    with pytest.raises(NotImplementedError, match="softcap"):
        impl.forward(None, b.query, b.key, b.value, b.kv_cache, md, output)


def test_plan_validation_and_block_table_update():
    pytest.importorskip("vllm")
    import lade_vllm.attention.cuda_tree as ct

    qsl = torch.tensor([0, 3, 8], dtype=torch.int32)
    seq_lens = torch.tensor([10, 12], dtype=torch.int32)
    bt = torch.arange(8, dtype=torch.int32).view(2, 4)
    m5 = _ancestor_mask([-1, 0, 1, 1, 0])
    with pytest.raises(ValueError, match="scheduled query tokens"):
        ct.build_cuda_tree_plan(TreeLayout([0], [m5]), qsl, seq_lens, bt, 2)
    with pytest.raises(ValueError, match="out of range"):
        ct.build_cuda_tree_plan(TreeLayout([2], [m5]), qsl, seq_lens, bt, 2)
    assert ct.build_cuda_tree_plan(TreeLayout([], []), qsl, seq_lens, bt, 2) is None
    plan = ct.build_cuda_tree_plan(TreeLayout([1], [m5]), qsl, seq_lens, bt, 2)
    assert plan.rows.tolist() == [3, 4, 5, 6, 7]
    assert plan.cu_seqlens_q.tolist() == [0, 5] and plan.prefix_lens.tolist() == [7]
    assert torch.equal(plan.block_table, bt[1:2])

    from vllm.v1.attention.backends.flash_attn import FlashAttentionMetadata

    md = ct.LadeFlashAttentionMetadata(
        num_actual_tokens=8, max_query_len=5, query_start_loc=qsl, max_seq_len=12,
        seq_lens=seq_lens, block_table=bt, slot_mapping=torch.arange(8), tree=plan)
    assert isinstance(md, FlashAttentionMetadata)
    builder = object.__new__(ct.LadeFlashAttentionMetadataBuilder)
    new_bt = bt + 100
    new = builder.update_block_table(md, new_bt, torch.arange(8) + 1)
    assert torch.equal(new.block_table, new_bt)
    assert torch.equal(new.tree.block_table, new_bt[1:2])
    assert torch.equal(md.tree.block_table, bt[1:2])  # the original is untouched


def test_tree_overwrite_without_any_prefix_skips_fa(monkeypatch):
    pytest.importorskip("vllm")
    import lade_vllm.attention.cuda_tree as ct

    def _no_fa():
        raise AssertionError("no tree request has a prefix: FA must not be called")

    monkeypatch.setattr(ct, "_flash_attn_varlen_func", _no_fa)
    reqs = [(4, 4, _ancestor_mask([-1, 0, 1, 0])), (2, 7, None)]
    b = _batch(reqs, seed=3)
    plan = ct.build_cuda_tree_plan(TreeLayout([0], [reqs[0][2]]), b.query_start_loc,
                                   b.seq_lens, b.block_table, 2)
    assert plan.max_prefix_len == 0
    impl = _make_impl(b.H, b.KVH, b.d)
    output = torch.full((b.query.shape[0], b.H * b.d), 123.0)
    impl._tree_overwrite(b.query, b.key, b.value, b.kv_cache,
                         types.SimpleNamespace(slot_mapping=b.slot_mapping), plan, output)
    out = output.view(-1, b.H, b.d)
    torch.testing.assert_close(out[:4], _reference_rows(b, reqs, 0, impl.scale),
                               atol=1e-5, rtol=1e-5)
    assert (out[4:] == 123.0).all()
