"""Patch records for the processes that run the model: vLLM's engine core and its workers.

What each replacement adds to vLLM 0.32's step (``GPUModelRunner`` = ``vllm.v1.worker.
gpu_model_runner.GPUModelRunner``, also the base of the CPU runner):

* ``GPUModelRunner.__init__``: when lade is the engine's speculative method, give the runner lade's
  drafter and rejection sampler, built on a ``LadeRunnerAdapter`` (lade_vllm.adapter.runner.install).
* ``GPUModelRunner._prepare_inputs``: after vLLM has built the step's inputs, the adapter writes the
  tree positions (p + depth) into ``runner.positions`` and publishes the tree layout for attention.
  That write into the runner's input buffer is a data write, not a patch: it lives in the adapter.
* ``GPUModelRunner.sample_tokens``: attach the step's per-request count of scheduled window nodes
  to the ``ModelRunnerOutput`` (attribute ``lade_window_nodes``, pickled to the engine core).
* ``Scheduler.update_from_output``: add those counts to ``SchedulerOutput.num_invalid_spec_tokens``,
  which vLLM subtracts from the drafted-token metrics only (``make_spec_decoding_stats``), never
  from KV bookkeeping: window nodes are not counted as drafted.
* ``Scheduler.update_from_output`` also keeps the tree the worker proposed for each request with
  structured output (``lade_trees`` on the ``ModelRunnerOutput``) on the request (``lade_tree``);
  ``StructuredOutputManager.validate_tokens`` keeps such a tree's drafts whole (vLLM would cut them
  as a chain) and ``StructuredOutputManager.grammar_bitmask`` fills one bitmask row per tree node
  from the grammar state after the node's path (lade_vllm.adapter.structured).
* ``build_logitsprocs`` as imported by ``gpu_model_runner``: under any speculative config vLLM builds
  only ``MinTokensLogitsProcessor``; for lade, the builtin processors (MinTokens, LogitBias, MinP) as
  without speculation. The root row goes through vLLM's ``Sampler``; tree rows apply them per node.
* ``GPUModelRunner.initialize_kv_cache``: once the engine's KV cache exists (its dtype, block size
  and stride order are known) and before it serves, lade's tree attention and KV move are checked
  against a dense reference on the engine's device (lade_vllm.attention.self_check); a mismatch
  raises and the engine does not start.
* The tree backend, one per platform (:func:`tree_backend_patch`): ``AttentionBackendEnum.CPU_ATTN``
  resolves to lade's tree-masked CPU backend (``lade_vllm.attention.cpu_tree``), or, on CUDA with
  ``LADE_VLLM_CUDA=1`` only (lade_vllm.adapter.gate), ``FLASH_ATTN`` to
  ``lade_vllm.attention.cuda_tree``; both through vLLM's ``register_backend``.
"""
from __future__ import annotations

import functools
import os

from lade_vllm.adapter.patches import Patch


def wrap_runner_init(original):
    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        from lade_vllm.adapter.frontend import engine_lade_config
        cfg = engine_lade_config(self.vllm_config)
        if cfg is not None and getattr(self, "drafter", None) is not None:
            from lade_vllm.adapter.runner import install
            install(self, cfg)
    return __init__


def wrap_initialize_kv_cache(original):
    @functools.wraps(original)
    def initialize_kv_cache(self, kv_cache_config, *args, **kwargs):
        original(self, kv_cache_config, *args, **kwargs)
        profiling = kwargs.get("is_profiling", args[0] if args else False)
        if getattr(self, "lade_driver", None) is not None and not profiling \
                and not getattr(self, "lade_self_checked", False):
            startup_self_check(self)
            self.lade_self_checked = True
            warm_up(self)
    return initialize_kv_cache


def warm_up(runner) -> None:
    """The CPU linear layers' kernels for lade's small step sizes (lade_vllm.adapter.warm)."""
    if runner.device.type != "cpu":
        return
    from lade_vllm.adapter.runner import logger
    from lade_vllm.adapter.warm import warm_linear_layers
    layers, seconds = warm_linear_layers(runner.get_model())
    logger.info("lade: warmed %d linear layers for step sizes up to %s tokens in %.1f s",
                layers, os.environ.get("LADE_WARM_TOKENS", "16"), seconds)


def startup_self_check(runner):
    """The engine-start self-check of lade's tree attention on ``runner``'s KV cache
    (lade_vllm.attention.self_check.check_runner); raises ``SelfCheckError`` on a mismatch."""
    from lade_vllm.adapter.runner import logger
    from lade_vllm.attention.self_check import check_runner
    return check_runner(runner, log=logger)


def wrap_prepare_inputs(original):
    @functools.wraps(original)
    def _prepare_inputs(self, scheduler_output, *args, **kwargs):
        result = original(self, scheduler_output, *args, **kwargs)
        adapter = getattr(self, "lade_driver", None)
        if adapter is not None:
            adapter.before_forward(scheduler_output)
        return result
    return _prepare_inputs


def wrap_sample_tokens(original):
    @functools.wraps(original)
    def sample_tokens(self, *args, **kwargs):
        output = original(self, *args, **kwargs)
        adapter = getattr(self, "lade_driver", None)
        if adapter is not None and output is not None and hasattr(output, "req_id_to_index"):
            counts = adapter.take_window_counts()
            if counts:
                output.lade_window_nodes = counts
            trees = adapter.structured_trees()
            if trees:
                output.lade_trees = trees
        return output
    return sample_tokens


def wrap_update_from_output(original):
    @functools.wraps(original)
    def update_from_output(self, scheduler_output, model_runner_output, *args, **kwargs):
        window = getattr(model_runner_output, "lade_window_nodes", None)
        if window:
            merged = dict(scheduler_output.num_invalid_spec_tokens or {})
            for req_id, n in window.items():
                merged[req_id] = merged.get(req_id, 0) + n
            scheduler_output.num_invalid_spec_tokens = merged
        for req_id, tree in (getattr(model_runner_output, "lade_trees", None) or {}).items():
            request = self.requests.get(req_id)
            if request is not None:   # read by the structured-output records below
                request.lade_tree = tree
        return original(self, scheduler_output, model_runner_output, *args, **kwargs)
    return update_from_output


def wrap_validate_tokens(original):
    @functools.wraps(original)
    def validate_tokens(self, request, spec_tokens):
        from lade_vllm.adapter.structured import tree_of
        if tree_of(request, spec_tokens) is not None:
            return spec_tokens   # a lade tree, not a chain: its rows get per-node bitmasks
        return original(self, request, spec_tokens)
    return validate_tokens


def wrap_grammar_bitmask(original):
    @functools.wraps(original)
    def grammar_bitmask(self, requests, structured_output_request_ids,
                        scheduled_spec_decode_tokens):
        from lade_vllm.adapter.structured import tree_bitmask
        return tree_bitmask(self, original, requests, structured_output_request_ids,
                            scheduled_spec_decode_tokens)
    return grammar_bitmask


def wrap_build_logitsprocs(original):
    @functools.wraps(original)
    def build_logitsprocs(vllm_config, device, is_pin_memory, is_pooling_model,
                          custom_logitsprocs=(), *args, **kwargs):
        from lade_vllm.adapter.frontend import engine_lade_config
        if is_pooling_model or custom_logitsprocs or engine_lade_config(vllm_config) is None:
            # vLLM's own answer (custom processors under speculation: its ValueError)
            return original(vllm_config, device, is_pin_memory, is_pooling_model,
                            custom_logitsprocs, *args, **kwargs)
        from vllm.v1.sample.logits_processor import BUILTIN_LOGITS_PROCESSORS, LogitsProcessors
        # the no-speculation branch of vLLM's build_logitsprocs (no custom processors here)
        return LogitsProcessors(ctor(vllm_config, device, is_pin_memory)
                                for ctor in BUILTIN_LOGITS_PROCESSORS)
    return build_logitsprocs


def _backend_patch(member: str, path: str, why: str) -> Patch:
    """A patch record that overrides vLLM's attention backend ``member`` with class ``path``."""
    def enum_member():
        from vllm.v1.attention.backends.registry import AttentionBackendEnum
        return getattr(AttentionBackendEnum, member)

    def read():
        """The class path the member is overridden to, or None while it resolves to vLLM's."""
        m = enum_member()
        return m.get_path() if m.is_overridden() else None

    def register() -> None:
        from vllm.v1.attention.backends.registry import register_backend
        register_backend(enum_member(), path)
        # vLLM memoises backend resolution (vllm.v1.attention.selector._cached_get_attn_backend);
        # a resolution made before this registration would keep returning vLLM's class
        try:
            from vllm.v1.attention import selector
            selector._cached_get_attn_backend.cache_clear()
        except (ImportError, AttributeError):
            pass

    return Patch(f"vllm.v1.attention.backends.registry.AttentionBackendEnum.{member}", register,
                 kind="register", read=read, value=path,
                 undo=lambda: enum_member().clear_override(),
                 why=why + "; also clears vllm.v1.attention.selector._cached_get_attn_backend")


CPU_TREE_BACKEND = _backend_patch(
    "CPU_ATTN", "lade_vllm.attention.cpu_tree.LadeCPUAttentionBackend",
    "tree-masked attention over the paged cache (lade_vllm.attention.cpu_tree)")
#: applied only on CUDA with LADE_VLLM_CUDA=1: the CUDA path has not been validated on a GPU
CUDA_TREE_BACKEND = _backend_patch(
    "FLASH_ATTN", "lade_vllm.attention.cuda_tree.LadeFlashAttentionBackend",
    "tree attention: FlashAttention over the prefix with LSE, dense tree part, merged "
    "(lade_vllm.attention.cuda_tree)")

_GMR = "vllm.v1.worker.gpu_model_runner"

#: the records for vLLM's runner and scheduler, on every platform lade runs on
RUNNER_PATCHES = [
    Patch(f"{_GMR}.GPUModelRunner.__init__", wrap_runner_init,
          why="build lade's drafter and rejection sampler when lade is the speculative method"),
    Patch(f"{_GMR}.GPUModelRunner.initialize_kv_cache", wrap_initialize_kv_cache,
          why="self-check lade's tree attention and KV move on the engine's cache before serving"),
    Patch(f"{_GMR}.GPUModelRunner._prepare_inputs", wrap_prepare_inputs,
          why="tree positions (p + depth) and the step's tree layout for attention"),
    Patch(f"{_GMR}.GPUModelRunner.sample_tokens", wrap_sample_tokens,
          why="report the step's window nodes per request, and the trees proposed for "
              "structured-output requests, on the ModelRunnerOutput"),
    Patch("vllm.v1.core.sched.scheduler.Scheduler.update_from_output", wrap_update_from_output,
          why="count window nodes as invalid drafts, so the drafted-token metrics leave them out; "
              "keep the proposed tree of structured-output requests on the request"),
    Patch("vllm.v1.structured_output.StructuredOutputManager.validate_tokens",
          wrap_validate_tokens,
          why="keep a lade tree's drafts whole (vLLM cuts drafts as one grammar chain)"),
    Patch("vllm.v1.structured_output.StructuredOutputManager.grammar_bitmask",
          wrap_grammar_bitmask,
          why="one grammar bitmask row per lade tree node, from the grammar state after its path"),
    Patch(f"{_GMR}.build_logitsprocs", wrap_build_logitsprocs,
          why="build vLLM's builtin logits processors (min_p, logit_bias) under lade"),
]


def tree_backend_patch(kind: str | None) -> Patch:
    """The tree-backend record for a platform kind (lade_vllm.adapter.gate.platform_kind):
    FLASH_ATTN's for ``"cuda"``, CPU_ATTN's otherwise (not applied where lade cannot run)."""
    return CUDA_TREE_BACKEND if kind == "cuda" else CPU_TREE_BACKEND


def patches_for(kind: str | None) -> list[Patch]:
    """This module's table for a platform kind: the runner records and its tree backend."""
    return RUNNER_PATCHES + [tree_backend_patch(kind)]


#: the table on vLLM's CPU backend
PATCHES = patches_for("cpu")
