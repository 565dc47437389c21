"""Offline batch inference over a prompt file with Ray Data + vLLM + lookahead decoding.

    python examples/batch_ray_data.py prompts.txt out.jsonl            # one prompt per line
    python examples/batch_ray_data.py prompts.jsonl out.jsonl          # {"prompt": "..."} per line
    python examples/batch_ray_data.py prompts.txt out.jsonl --replicas 2 --ray-address auto

Ray Data reads the file, a pool of actors (``--replicas``, one vLLM engine each, lade on) generates
greedily batch by batch, and the results are written in input order as JSON lines
(prompt, text, num_tokens). The last line printed is a JSON summary with the tokens per step read
from vLLM's spec-decode counters. Without ``--ray-address`` a private local Ray instance is started
on the loopback interface and shut down at the end.

Needs ``pip install 'lade-vllm[examples]'`` (Ray Data needs pyarrow and pandas).
"""
import argparse
import json
import os
import sys

# vLLM on CPU otherwise reserves most of the machine's memory for the KV cache (GiB; GPUs ignore it)
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
import uuid


def offline_model() -> str:
    """The repository's offline SmolLM2 folder (tools/models.py, prepared on first use)."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from tools.models import model_path
    return model_path()


class LadeGenerator:
    """One vLLM engine per Ray actor; called on batches of {"prompt": [...]}."""

    def __init__(self, model: str, speculative_config, max_tokens: int, dtype: str,
                 max_num_seqs: int):
        from vllm import LLM, SamplingParams
        kwargs = {} if speculative_config is None else {"speculative_config": speculative_config}
        self.llm = LLM(model=model, dtype=dtype, enforce_eager=True, max_model_len=2048,
                       max_num_seqs=max_num_seqs, seed=0,
                       disable_log_stats=False,  # keeps the spec-decode counters
                       **kwargs)
        self.params = SamplingParams(temperature=0.0, max_tokens=max_tokens)

    def _accepted(self) -> float:
        """Draft tokens accepted so far: vLLM's spec-decode counter."""
        return sum(float(m.value) for m in self.llm.get_metrics()
                   if m.name == "vllm:spec_decode_num_accepted_tokens")

    def __call__(self, batch: dict) -> dict:
        prompts = [str(p) for p in batch["prompt"]]
        before = self._accepted()
        outputs = self.llm.generate(prompts, self.params, use_tqdm=False)
        accepted = self._accepted() - before
        batch_id = uuid.uuid4().hex
        return {
            "prompt": prompts,
            "text": [o.outputs[0].text for o in outputs],
            "num_tokens": [len(o.outputs[0].token_ids) for o in outputs],
            # per batch, repeated on each of its rows: summed once per batch by main()
            "batch_id": [batch_id] * len(prompts),
            "batch_accepted": [accepted] * len(prompts),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("prompt_file")
    parser.add_argument("output_file")
    parser.add_argument("--model", default=None, help="HF folder (default: the offline SmolLM2)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--lade", default="lade",
                        help='"lade", a JSON dict of lade options, or "none" (vanilla)')
    parser.add_argument("--replicas", type=int, default=1, help="engines (Ray actors)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--ray-address", default=None,
                        help="an existing cluster (e.g. auto); default: a private local one")
    args = parser.parse_args()

    import ray

    if args.lade == "none":
        spec = None
    else:
        spec = json.loads(args.lade) if args.lade.lstrip().startswith("{") else args.lade
    started_here = False
    if not ray.is_initialized():
        if args.ray_address:
            ray.init(address=args.ray_address)
        else:
            # Ray turns 127.0.0.1 into the machine's outward address; another loopback address
            # keeps a private instance's connections on the loopback interface.
            ray.init(num_cpus=max(2, args.replicas), include_dashboard=False,
                     _node_ip_address="127.0.0.2", log_to_driver=False)
        started_here = True
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True  # output lines in input order
        ctx.enable_progress_bars = False
        if args.prompt_file.endswith((".jsonl", ".json")):
            ds = ray.data.read_json(args.prompt_file)
        else:
            ds = ray.data.read_text(args.prompt_file).rename_columns({"text": "prompt"})
        ds = ds.map_batches(
            LadeGenerator,
            fn_constructor_kwargs=dict(model=args.model or offline_model(), speculative_config=spec,
                                       max_tokens=args.max_tokens, dtype=args.dtype,
                                       max_num_seqs=args.batch_size),
            batch_size=args.batch_size, concurrency=args.replicas, num_cpus=1)
        rows = ds.take_all()
    finally:
        if started_here:
            ray.shutdown()

    with open(args.output_file, "w") as out:
        for row in rows:
            out.write(json.dumps({k: row[k] for k in ("prompt", "text", "num_tokens")}) + "\n")
    tokens = sum(int(r["num_tokens"]) for r in rows)
    accepted = sum({r["batch_id"]: float(r["batch_accepted"]) for r in rows}.values())
    steps = tokens - accepted
    print(json.dumps({"prompts": len(rows), "tokens": tokens,
                      "tokens_per_step": tokens / steps if steps else 0.0}))


if __name__ == "__main__":
    main()
