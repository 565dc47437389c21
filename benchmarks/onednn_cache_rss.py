"""How much resident memory vLLM's oneDNN GEMM handlers keep per distinct token count.

vLLM 0.32's CPU linear layers (``dispatch_cpu_unquantized_gemm`` ->
``ops.create_onednn_mm(weight, 32)``) cache one oneDNN primitive per distinct M (tokens in the
step) per layer, up to 32 per layer. Plain decoding at batch B sees about B distinct M values;
any speculative method (ngram chains, lade trees) sees many more, so its workers' RSS grows until
every layer's cache is full, then stays. This measures it on SmolLM2-135M's projection shapes:

    .venv/bin/python benchmarks/onednn_cache_rss.py
"""
from __future__ import annotations

import ctypes
import os

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")

import psutil  # noqa: E402
import torch  # noqa: E402

#: SmolLM2-135M per decoder layer: qkv, o, gate_up, down (in, out)
SHAPES = [(576, 960), (576, 576), (576, 3072), (1536, 576)]


def main() -> None:
    from vllm import _custom_ops as ops
    proc = psutil.Process()
    rss = lambda: proc.memory_info().rss / 2**20  # noqa: E731
    handlers = [ops.create_onednn_mm(torch.randn(n_in, n_out).t().contiguous().t(), 32)
                for n_in, n_out in SHAPES]
    xs = {n_in: torch.randn(1024, n_in) for n_in, _ in SHAPES}
    base = rss()
    print(f"one layer's 4 projections; RSS {base:.0f} MiB before")
    for lo, top in ((1, 8), (1, 16), (1, 32), (1, 64), (1, 128), (1, 256), (1, 256), (257, 512),
                    (513, 1024)):
        for m in range(lo, top + 1):
            for (n_in, _), h in zip(SHAPES, handlers):
                ops.onednn_mm(h, xs[n_in][:m], None)
        print(f"after M = {lo:3d}..{top:4d}: +{rss() - base:6.1f} MiB "
              f"(+{(rss() - base) / len(SHAPES):.1f} MiB per projection)")
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    print(f"after malloc_trim(0): +{rss() - base:6.1f} MiB (freed heap returned to the system)")


if __name__ == "__main__":
    main()
