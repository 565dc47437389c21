"""The compiled CPU tree-attention kernel (``csrc/tree_attention.cpp``): built, loaded, called.

``make setup`` builds it (``python -m lade_vllm.attention.tree_kernel``, a torch C++ extension
compiled for this machine's CPU, ~1 min) into ``csrc/build/`` (``LADE_KERNEL_DIR`` elsewhere).
Serving never compiles: :func:`kernel` loads the build whose name matches the source, torch and
the CPU, or returns None (the CPU backend then gathers the prefix and runs torch's attention,
lade_vllm.attention.cpu_tree) and logs once how to build it. ``LADE_TREE_KERNEL=0`` turns the
kernel off.

The kernel reads vLLM's paged cache in place, block by block through each request's block
table, for layouts whose K is stored ``[hd, bs]`` and V ``[bs, hd]`` inside a (block, kv head)
region (vLLM 0.32's ``vec`` ISA, lade_vllm.attention.kv_layout.strided_layout): float32 or
bfloat16, head size and block size multiples of 16, head size <= 256.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import os
import platform
import shutil
import sys
from pathlib import Path

import torch

logger = logging.getLogger("vllm.lade_vllm")

SOURCE = Path(__file__).parent / "csrc" / "tree_attention.cpp"
# -fopenmp: ATen's parallel_for runs on torch's OpenMP threads (without it, on one thread); the
# libgomp torch loads serves the kernel too (same soname)
CFLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fopenmp"]
LDFLAGS = ["-fopenmp"]


def build_dir() -> Path:
    return Path(os.environ.get("LADE_KERNEL_DIR") or SOURCE.parent / "build")


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return line
    except OSError:
        pass
    return platform.processor()


def module_name() -> str:
    """The build's name: a hash of the source, the flags, torch, Python and the CPU's features
    (a build for another CPU or torch is never loaded)."""
    h = hashlib.sha256()
    for part in (SOURCE.read_bytes(), " ".join(CFLAGS).encode(), torch.__version__.encode(),
                 sys.version.encode(), _cpu_flags().encode()):
        h.update(part)
    return f"lade_tree_attn_{h.hexdigest()[:12]}"


def _so_path(name: str) -> Path:
    return build_dir() / name / f"{name}.so"


def build(verbose: bool = False):
    """Compile the kernel for this machine (torch.utils.cpp_extension; needs a C++ compiler and
    ninja). Returns the loaded module."""
    from torch.utils.cpp_extension import load

    name = module_name()
    out = build_dir() / name
    for old in build_dir().glob("lade_tree_attn_*"):   # builds of earlier sources
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    return load(name=name, sources=[str(SOURCE)], build_directory=str(out),
                extra_cflags=CFLAGS, extra_ldflags=LDFLAGS, verbose=verbose)


@functools.lru_cache(maxsize=1)
def kernel():
    """The kernel's ``tree_attention`` function, or None (not built here, or turned off)."""
    if os.environ.get("LADE_TREE_KERNEL", "1") == "0":
        return None
    name = module_name()
    path = _so_path(name)
    if not path.exists():
        logger.warning("lade: the compiled tree-attention kernel is not built for this machine "
                       "(%s); tree steps use torch's attention over a gathered prefix, slower. "
                       "Build it with `make setup` or `python -m lade_vllm.attention.tree_kernel`.",
                       path)
        return None
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.tree_attention


def supports(layout: tuple | None, dtype: torch.dtype, block_size: int, head_size: int) -> bool:
    """Whether the kernel handles this cache: a strided layout with K tokens contiguous and V
    dims contiguous, float32 or bfloat16, sizes multiples of 16."""
    if layout is None:
        return False
    (_, k_so, _), (_, _, v_sd) = layout
    return (k_so == 1 and v_sd == 1 and dtype in (torch.float32, torch.bfloat16)
            and head_size % 16 == 0 and head_size <= 256 and block_size % 16 == 0)


def tree_attention(fn, query: torch.Tensor, output: torch.Tensor, kv_cache: torch.Tensor,
                   block_table: torch.Tensor, query_rows: torch.Tensor, sizes: torch.Tensor,
                   prefixes: torch.Tensor, anc: torch.Tensor, layout: tuple, num_heads: int,
                   scale: float) -> None:
    """Overwrite the tree rows of ``output`` [N, H * hd] with tree-masked attention of
    ``query`` [N, H * hd] over ``kv_cache`` (see the module docstring); ``fn`` = :func:`kernel`.
    ``block_table`` [R, nblk] int32, ``query_rows`` [R, Tq], ``sizes`` / ``prefixes`` [R] int64,
    ``anc`` [R, Tq, Tq] uint8 ancestor masks (node i attends node j)."""
    (ko, kso, ksd), (vo, vso, vsd) = layout
    fn(query, output, kv_cache, block_table, query_rows, sizes, prefixes, anc,
       [ko, kso, ksd, vo, vso, vsd], num_heads, float(scale))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    try:
        build()
    except Exception as exc:  # no compiler / ninja: serving falls back to the torch path
        print(f"lade: tree-attention kernel not built ({type(exc).__name__}: {exc}); tree steps "
              "will use torch's attention", file=sys.stderr)
        sys.exit(0)
    print(f"lade: tree-attention kernel built: {_so_path(module_name())}")
