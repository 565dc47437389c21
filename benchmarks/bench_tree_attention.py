"""One attention layer, per step: a T-token tree through lade's CPU paths (the compiled kernel,
torch over the gathered prefix, torch over a dense prefix copy) vs a T-token chain through
vLLM's own kernel (what an ngram step with T-1 drafts runs).

    .venv/bin/python benchmarks/bench_tree_attention.py [--dtype bfloat16] [--prefix 300 1000]

Shapes default to the offline model (SmolLM2: 9 heads, 3 KV heads, head size 64, block 128).
Each cell is timed ``--repeat`` times (min/median/max, microseconds per layer call) with the
implementations interleaved.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import types

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _tree_mask(T: int, branch: int, gen) -> torch.Tensor:
    """An ancestor mask of a random trie of T nodes whose nodes have up to ``branch`` children."""
    from lade_vllm.attention.self_check import ancestor_mask

    parents, kids = [-1], [0]
    for i in range(1, T):
        open_ = [j for j in range(i) if kids[j] < branch]
        p = open_[int(torch.randint(0, len(open_), (1,), generator=gen))]
        kids[p] += 1
        parents.append(p)
        kids.append(0)
    return ancestor_mask(parents)


class Layer:
    """One request with ``p`` cached tokens and ``T`` new ones, on vLLM's CPU backend."""

    def __init__(self, p, T, dtype, H=9, KVH=3, hd=64, bs=128, branch=3, seed=0):
        from vllm import _custom_ops as ops
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

        gen = torch.Generator().manual_seed(seed)
        self.ops, self.T, self.p, self.bs = ops, T, p, bs
        self.H, self.KVH, self.hd, self.dtype = H, KVH, hd, dtype
        self.isa = _get_attn_isa(dtype, bs, hd)
        s = p + T
        nblk = (s + bs - 1) // bs
        self.kv_cache = torch.zeros(nblk + 8, KVH, bs, 2 * hd, dtype=dtype)
        self.block_table = torch.arange(nblk, dtype=torch.int32)[None]
        nb = self.kv_cache.shape[0]
        kc, vc = self.kv_cache.view(nb, KVH, 2 * bs, hd).chunk(2, dim=2)
        self.k = torch.randn(s, KVH, hd, generator=gen).to(dtype)
        self.v = torch.randn(s, KVH, hd, generator=gen).to(dtype)
        ops.cpu_attn_reshape_and_cache(self.k, self.v, kc, vc, torch.arange(s), self.isa)
        self.key_cache, self.value_cache = kc, vc
        self.query = torch.randn(T, H, hd, generator=gen).to(dtype)
        self.out = torch.empty_like(self.query)
        self.qsl = torch.tensor([0, T], dtype=torch.int32)
        self.seq_lens = torch.tensor([s], dtype=torch.int32)
        self.sched = ops.cpu_attn_get_scheduler_metadata(
            num_reqs=1, num_heads=H, num_kv_heads=KVH, head_dim=hd, seq_lens=self.seq_lens,
            dtype=dtype, query_start_loc=self.qsl, causal=True, sliding_window_size=-1,
            isa=self.isa, enable_kv_split=False)
        self.mask = _tree_mask(T, branch, gen)

    def chain(self):
        """vLLM's kernel, one causal sequence of T query tokens."""
        self.ops.cpu_attention_with_kv_cache(
            query=self.query, key_cache=self.key_cache, value_cache=self.value_cache,
            output=self.out, query_start_loc=self.qsl, seq_lens=self.seq_lens,
            scale=self.hd ** -0.5, causal=True, alibi_slopes=None, sliding_window=-1,
            block_table=self.block_table, softcap=0.0, scheduler_metadata=self.sched,
            s_aux=None)
        return self.out

    def tree_plan(self):
        from lade_vllm.attention import TreeLayout
        from lade_vllm.attention.cpu_tree import build_tree_plan

        layout = TreeLayout([0], [self.mask])
        return build_tree_plan(layout, self.qsl, self.seq_lens, self.block_table, 1, self.bs)

    def tree(self, impl, plan, dense: bool = False, kernel: bool = True):
        """lade's CPU tree path (every row a tree row: vLLM's kernel skipped). ``dense``: the
        request's dense prefix copy already holds all but the last 2 committed rows (the steady
        state of consecutive tree steps); otherwise the whole prefix is gathered."""
        layer = types.SimpleNamespace(isa=self.isa)
        k = v = None
        if dense:
            plan.req_keys, plan.starts = ["r"], [self.p - 2]
            copies = impl.__dict__.get("_lade_dense")
            if copies is not None and copies.length("r") >= 0:
                copies._copies["r"][2] = self.p - 2
            k, v = self.k[self.p:], self.v[self.p:]
        else:
            plan.req_keys = None
        from lade_vllm.attention import tree_kernel

        built = tree_kernel.kernel
        if not kernel:
            tree_kernel.kernel = lambda: None
        try:
            impl._tree_overwrite(layer, self.query.view(self.T, -1), k, v, self.kv_cache, plan,
                                 self.out.view(self.T, -1))
        finally:
            tree_kernel.kernel = built
        return self.out


def _impl(layer: Layer):
    from lade_vllm.attention.cpu_tree import LadeCPUAttentionImpl

    impl = LadeCPUAttentionImpl.__new__(LadeCPUAttentionImpl)
    impl.num_heads, impl.head_size, impl.scale = layer.H, layer.hd, layer.hd ** -0.5
    impl.num_kv_heads, impl.kv_cache_dtype = layer.KVH, "auto"
    return impl


def _time(fn, n):
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--prefix", type=int, nargs="+", default=[300, 1000])
    ap.add_argument("--tokens", type=int, nargs="+", default=[8, 16, 32, 64, 96])
    ap.add_argument("--calls", type=int, default=200, help="layer calls per timing")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    if torch.cpu._is_amx_tile_supported():
        torch._C._cpu._init_amx()  # request the AMX tile state for this process (else SIGILL)
    print(f"torch threads {torch.get_num_threads()}, {args.dtype}; us per layer call, "
          "min/median/max over repeats; a plan is built once per step (not per layer)")
    from lade_vllm.attention import tree_kernel

    if tree_kernel.kernel() is None:
        print("the compiled tree kernel is not built (make setup): its column repeats torch's")
    print(f"{'p':>5} {'T':>4} | {'chain (vLLM kernel)':>22} | {'tree, compiled kernel':>22} "
          f"| {'tree, torch, gathered':>22} | {'tree, torch, dense copy':>23} | ratios")
    for p in args.prefix:
        for T in args.tokens:
            layer = Layer(p, T, dtype)
            impl, plan = _impl(layer), layer.tree_plan()
            fns = {"chain": layer.chain, "kernel": lambda: layer.tree(impl, plan),
                   "gather": lambda: layer.tree(impl, plan, kernel=False),
                   "dense": lambda: layer.tree(impl, plan, dense=True, kernel=False)}
            times = {k: [] for k in fns}
            for f in fns.values():
                f()
            for _ in range(args.repeat):
                for k, f in fns.items():
                    times[k].append(_time(f, args.calls))
            cell = {k: (min(v), statistics.median(v), max(v)) for k, v in times.items()}
            fmt = lambda c: f"{c[0]:6.0f}/{c[1]:6.0f}/{c[2]:6.0f}"  # noqa: E731
            ratio = lambda k: cell[k][1] / cell["chain"][1]  # noqa: E731
            print(f"{p:5d} {T:4d} | {fmt(cell['chain']):>22} | {fmt(cell['kernel']):>22} | "
                  f"{fmt(cell['gather']):>22} | {fmt(cell['dense']):>23} | "
                  f"{ratio('kernel'):5.2f}x {ratio('gather'):5.2f}x {ratio('dense'):5.2f}x")


if __name__ == "__main__":
    main()
