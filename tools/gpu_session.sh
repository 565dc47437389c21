#!/usr/bin/env bash
# What this project runs on a lent GPU machine (no vLLM there, no package index; see README "GPU").
# The offline model's GGUF travels in two halves (the transfer limit is 64 MiB a call), so a session
# runs two calls on one warm machine, preparing .gpu/ here first (tools/gpu_session.sh pack):
#   part1: the pure-torch tests on CUDA and the proposer's time per step (first half parked in /tmp)
#   part2: joins the GGUF, converts it to bf16, the HF reference loop lade vs greedy on the GPU
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/lade-out}
mkdir -p "$OUT" /tmp/lade
py=${PY:-python3}
case "${1:-}" in
pack)   # here, with the project's .venv: prompt ids, the gguf wheel, the GGUF in two halves
    py=.venv/bin/python
    gguf=$($py -c "from tools.models import _find_gguf, cache_dir; print(_find_gguf(cache_dir()))")
    mkdir -p .gpu/a .gpu/b .gpu/whl
    $py benchmarks/reference_tokens_per_step.py --n 8 --write-prompt-ids .gpu/prompt_ids.json
    $py -m pip download -q --no-deps --only-binary=:all: -d .gpu/whl gguf==0.19.0
    half=$(( ($(stat -c %s "$gguf") + 1) / 2 ))
    split -b "$half" "$gguf" .gpu/part && mv .gpu/partaa .gpu/a/ && mv .gpu/partab .gpu/b/
    sha256sum "$gguf" | cut -c1-64 > .gpu/gguf.sha256
    ;;
part1)
    cp .gpu/a/partaa /tmp/lade/
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    $py -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
    $py -m pytest -q -p no:cacheprovider --noconftest -o addopts= tests/test_cuda_tree_math.py \
        tests/proposer --ignore tests/proposer/test_sampled_subtree.py -rs 2>&1 | tail -15
    LADE_TEST_DEVICE=cuda $py -m pytest -q -p no:cacheprovider --noconftest \
        tests/proposer/test_toy_e2e.py 2>&1 | tail -3
    for dev in cuda cpu; do
        $py benchmarks/bench_proposer.py --device $dev --batches 1 32 256 --steps 100 --warmup 20
    done
    ;;
part2)
    cat /tmp/lade/partaa .gpu/b/partab > /tmp/lade/model.gguf
    [ "$(sha256sum /tmp/lade/model.gguf | cut -c1-64)" = "$(cat .gpu/gguf.sha256)" ] || {
        echo "GGUF checksum mismatch (was part1 run on this machine?)"; exit 1; }
    $py -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/whl/*.whl
    PYTHONPATH=/tmp/site:. $py -c "
from pathlib import Path; from tools.models import _convert
_convert(Path('/tmp/lade/model.gguf'), Path('/tmp/lade/smollm2'), tokenizer=False)" || exit 1
    $py benchmarks/reference_tokens_per_step.py --prompt-ids .gpu/prompt_ids.json \
        --model /tmp/lade/smollm2 --device cuda --dtype bfloat16 --attn sdpa --n 8 \
        --max-new-tokens 128 --threads 4 ${REF_ARGS:-} | tee "$OUT/reference_gpu.md"
    ;;
*) echo "usage: tools/gpu_session.sh pack|part1|part2"; exit 2 ;;
esac
