"""Reference lookahead decoding loop on Hugging Face transformers (batch 1, greedy): the oracle for
the vLLM path.

    tokens, steps = lookahead_generate(model, input_ids, max_new_tokens=128,
                                       window_size=7, ngram_size=5, guess_set_size=7)

One step = ONE forward of the ``StepTree`` built by ``LookaheadState.propose`` over the KV cache of
the committed prefix (``DynamicCache``), with a custom 4-D additive mask (every past token visible,
tree part = ``tree.mask_dense()``) and ``position_ids = p + tree.depth``. Transformers 5.x passes a
4-D mask through unchanged (``masking_utils._preprocess_mask_arguments``); eager adds it to the
scores and SDPA takes it as ``attn_mask``, so both attention implementations work.

Cache invariant: before each step the cache holds every committed token except the last one, t,
which is the tree root at position p = cache length. After the forward the cache is rewritten to
the committed prefix + the K/V of the root and the accepted trie nodes (their positions p..p+k are
consecutive, so their rotary-embedded keys are already right); the bonus token is the next t.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from transformers import DynamicCache

from lade_vllm.proposer import LookaheadState, StepTree


def tree_attention_mask(tree: StepTree, past_len: int, dtype: torch.dtype) -> torch.Tensor:
    """[1, 1, T, past_len + T] additive mask: 0 where visible, the dtype's minimum elsewhere."""
    T = tree.total_nodes
    allowed = torch.ones((T, past_len + T), dtype=torch.bool, device=tree.tokens.device)
    allowed[:, past_len:] = tree.mask_dense()
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[None, None]


def keep_cache_rows(cache: DynamicCache, past_len: int, nodes: torch.Tensor) -> None:
    """Cut every layer back to ``past_len`` entries plus the step entries ``past_len + nodes``."""
    idx = torch.cat([torch.arange(past_len, device=nodes.device), past_len + nodes])
    for layer in cache.layers:
        layer.keys = layer.keys.index_select(-2, idx)
        layer.values = layer.values.index_select(-2, idx)


def _eos_set(eos_token_id) -> set[int]:
    if eos_token_id is None:
        return set()
    if isinstance(eos_token_id, int):
        return {eos_token_id}
    return {int(t) for t in eos_token_id}


def _finish(out: list[int], new: Iterable[int], max_new_tokens: int, eos: set[int]) -> bool:
    """Append ``new`` to ``out`` up to EOS / ``max_new_tokens``; True when generation is over."""
    for tok in new:
        out.append(int(tok))
        if tok in eos or len(out) >= max_new_tokens:
            return True
    return False


@torch.inference_mode()
def lookahead_generate(model, input_ids: torch.Tensor, max_new_tokens: int, window_size: int,
                       ngram_size: int, guess_set_size: int, pool_from_prompt: bool = True,
                       eos_token_id: int | Iterable[int] | None = None,
                       seed: int = 0) -> tuple[list[int], int]:
    """Greedy lookahead decoding of ``input_ids`` [L] with a HF causal LM (batch 1).

    Returns ``(tokens, steps)``: the generated tokens (ending at the first EOS, at most
    ``max_new_tokens``) and the number of model forwards, prefill included. In exact arithmetic the
    tokens equal plain greedy decoding."""
    device = model.device
    input_ids = torch.as_tensor(input_ids).reshape(-1).long().to(device)
    eos = _eos_set(eos_token_id)
    cache = DynamicCache(config=model.config)
    logits = model(input_ids=input_ids[None], past_key_values=cache, use_cache=True).logits
    first = int(logits[0, -1].argmax())
    out: list[int] = []
    steps = 1
    if max_new_tokens <= 0 or _finish(out, [first], max_new_tokens, eos):
        return out, steps

    state = LookaheadState(1, window_size, ngram_size, guess_set_size,
                           pool_from_prompt=pool_from_prompt, device=device)
    slots = torch.zeros(1, dtype=torch.long, device=device)
    state.start(0, torch.cat([input_ids, input_ids.new_tensor([first])]), seed=seed)
    last = first
    while True:
        past_len = cache.get_seq_length()
        tree = state.propose(slots, torch.tensor([last], device=device))
        mask = tree_attention_mask(tree, past_len, model.dtype)
        logits = model(input_ids=tree.tokens[None], position_ids=(past_len + tree.depth)[None],
                       attention_mask=mask, past_key_values=cache, use_cache=True).logits
        targets = logits[0].argmax(-1)
        res = state.commit(slots, tree, targets)
        steps += 1
        n = int(res.num_emitted[0])
        emitted = res.emitted[0, :n].tolist()
        accepted = res.accepted_nodes[0, :n - 1]
        keep_cache_rows(cache, past_len, torch.cat([tree.root_index[:1], accepted]))
        if _finish(out, emitted, max_new_tokens, eos):
            return out, steps
        last = emitted[-1]
