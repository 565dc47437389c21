"""Warm the CPU linear layers for the small step sizes lade feeds, before serving.

vLLM 0.32's CPU linear layers (``dispatch_cpu_unquantized_gemm``: a oneDNN matmul handler per
layer, ``ops.create_onednn_mm(weight, 32)``) build a kernel for each distinct token count M the
first time they meet it (a JIT-compiled kernel, which oneDNN then shares between layers of the
same shape), then keep 32 per layer. On the 2-core AMD EPYC of 2026-12-07 SmolLM2's four
projection shapes took 2.5-8 ms at a new M (the higher with the machine busy) against 0.1-0.5 ms
at a cached one (M = 2..21, bf16), and each further layer ~0.05 ms more: the first step of each
new size pays ~10 ms, a quarter of a batch-1 step.
Plain decoding at batch 1 meets one size; lade's chains and trees meet every size 1 + drafts, each
first in the middle of serving, where it slows that step and hands the policy a step-cost sample
a quarter too high. At engine start one linear layer of each weight shape (the LM head included)
runs once on zeros at each M in 1..``LADE_WARM_TOKENS`` (default 16, within the 32 each layer
keeps; 0: off), which JITs the kernels (0.6-0.7 ms per shape and size; a second layer of that
shape then pays 0.1 ms, not 0.7); then every other layer, while the whole warm-up stays within
``LADE_WARM_SECONDS`` (default 2): SmolLM2's 122 layers at 16 sizes take 0.4 s, a model whose
layers do not fit keeps the per-shape part.
"""
from __future__ import annotations

import logging
import os
import time

import torch

logger = logging.getLogger("vllm.lade_vllm")

WARM_TOKENS = 16     # step sizes 1..16
WARM_SECONDS = 2.0   # the warm-up's budget beyond one layer per shape


def _shape(module: torch.nn.Module) -> tuple[int, int | None] | None:
    """(in features, out features or None) of a linear layer, its weight possibly removed."""
    weight = getattr(module, "weight", None)
    if weight is not None and weight.dim() == 2 and weight.numel():
        return int(weight.shape[1]), int(weight.shape[0])
    k = getattr(module, "input_size_per_partition", None)
    n = getattr(module, "output_size_per_partition", None)
    return (int(k), int(n) if n else None) if k else None


def warm_linear_layers(model: torch.nn.Module, tokens: int | None = None,
                       seconds: float | None = None) -> tuple[int, float]:
    """Run the ``cpu_linear`` (set by vLLM's CPU GEMM dispatch) of one module per weight shape
    and dtype, then of the others while within ``seconds``, on zeros of every token count
    1..``tokens``. Returns (layers warmed, seconds spent)."""
    if tokens is None:
        tokens = int(os.environ.get("LADE_WARM_TOKENS", str(WARM_TOKENS)))
    if seconds is None:
        seconds = float(os.environ.get("LADE_WARM_SECONDS", str(WARM_SECONDS)))
    t0 = time.perf_counter()
    if tokens <= 0:
        return 0, 0.0
    first, rest, seen = [], [], set()
    for module in model.modules():
        linear = getattr(module, "cpu_linear", None)
        shape = _shape(module) if callable(linear) else None
        if shape is None:
            continue
        weight = getattr(module, "weight", None)
        key = (shape, weight.dtype if weight is not None else None)
        (rest if shape[1] is not None and key in seen else first).append((module, shape[0]))
        seen.add(key)
    layers = 0
    with torch.inference_mode():
        for i, (module, k) in enumerate(first + rest):
            if i >= len(first) and time.perf_counter() - t0 > seconds:
                break
            weight = getattr(module, "weight", None)
            dtype = weight.dtype if weight is not None else torch.get_default_dtype()
            x = torch.zeros(tokens, k, dtype=dtype)
            for m in range(1, tokens + 1):
                module.cpu_linear(x[:m], weight, getattr(module, "bias", None))
            layers += 1
    return layers, time.perf_counter() - t0
