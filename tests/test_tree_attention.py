"""Tree-masked attention on the CPU backend: layout probe, dense math, kernel parity.

Fast (no model, no engine). The kernel-level tests run vLLM's real metadata
builder ``build()`` and ``cpu_attention_with_kv_cache`` kernel (through
``CPUAttentionBackendImpl.forward``); only the builder's/impl's constructors are
bypassed, since they want a full model config.
"""
from __future__ import annotations

import types

import pytest
import torch

from lade_vllm.attention import TreeLayout, get_step_layout, set_step_layout
from lade_vllm.attention.self_check import ancestor_mask as _ancestor_mask
from lade_vllm.attention.tree_math import tree_attention_dense

pytestmark = pytest.mark.timeout(120)


# ----------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------
def _picked_isa(dtype, block_size, head_size):
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    return _get_attn_isa(dtype, block_size, head_size)


def _isas(dtype, block_size, head_size):
    isas = [_picked_isa(dtype, block_size, head_size), "vec"]
    isas.append("amx")  # layout-only; the writer works without AMX tiles
    out = []
    for i in isas:
        if i not in out:
            out.append(i)
    return out


def _write(kv_cache, k, v, slots, isa):
    from vllm import _custom_ops as ops

    nb, kvh, bs, two_hd = kv_cache.shape
    kc, vc = kv_cache.view(nb, kvh, 2 * bs, two_hd // 2).chunk(2, dim=2)
    ops.cpu_attn_reshape_and_cache(k, v, kc, vc, slots, isa)


def _random_tree(T, gen):
    parents = [-1] + [int(torch.randint(0, i, (1,), generator=gen)) for i in range(1, T)]
    return _ancestor_mask(parents)


def _naive_attention(q, k, v, allowed, scale):
    """q [Tq,H,hd], k/v [L,KVH,hd], allowed [Tq,L] -> [Tq,H,hd] (float64 loop)."""
    Tq, H, hd = q.shape
    KVH = k.shape[1]
    g = H // KVH
    out = torch.zeros(Tq, H, v.shape[-1], dtype=torch.float64)
    for i in range(Tq):
        idx = allowed[i].nonzero().flatten()
        if idx.numel() == 0:
            continue
        for h in range(H):
            kk = k[idx, h // g].double()
            vv = v[idx, h // g].double()
            s = (kk @ q[i, h].double()) * scale
            p = torch.softmax(s, dim=0)
            out[i, h] = p @ vv
    return out


# ----------------------------------------------------------------------------
# (a) probe + gather_kv returns exactly what vLLM's writer stored
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_size", [32, 128])
def test_gather_kv_roundtrip(dtype, block_size):
    from lade_vllm.attention.kv_layout import (gather_blocks, gather_kv, probe_layout,
                                               strided_layout)

    hd, kvh, nb = 64, 2, 9
    for isa in _isas(dtype, block_size, hd):
        try:
            k_perm, v_perm = probe_layout(isa, dtype, block_size, hd)
        except RuntimeError:
            if isa == "amx" and not torch.cpu._is_amx_tile_supported():
                continue  # extra layout coverage only; writer may be absent
            raise
        assert k_perm.shape == v_perm.shape == (block_size, hd)
        allpos = torch.cat([k_perm.flatten(), v_perm.flatten()])
        assert torch.equal(allpos.sort().values, torch.arange(2 * block_size * hd))

        gen = torch.Generator().manual_seed(block_size + (dtype == torch.float32))
        # two requests with shuffled block tables; write tokens in random order
        perm_blocks = torch.randperm(nb, generator=gen)
        lens = [block_size * 2 + 5, block_size * 3 + 1]
        nblk = max((n + block_size - 1) // block_size for n in lens)
        bt = torch.zeros(2, nblk, dtype=torch.int32)
        bt[0, :3] = perm_blocks[:3].int()
        bt[1, :4] = perm_blocks[3:7].int()
        kv_cache = torch.full((nb, kvh, block_size, 2 * hd), 7.0, dtype=dtype)
        ks, vs = [], []
        for r, n in enumerate(lens):
            pos = torch.randperm(n, generator=gen)
            slots = bt[r, pos // block_size].long() * block_size + pos % block_size
            k = torch.randn(n, kvh, hd, generator=gen).to(dtype)
            v = torch.randn(n, kvh, hd, generator=gen).to(dtype)
            _write(kv_cache, k, v, slots, isa)
            kk = torch.empty_like(k)
            vv = torch.empty_like(v)
            kk[pos] = k
            vv[pos] = v
            ks.append(kk)
            vs.append(vv)
        K, V = gather_kv(kv_cache, bt, k_perm, v_perm)
        assert K.shape == V.shape == (2, kvh, nblk * block_size, hd)
        assert K.dtype == dtype
        for r, n in enumerate(lens):
            assert torch.equal(K[r, :, :n], ks[r].transpose(0, 1)), f"K mismatch isa={isa} r={r}"
            assert torch.equal(V[r, :, :n], vs[r].transpose(0, 1)), f"V mismatch isa={isa} r={r}"
        layout = strided_layout(k_perm, v_perm)
        if isa == "vec":
            assert layout is not None   # K [hd, bs], V [bs, hd]: both affine
        if layout is not None:   # the block copy reads the same K and V
            for length in (nblk * block_size, lens[0]):
                Kb, Vb = gather_blocks(kv_cache, bt, layout, length)
                assert torch.equal(Kb, K[:, :, :length]) and torch.equal(Vb, V[:, :, :length])


def test_probe_vec_layout_is_transposed_k():
    """Documents what the probe finds for vLLM's `vec` ISA (K [hd,bs], V [bs,hd])."""
    from lade_vllm.attention.kv_layout import probe_layout

    bs, hd = 32, 64
    k_perm, v_perm = probe_layout("vec", torch.float32, bs, hd)
    o = torch.arange(bs)[:, None]
    d = torch.arange(hd)[None, :]
    assert torch.equal(k_perm, d * bs + o)
    assert torch.equal(v_perm, bs * hd + o * hd + d)


# ----------------------------------------------------------------------------
# (b) dense tree attention vs a naive loop
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("kvh,g", [(1, 1), (2, 2), (1, 3)])
def test_tree_attention_dense_matches_naive(seed, kvh, g):
    gen = torch.Generator().manual_seed(seed * 10 + kvh * 3 + g)
    R, hd = 3, 16
    H = kvh * g
    Ts = [int(torch.randint(1, 7, (1,), generator=gen)) for _ in range(R)]
    ps = [int(torch.randint(0, 9, (1,), generator=gen)) for _ in range(R)]
    Tq = max(Ts)
    L = max(p + t for p, t in zip(ps, Ts)) + 2  # extra padded key columns
    q = torch.randn(R, Tq, H, hd, generator=gen)
    k = torch.randn(R, L, kvh, hd, generator=gen)
    v = torch.randn(R, L, kvh, hd, generator=gen)
    allowed = torch.zeros(R, Tq, L, dtype=torch.bool)
    for r in range(R):
        m = _random_tree(Ts[r], gen)
        allowed[r, : Ts[r], : ps[r]] = True
        allowed[r, : Ts[r], ps[r] : ps[r] + Ts[r]] = m
    scale = hd**-0.5
    out = tree_attention_dense(q, k, v, allowed, scale)
    assert out.shape == (R, Tq, H, hd) and out.dtype == q.dtype
    assert torch.isfinite(out).all()
    for r in range(R):
        ref = _naive_attention(q[r], k[r], v[r], allowed[r], scale)
        torch.testing.assert_close(out[r].double(), ref, rtol=1e-5, atol=1e-6)
        assert (out[r, Ts[r]:] == 0).all()  # padded query rows


def test_tree_attention_dense_bf16_and_empty_rows():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 3, 4, 32, generator=gen).bfloat16()
    k = torch.randn(1, 5, 2, 32, generator=gen).bfloat16()
    v = torch.randn(1, 5, 2, 32, generator=gen).bfloat16()
    allowed = torch.tensor([[[1, 1, 0, 0, 0], [0, 0, 0, 0, 0], [1, 0, 1, 1, 0]]], dtype=torch.bool)
    out = tree_attention_dense(q, k, v, allowed, 0.2)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    assert (out[0, 1] == 0).all()
    ref = _naive_attention(q[0].float(), k[0].float(), v[0].float(), allowed[0], 0.2)
    torch.testing.assert_close(out[0].double(), ref, rtol=2e-2, atol=2e-2)


# ----------------------------------------------------------------------------
# (c) kernel level: builder.build() + impl.forward() vs vLLM's own kernel
# ----------------------------------------------------------------------------
class _Batch:
    """A batch of requests with all K/V (prefix and new tokens) in a paged cache."""

    def __init__(self, prefix_lens, q_lens, *, H, KVH, hd, bs, dtype, isa, seed):
        gen = torch.Generator().manual_seed(seed)
        self.H, self.KVH, self.hd, self.bs, self.dtype, self.isa = H, KVH, hd, bs, dtype, isa
        self.prefix_lens, self.q_lens = prefix_lens, q_lens
        seq_lens = [p + t for p, t in zip(prefix_lens, q_lens)]
        self.seq_lens = seq_lens
        nblks = [(s + bs - 1) // bs for s in seq_lens]
        max_blocks = max(nblks) + 2
        nb = sum(nblks) + 3
        order = torch.randperm(nb - 1, generator=gen) + 1  # block 0 = "null"
        self.block_table = torch.zeros(len(seq_lens), max_blocks, dtype=torch.int32)
        c = 0
        for r, n in enumerate(nblks):
            self.block_table[r, :n] = order[c : c + n].int()
            c += n
        self.kv_cache = torch.randn(nb, KVH, bs, 2 * hd, generator=gen).to(dtype)
        self.k, self.v = [], []  # full per-request K/V [seq_len, KVH, hd]
        slot_all = []
        for r, s in enumerate(seq_lens):
            k = torch.randn(s, KVH, hd, generator=gen).to(dtype)
            v = torch.randn(s, KVH, hd, generator=gen).to(dtype)
            pos = torch.arange(s)
            slots = self.block_table[r, pos // bs].long() * bs + pos % bs
            _write(self.kv_cache, k, v, slots, isa)  # == do_kv_cache_update
            self.k.append(k)
            self.v.append(v)
            slot_all.append(slots[prefix_lens[r]:])
        self.slot_mapping = torch.cat(slot_all)
        self.N = sum(q_lens)
        self.query = torch.randn(self.N, H, hd, generator=gen).to(dtype)
        qsl = [0]
        for t in q_lens:
            qsl.append(qsl[-1] + t)
        self.qsl = torch.tensor(qsl, dtype=torch.int32)

    def common(self):
        from vllm.v1.attention.backend import CommonAttentionMetadata

        return CommonAttentionMetadata(
            query_start_loc=self.qsl,
            query_start_loc_cpu=self.qsl,
            seq_lens=torch.tensor(self.seq_lens, dtype=torch.int32),
            num_reqs=len(self.seq_lens),
            num_actual_tokens=self.N,
            max_query_len=max(self.q_lens),
            max_seq_len=max(self.seq_lens),
            block_table_tensor=self.block_table,
            slot_mapping=self.slot_mapping,
            causal=True,
        )


def _builder(b: _Batch):
    from lade_vllm.attention.cpu_tree import LadeCPUMetadataBuilder

    # __init__ wants a VllmConfig with a model and registered layers; build()
    # only reads these attributes (cpu_attn.py:199-283).
    bld = LadeCPUMetadataBuilder.__new__(LadeCPUMetadataBuilder)
    bld.num_heads, bld.num_kv_heads, bld.head_dim = b.H, b.KVH, b.hd
    bld.dtype, bld.window_size, bld.block_size = b.dtype, -1, b.bs
    bld.kv_cache_dtype, bld.isa = "auto", b.isa
    bld.is_cross_attention = bld.is_encoder_only_attention = False
    return bld


def _impl(b: _Batch, monkeypatch):
    from vllm.v1.attention.backends import cpu_attn

    from lade_vllm.attention.cpu_tree import LadeCPUAttentionImpl

    fake_cfg = types.SimpleNamespace(model_config=types.SimpleNamespace(dtype=b.dtype))
    monkeypatch.setattr(cpu_attn, "get_current_vllm_config", lambda: fake_cfg)
    return LadeCPUAttentionImpl(b.H, b.hd, b.hd**-0.5, b.KVH, None, None, "auto")


def _run(b, bld, impl, layout, new_kv=False):
    set_step_layout(layout)
    try:
        md = bld.build(0, b.common())
    finally:
        set_step_layout(None)
    layer = types.SimpleNamespace(isa=b.isa, _k_scale_float=1.0, _v_scale_float=1.0)
    out = torch.full((b.N, b.H, b.hd), float("nan"), dtype=b.dtype)
    if new_kv:  # the step's own K/V, as the layer passes them (already written to the cache)
        key = torch.cat([k[p:] for k, p in zip(b.k, b.prefix_lens)])
        value = torch.cat([v[p:] for v, p in zip(b.v, b.prefix_lens)])
    else:       # the gather path reads every key from the cache
        key = value = b.query.new_zeros(b.N, b.KVH, b.hd)
    ret = impl.forward(layer, b.query, key, value, b.kv_cache, md, out)
    assert ret is out
    return out, md


@pytest.fixture(params=["kernel", "torch"])
def tree_path(request, monkeypatch):
    """Tree rows through the compiled kernel (lade_vllm.attention.tree_kernel, built by
    ``make setup``) or through torch's attention over the gathered prefix."""
    from lade_vllm.attention import tree_kernel

    if request.param == "kernel":
        assert tree_kernel.kernel() is not None, "tree kernel not built: run `make setup`"
    else:
        monkeypatch.setattr(tree_kernel, "kernel", lambda: None)
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_parity_chain_and_tree(dtype, monkeypatch, tree_path):
    from lade_vllm.attention.cpu_tree import LadeCPUAttentionMetadata

    H, KVH, hd, bs = 4, 2, 64, 32
    isa = _picked_isa(dtype, bs, hd)
    # req0: causal (5 new tokens), req1: tree of 7, req2: 1-token decode, req3: tree of 3
    b = _Batch([37, 50, 20, 0], [5, 7, 1, 3], H=H, KVH=KVH, hd=hd, bs=bs,
               dtype=dtype, isa=isa, seed=1)
    bld, impl = _builder(b), _impl(b, monkeypatch)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)

    ref, md0 = _run(b, bld, impl, None)  # vLLM's kernel, every row causal
    assert isinstance(md0, LadeCPUAttentionMetadata) and md0.tree is None
    assert not torch.isnan(ref.float()).any()

    # chain trees == plain causal == vLLM's kernel
    chain = TreeLayout([1, 3], [torch.ones(7, 7).tril().bool(), torch.ones(3, 3).tril().bool()])
    out, md = _run(b, bld, impl, chain)
    assert md.tree is not None and md.tree.num_reqs == 2 and get_step_layout() is None
    rows1, rows3 = slice(5, 12), slice(13, 16)
    torch.testing.assert_close(out[rows1].float(), ref[rows1].float(), **tol)
    torch.testing.assert_close(out[rows3].float(), ref[rows3].float(), **tol)
    assert torch.equal(out[:5], ref[:5]) and torch.equal(out[12:13], ref[12:13])

    # non-chain trees == dense reference on hand-gathered K/V
    m1 = _ancestor_mask([-1, 0, 0, 1, 1, 2, 5])
    m3 = _ancestor_mask([-1, 0, 0])
    out, _ = _run(b, bld, impl, TreeLayout([1, 3], [m1, m3]))
    assert torch.equal(out[:5], ref[:5]) and torch.equal(out[12:13], ref[12:13])
    for r, m, rows in ((1, m1, rows1), (3, m3, rows3)):
        p, T = b.prefix_lens[r], b.q_lens[r]
        allowed = torch.zeros(T, p + T, dtype=torch.bool)
        allowed[:, :p] = True
        allowed[:, p:] = m
        exp = _naive_attention(b.query[rows].float(), b.k[r].float(), b.v[r].float(),
                               allowed, hd**-0.5)
        torch.testing.assert_close(out[rows].double(), exp, **tol)


def _move_boundary(b, r, prefix_len, gen):
    """The same cached tokens, with request ``r``'s step starting at ``prefix_len`` (as after a
    step that committed ``prefix_len - p`` tokens); fresh queries."""
    b.q_lens[r] = b.seq_lens[r] - prefix_len
    b.prefix_lens[r] = prefix_len
    qsl = [0]
    for t in b.q_lens:
        qsl.append(qsl[-1] + t)
    b.qsl, b.N = torch.tensor(qsl, dtype=torch.int32), qsl[-1]
    b.query = torch.randn(b.N, b.H, b.hd, generator=gen).to(b.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_prefix_copies_follow_committed_tokens(dtype, monkeypatch):
    """Consecutive tree steps through the dense prefix copies give the attention of the gathered
    prefix: the copy is extended by the rows committed in between, rebuilt when stale."""
    H, KVH, hd, bs = 4, 2, 64, 32
    isa = _picked_isa(dtype, bs, hd)
    from lade_vllm.attention import tree_kernel

    monkeypatch.setattr(tree_kernel, "kernel", lambda: None)   # the copies serve torch's path
    # req0: a tree decoded over 3 steps (boundary 50 -> 53 -> 59); req1: a 3-token chain
    b = _Batch([50, 20], [12, 3], H=H, KVH=KVH, hd=hd, bs=bs, dtype=dtype, isa=isa, seed=3)
    bld, impl = _builder(b), _impl(b, monkeypatch)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    gen = torch.Generator().manual_seed(9)
    _move_boundary(b, 0, 50, gen)
    for step, (p, stale, start) in enumerate([(50, [], 0), (53, [], 50), (59, ["a"], 0)]):
        _move_boundary(b, 0, p, gen)
        T = b.q_lens[0]
        m = _ancestor_mask([-1] + [int(torch.randint(0, i, (1,), generator=gen))
                                   for i in range(1, T)])
        ref, _ = _run(b, bld, impl, TreeLayout([0], [m]))             # prefix gathered
        out, md = _run(b, bld, impl, TreeLayout([0], [m], req_keys=["a"], stale=stale),
                       new_kv=True)
        assert md.tree.starts == [start], step
        assert impl._lade_dense.length("a") == p
        torch.testing.assert_close(out.float(), ref.float(), **tol)
        allowed = torch.zeros(T, p + T, dtype=torch.bool)
        allowed[:, :p] = True
        allowed[:, p:] = m
        exp = _naive_attention(b.query[:T].float(), b.k[0].float(), b.v[0].float(), allowed,
                               hd**-0.5)
        torch.testing.assert_close(out[:T].double(), exp, **tol)


def test_build_rejects_wrong_query_len(monkeypatch):
    b = _Batch([10, 10], [3, 4], H=2, KVH=1, hd=64, bs=32, dtype=torch.float32,
               isa="vec", seed=0)
    bld = _builder(b)
    set_step_layout(TreeLayout([1], [torch.ones(5, 5).tril().bool()]))
    try:
        with pytest.raises(ValueError, match="4 scheduled query tokens.*T=5"):
            bld.build(0, b.common())
    finally:
        set_step_layout(None)


def test_unsupported_feature_raises(monkeypatch):
    b = _Batch([10], [3], H=2, KVH=1, hd=64, bs=32, dtype=torch.float32, isa="vec", seed=0)
    bld, impl = _builder(b), _impl(b, monkeypatch)
    impl.sliding_window = 8
    with pytest.raises(NotImplementedError, match="sliding window"):
        _run(b, bld, impl, TreeLayout([0], [torch.ones(3, 3).tril().bool()]))


def test_register_backend_override():
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    from lade_vllm.adapter.patches import ensure
    from lade_vllm.adapter.runtime import CPU_TREE_BACKEND
    from lade_vllm.attention.cpu_tree import BACKEND_PATH, LadeCPUAttentionBackend

    was = AttentionBackendEnum.CPU_ATTN.is_overridden()
    prev = AttentionBackendEnum.CPU_ATTN.get_path()
    ensure(CPU_TREE_BACKEND)
    try:
        assert AttentionBackendEnum.CPU_ATTN.get_path() == BACKEND_PATH
        assert AttentionBackendEnum.CPU_ATTN.get_class() is LadeCPUAttentionBackend
        assert LadeCPUAttentionBackend.get_name() == "CPU_ATTN"
    finally:
        if not was:
            AttentionBackendEnum.CPU_ATTN.clear_override()
        else:
            from vllm.v1.attention.backends.registry import register_backend

            register_backend(AttentionBackendEnum.CPU_ATTN, prev)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bs,seed", [(32, 0), (32, 1), (128, 2)])
def test_compiled_kernel_on_random_batches(dtype, bs, seed, monkeypatch):
    """The compiled kernel reads the paged cache in place: random tries (some requests decoded
    causally by vLLM's kernel beside them), prefixes on and off block edges, 3 query heads per
    KV head; every tree row matches a float64 reference, every other row vLLM's kernel."""
    from lade_vllm.attention import tree_kernel

    fn = tree_kernel.kernel()
    assert fn is not None, "tree kernel not built: run `make setup`"
    calls = []
    monkeypatch.setattr(tree_kernel, "kernel", lambda: (lambda *a: (calls.append(1), fn(*a))))
    gen = torch.Generator().manual_seed(seed)
    edges = [0, 1, bs - 1, bs, 2 * bs + 5, 3 * bs]
    prefix = [edges[int(torch.randint(0, len(edges), (1,), generator=gen))] for _ in range(5)]
    q_lens = [int(torch.randint(1, 41, (1,), generator=gen)) for _ in range(5)]
    H, KVH, hd = 9, 3, 64
    isa = _picked_isa(dtype, bs, hd)
    b = _Batch(prefix, q_lens, H=H, KVH=KVH, hd=hd, bs=bs, dtype=dtype, isa=isa, seed=seed)
    bld, impl = _builder(b), _impl(b, monkeypatch)
    ref, _ = _run(b, bld, impl, None)
    trees = [r for r in range(5) if r != 2]      # request 2 stays a causal chain
    masks = [_random_tree(q_lens[r], gen) for r in trees]
    out, md = _run(b, bld, impl, TreeLayout(trees, masks))
    assert md.tree is not None and (not calls) == (isa != "vec")
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    starts = [0]
    for t in q_lens:
        starts.append(starts[-1] + t)
    rows2 = slice(starts[2], starts[3])
    assert torch.equal(out[rows2], ref[rows2])
    for r, m in zip(trees, masks):
        p, T = prefix[r], q_lens[r]
        allowed = torch.zeros(T, p + T, dtype=torch.bool)
        allowed[:, :p] = True
        allowed[:, p:] = m
        rows = slice(starts[r], starts[r + 1])
        exp = _naive_attention(b.query[rows].float(), b.k[r].float(), b.v[r].float(), allowed,
                               hd**-0.5)
        torch.testing.assert_close(out[rows].double(), exp, **tol)


def test_tree_kernel_loading_rules(monkeypatch, tmp_path, caplog):
    """The kernel is off with LADE_TREE_KERNEL=0, missing (with a warning naming how to build it)
    where its build directory has no build for this source, CPU and torch, and only claims
    layouts it reads: K tokens contiguous, V dims contiguous, float32/bfloat16, sizes of 16."""
    from lade_vllm.attention import tree_kernel

    kernel = tree_kernel.kernel.__wrapped__
    monkeypatch.setenv("LADE_TREE_KERNEL", "0")
    assert kernel() is None
    monkeypatch.delenv("LADE_TREE_KERNEL")
    monkeypatch.setenv("LADE_KERNEL_DIR", str(tmp_path))
    with caplog.at_level("WARNING", logger="vllm.lade_vllm"):
        assert kernel() is None
    assert "make setup" in caplog.text and str(tmp_path) in caplog.text
    vec = ((0, 1, 128), (8192, 64, 1))
    assert tree_kernel.supports(vec, torch.bfloat16, 128, 64)
    assert tree_kernel.supports(vec, torch.float32, 32, 128)
    assert not tree_kernel.supports(vec, torch.float16, 128, 64)
    assert not tree_kernel.supports(vec, torch.bfloat16, 128, 72)
    assert not tree_kernel.supports(((0, 64, 1), (8192, 64, 1)), torch.bfloat16, 128, 64)
    assert not tree_kernel.supports(None, torch.bfloat16, 128, 64)
