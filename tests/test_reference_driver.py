"""The Hugging Face reference lookahead loop (``tools.reference``) against plain HF greedy
decoding, float32, on the offline SmolLM2 model.

Sizes: ``CI=true`` 6 MT-bench prompts x 64 new tokens (10 x 64 took ~2.5 min on 2 shared cores);
``LADE_FULL=1``: 10 x 128.
"""
from __future__ import annotations

import pytest
import torch

from helpers import FULL
from lade_vllm.proposer import build_step_trees
from tools.reference import keep_cache_rows, lookahead_generate, tree_attention_mask

NUM_PROMPTS, MAX_NEW = (10, 128) if FULL else (6, 64)
#: CI: a smaller tree (27 tokens per step, not 56: HF eager on one thread costs about its tokens)
W, N, G = (7, 5, 7) if FULL else (5, 4, 4)


@pytest.fixture(scope="module")
def model(model_dir):
    from transformers import AutoModelForCausalLM
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a small model on shared cores: more threads only contend
    m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                             attn_implementation="eager").eval()
    yield m
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def prompt_ids(tokenizer):
    from tools import prompts
    return [torch.tensor(tokenizer(p).input_ids)
            for p in prompts.load("mtbench", NUM_PROMPTS, tokenizer)]


@torch.inference_mode()
def greedy(model, ids: torch.Tensor, max_new_tokens: int, eos: int) -> list[int]:
    out = model.generate(ids[None], attention_mask=torch.ones_like(ids)[None], do_sample=False,
                         max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=eos)
    return out[0, ids.numel():].tolist()


@pytest.fixture(scope="module")
def greedy_refs(model, prompt_ids, tokenizer):
    return [greedy(model, ids, MAX_NEW, tokenizer.eos_token_id) for ids in prompt_ids]


def test_lookahead_equals_greedy_on_mtbench(model, prompt_ids, greedy_refs, tokenizer):
    n_tok = n_steps = 0
    for i, (ids, ref) in enumerate(zip(prompt_ids, greedy_refs)):
        out, steps = lookahead_generate(model, ids, MAX_NEW, window_size=W, ngram_size=N,
                                        guess_set_size=G, eos_token_id=tokenizer.eos_token_id)
        assert out == ref, f"prompt {i}: first difference at {_first_diff(out, ref)}"
        assert 1 <= steps <= len(out)
        n_tok, n_steps = n_tok + len(out), n_steps + steps
    assert n_tok / n_steps > 1.2, (n_tok, n_steps)


def test_eos_and_max_new_tokens_cut_the_output(model, prompt_ids, greedy_refs):
    ids, ref = prompt_ids[0], greedy_refs[0]
    out, steps = lookahead_generate(model, ids, 1, W, N, G)
    assert (out, steps) == (ref[:1], 1)
    eos = ref[10]
    out, _ = lookahead_generate(model, ids, MAX_NEW, W, N, G, eos_token_id=[eos, -5])
    assert out == ref[:ref.index(eos) + 1]
    out, _ = lookahead_generate(model, ids, 13, W, N, G, pool_from_prompt=False)
    assert out == ref[:13]


@torch.inference_mode()
def test_every_tree_node_sees_exactly_its_ancestors(model, prompt_ids):
    """Logits of one tree forward (window + merged candidates) over a cached prefix equal, per node,
    a plain causal forward of prefix + the node's root-to-node chain."""
    from transformers import DynamicCache
    prefix = prompt_ids[1][:40]
    gen = torch.Generator().manual_seed(0)
    levels = prefix[torch.randint(prefix.numel(), (1, N - 1, 4), generator=gen)]
    cands = torch.tensor([[[5, 6, 7, 8], [5, 6, 9, 10], [11, 12, 13, 14]]])
    tree = build_step_trees(prefix[-1:], levels, torch.tensor([3]), cands,
                            torch.ones(1, 3, dtype=torch.bool))
    past = prefix.numel() - 1
    cache = DynamicCache(config=model.config)
    model(input_ids=prefix[None, :past], past_key_values=cache, use_cache=True)
    logits = model(input_ids=tree.tokens[None], position_ids=(past + tree.depth)[None],
                   attention_mask=tree_attention_mask(tree, past, model.dtype),
                   past_key_values=cache, use_cache=True).logits[0]
    anc = tree.ancestors()
    for i in range(tree.total_nodes):
        chain = anc[i][anc[i] >= 0].flip(0)
        assert tree.depth[chain].tolist() == list(range(int(tree.depth[i]) + 1))
        plain = model(input_ids=torch.cat([prefix[:past], tree.tokens[chain]])[None]).logits[0, -1]
        torch.testing.assert_close(logits[i], plain, atol=2e-4, rtol=0)
    # the cache rewrite keeps the prefix and the chosen step entries, in order, on every layer
    before = [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]
    nodes = torch.tensor([0, 3])
    keep_cache_rows(cache, past, nodes)
    assert cache.get_seq_length() == past + 2
    for (k, v), layer in zip(before, cache.layers):
        for old, new in ((k, layer.keys), (v, layer.values)):
            assert torch.equal(new, torch.cat([old[..., :past, :], old[..., past + nodes, :]], -2))


def _first_diff(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
