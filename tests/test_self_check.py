"""The engine-start self-check (lade_vllm.attention.self_check), on CPU without an engine:

- it passes for the CPU tree backend (vLLM's real CPU cache writer and layout) and for the CUDA
  tree path (cuda_tree's real plan / tree part / merge, FlashAttention replaced by the pure-torch
  stand-in), in float32 and bfloat16;
- it catches a tree mask that lost one ancestor, with the numbers in the error;
- it catches a wrong KV move (shifted destination, a wrong in-block layout).
"""
from __future__ import annotations

import pytest
import torch

from lade_vllm.attention import self_check as sc

pytestmark = pytest.mark.timeout(120)

H, KVH, HD = 4, 2, 64


def _cpu_path(dtype, bs):
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    from lade_vllm.attention.cpu_tree import LadeCPUAttentionImpl

    impl = object.__new__(LadeCPUAttentionImpl)   # __init__ wants a vLLM config
    impl.num_heads, impl.head_size, impl.scale, impl.kv_cache_dtype = H, HD, HD ** -0.5, "auto"
    path = sc.cpu_tree_path(impl, _get_attn_isa(dtype, bs, HD))
    path.new_cache = lambda nb: torch.zeros(nb, KVH, bs, 2 * HD, dtype=dtype)
    return path


def _cuda_path():
    pytest.importorskip("vllm")
    return sc.cuda_tree_path(sc.stub_flash_impl(H, KVH, HD),
                             flash_attn=sc.reference_flash_attn_varlen_func)


PATHS = {"cpu": (_cpu_path, 32), "cuda_tree": (lambda dtype, bs: _cuda_path(), 16)}


def _run(which, dtype=torch.float32):
    make, bs = PATHS[which]
    return sc.run_self_check(make(dtype, bs), device="cpu", dtype=dtype, block_size=bs,
                             num_heads=H, num_kv_heads=KVH, head_size=HD)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("which", ["cpu", "cuda_tree"])
def test_self_check_passes(which, dtype):
    report = _run(which, dtype)
    assert report["shapes"] == 4 and report["tolerance"] == sc.TOLERANCE[dtype]
    assert 0 <= report["max_abs_error"] <= report["tolerance"]
    assert report["seconds"] < 5


def test_shapes_cover_what_the_engine_schedules():
    names = [c.name for c in sc.check_cases(16)]
    assert names == ["chain", "branching trie", "lookahead window + trie",
                     "two requests, different prefixes"]
    two = sc.check_cases(16)[3].reqs
    assert [p for p, _, _ in two] == [0, 5, 9] and two[1][1] is None   # an ordinary request too
    assert sc.check_cases(16)[1].reqs[0][0] > 16                        # crosses a block
    window = sc.lookahead_step_parents()[0]
    assert len(window) > 10 and sc.ancestor_mask(window).sum(1).max() > 3


def test_lookahead_parents_match_the_step_tree():
    from lade_vllm.proposer import build_step_trees

    W, N = 5, 4
    levels = torch.arange(100, 100 + 2 * (N - 1) * W).reshape(2, N - 1, W)
    cands = torch.tensor([[[1, 2, 3], [1, 5, 6]], [[7, 8, 9], [4, 4, 4]]])
    tree = build_step_trees(torch.tensor([7, 8]), levels, torch.tensor([N - 1, 2]),
                            cands, torch.tensor([[True, True], [True, False]]))
    for b, parents in enumerate(sc.lookahead_step_parents()):
        assert torch.equal(sc.ancestor_mask(parents), tree.ancestor_mask(b))


@pytest.mark.parametrize("kind", ["cpu", "cuda_tree"])
def test_check_runner_uses_the_engines_layer_and_cache(monkeypatch, kind):
    """check_runner (what the initialize_kv_cache record calls) on a stand-in runner: the first
    lade layer's impl, the cache's dtype / block size / heads / stride order, and a log line."""
    import types

    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    from lade_vllm.attention.cpu_tree import LadeCPUAttentionImpl

    bs = 16
    if kind == "cpu":
        impl = object.__new__(LadeCPUAttentionImpl)
        impl.num_heads, impl.head_size, impl.scale, impl.kv_cache_dtype = H, HD, HD ** -0.5, "auto"
        cache = torch.zeros(5, KVH, bs, 2 * HD)
    else:
        impl = sc.stub_flash_impl(H, KVH, HD)
        impl.lade_flash_attn = sc.reference_flash_attn_varlen_func
        cache = sc.flash_layout_cache(5, bs, KVH, HD, torch.float32, "cpu")
    layer = types.SimpleNamespace(kv_cache=[cache], isa=_get_attn_isa(torch.float32, bs, HD))
    monkeypatch.setattr(sc, "_first_tree_layer", lambda runner: ("layers.0.attn", layer, impl))
    lines = []
    log = types.SimpleNamespace(info=lambda fmt, *a: lines.append(fmt % a))
    report = sc.check_runner(object(), log=log)
    assert report["shapes"] == 4 and report["max_abs_error"] < 1e-4
    assert len(lines) == 1 and "self-check passed" in lines[0] and "block_size=16" in lines[0]
    assert ("CPU tree backend" in lines[0]) is (kind == "cpu")


def _drop_one_ancestor(monkeypatch, module):
    """The backend's tree rows lose one ancestor bit (the root, for the deepest node)."""
    real = module.tree_rows

    def tree_rows(*args, **kwargs):
        rows = real(*args, **kwargs)
        if rows is not None:
            for r in range(rows.masks.shape[0]):
                i = int(rows.sizes[r]) - 1
                if i > 0:
                    rows.masks[r, i, 0] = False
        return rows

    monkeypatch.setattr(module, "tree_rows", tree_rows)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("which", ["cpu", "cuda_tree"])
def test_self_check_catches_a_wrong_mask(monkeypatch, which, dtype):
    pytest.importorskip("vllm")
    from lade_vllm.attention import cpu_tree, cuda_tree

    _drop_one_ancestor(monkeypatch, cpu_tree if which == "cpu" else cuda_tree)
    with pytest.raises(sc.SelfCheckError) as e:
        _run(which, dtype)
    msg = str(e.value)
    assert "max abs error" in msg and f"tolerance {sc.TOLERANCE[dtype]:.3g}" in msg
    assert "shape 'chain'" in msg and "will not start" in msg
    err = float(msg.split("max abs error ")[1].split()[0])
    assert err > sc.TOLERANCE[dtype]


@pytest.mark.parametrize("which", ["cpu", "cuda_tree"])
def test_self_check_catches_a_wrong_kv_move(monkeypatch, which):
    from lade_vllm.adapter import kv_move

    real = kv_move.move_slots
    monkeypatch.setattr(kv_move, "move_slots",
                        lambda caches, src, dst, perms: real(caches, src, dst + 1, perms))
    with pytest.raises(sc.SelfCheckError, match=r"KV mover's result for shape 'chain'.*"
                                                r"differs .* in \d+ elements"):
        _run(which)


def test_self_check_catches_a_wrong_cpu_layout(monkeypatch):
    from lade_vllm.adapter import kv_move

    real = kv_move.move_slots          # K's in-block positions taken for V's: K is never moved
    monkeypatch.setattr(kv_move, "move_slots",
                        lambda caches, src, dst, perms: real(caches, src, dst,
                                                             (perms[1], perms[1])))
    with pytest.raises(sc.SelfCheckError, match="branching trie"):
        _run("cpu")   # the chain's moves are in place (src == dst); the trie's are not


def test_cache_like_keeps_the_engines_stride_order():
    real = sc.flash_layout_cache(7, 16, 2, 8, torch.bfloat16, "cpu")     # FA: [nb, bs, kvh, 2hd]
    made = sc.cache_like(real, 3)
    assert made.shape == (3, 2, 16, 16) and made.dtype == torch.bfloat16
    assert [s > 0 for s in made.stride()] == [True] * 4
    order = lambda t: sorted(range(4), key=lambda d: t.stride(d), reverse=True)  # noqa: E731
    assert order(made) == order(real) == [0, 2, 1, 3]


# ---- device-correctness fixes of the hot path (audit for the CUDA opt-in) -----------------------
def test_write_positions_one_copy_for_all_requests():
    import numpy as np

    from lade_vllm.adapter.runner import write_positions

    buf = torch.zeros(12, dtype=torch.int64)
    write_positions(buf, [(1, np.array([5, 6, 6, 7])), (8, np.array([3, 4]))])
    assert buf.tolist() == [0, 5, 6, 6, 7, 0, 0, 0, 3, 4, 0, 0]
    write_positions(buf, [])                  # no tree request: untouched
    assert buf.tolist()[1] == 5


def test_root_rows_from_the_host_list():
    import types

    import numpy as np

    from lade_vllm.adapter.sampling import root_rows

    md = types.SimpleNamespace(num_draft_tokens=[3, 0, 2, 0, 1])  # vLLM's own example
    cu = np.cumsum(np.array([3, 0, 2, 0, 1]) + 1)                 # cu_num_sampled_tokens
    assert root_rows(md) == (cu - (np.array([3, 0, 2, 0, 1]) + 1)).tolist()
    assert root_rows(md) == [0, 4, 5, 8, 9]


def test_mask_bias_follows_the_mask_device():
    from lade_vllm.attention.tree_math import mask_bias

    allowed = torch.tensor([[[True, False]]])
    bias = mask_bias(allowed, torch.float32)
    assert bias.device == allowed.device and bias.shape == (1, 1, 1, 2)
    assert bias[0, 0, 0, 0] == 0 and torch.isneginf(bias[0, 0, 0, 1])


def test_first_tree_layer_picks_a_full_attention_lade_layer(monkeypatch):
    import types

    import vllm.config
    from vllm.v1.attention.backend import AttentionType

    from lade_vllm.attention.cpu_tree import LadeCPUAttentionImpl

    def lade_impl(window):
        impl = object.__new__(LadeCPUAttentionImpl)
        impl.sliding_window = window
        return impl

    layers = {"layers.0.attn": types.SimpleNamespace(attn_type=AttentionType.DECODER,
                                                     impl=lade_impl(512)),
              "layers.1.attn": types.SimpleNamespace(attn_type=AttentionType.DECODER,
                                                     impl=lade_impl(-1))}
    monkeypatch.setattr(vllm.config, "get_layers_from_vllm_config", lambda cfg, cls: layers)
    runner = types.SimpleNamespace(vllm_config=None)
    assert sc._first_tree_layer(runner)[0] == "layers.1.attn"      # not the windowed one
    layers.pop("layers.1.attn")
    assert sc._first_tree_layer(runner)[0] == "layers.0.attn"
    layers["layers.0.attn"].impl = object()                          # vLLM's own backend
    with pytest.raises(sc.SelfCheckError, match="no decoder attention layer.*FLASH_ATTN"):
        sc._first_tree_layer(runner)
