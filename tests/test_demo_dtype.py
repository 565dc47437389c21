"""`make demo`'s default dtype follows the CPU: bf16 only where it is native."""
from tools.demo import default_dtype


def test_bf16_only_with_native_bf16(tmp_path):
    def cpu(flags):
        p = tmp_path / "cpuinfo"
        p.write_text(f"processor\t: 0\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n")
        return str(p)
    assert default_dtype(cpu("fpu sse avx avx2 fma")) == "float32"            # AVX2 only
    assert default_dtype(cpu("avx2 avx512f avx512_bf16")) == "bfloat16"
    assert default_dtype(cpu("avx2 avx512f amx_bf16 amx_tile")) == "bfloat16"
    assert default_dtype(str(tmp_path / "missing")) == "bfloat16"            # not Linux: as before
