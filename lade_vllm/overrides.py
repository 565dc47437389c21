"""Every override of vLLM internals made by lade-vllm, in one place.

Targets vLLM 0.32.x only; lade_vllm.register() checks the version before apply() runs. Paths are
relative to the ``vllm`` package; ``GMR`` = ``v1/worker/gpu_model_runner.py``.

| # | vLLM 0.32 target                                   | kind    | why |
|---|----------------------------------------------------|---------|-----|
| 1 | ``engine/arg_utils.py`` ``EngineArgs.create_speculative_config`` | wrap | translate ``lade`` (word, JSON or dict) into ``custom_class`` + ``additional_config['lade']`` (vLLM has no method registry; ``SpeculativeConfig`` forbids extra keys) |
| 2 | ``engine/arg_utils.py`` ``EngineArgs.add_cli_args``  | wrap    | ``--speculative-config`` parses JSON only; also accept the bare word ``lade`` |
| 3 | ``GMR`` ``GPUModelRunner.__init__``                  | wrap    | attach a ``LadeDriver`` to the lade drafter and swap in ``LadeRejectionSampler`` |
| 4 | ``GMR`` ``GPUModelRunner._prepare_inputs``           | wrap    | tree positions (p + depth) and the per-step tree layout for attention |
| 5 | ``v1/attention/backends/registry.py`` ``CPU_ATTN``   | register_backend | tree-masked attention over the paged cache (lade_vllm.attention.cpu_tree) |
"""
from __future__ import annotations

import functools
import logging

logger = logging.getLogger("vllm.lade_vllm")  # under vllm: its handler and level

PROPOSER_PATH = "lade_vllm.hooks.LadeProposer"
_APPLIED = False


def _translate_spec(engine_args) -> None:
    """#1: rewrite a lade speculative config in place on an EngineArgs."""
    from lade_vllm.config import LadeConfig, is_lade_spec
    spec = engine_args.speculative_config
    if spec is None or not is_lade_spec(spec):
        return
    cfg = LadeConfig.from_user(spec)
    extra = dict(engine_args.additional_config or {})
    extra["lade"] = cfg.to_dict()
    engine_args.additional_config = extra
    engine_args.speculative_config = {"method": "custom_class", "model": PROPOSER_PATH,
                                      "num_speculative_tokens": cfg.max_draft_nodes}


def _patch_engine_args() -> None:
    from vllm.engine.arg_utils import EngineArgs

    original_create = EngineArgs.create_speculative_config

    @functools.wraps(original_create)
    def create_speculative_config(self, *args, **kwargs):
        _translate_spec(self)
        return original_create(self, *args, **kwargs)

    EngineArgs.create_speculative_config = create_speculative_config

    original_add = EngineArgs.add_cli_args

    @functools.wraps(original_add)
    def add_cli_args(parser, *args, **kwargs):
        parser = original_add(parser, *args, **kwargs)
        for action in parser._actions:
            if "--speculative-config" in action.option_strings and action.type is not None:
                json_type = action.type

                def lade_or_json(value, _json_type=json_type):
                    return "lade" if value.strip() == "lade" else _json_type(value)

                action.type = lade_or_json
        return parser

    EngineArgs.add_cli_args = staticmethod(add_cli_args)


def _patch_runner() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from lade_vllm.hooks import LadeProposer, LadeRejectionSampler

    original_init = GPUModelRunner.__init__
    original_prepare = GPUModelRunner._prepare_inputs

    @functools.wraps(original_init)
    def __init__(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        drafter = getattr(self, "drafter", None)
        if isinstance(drafter, LadeProposer):
            from lade_vllm.driver import LadeDriver
            driver = LadeDriver(drafter.cfg, self)
            drafter.driver = driver
            self.rejection_sampler.__class__ = LadeRejectionSampler
            self.rejection_sampler.driver = driver
            self.lade_driver = driver
            logger.info("lade: lookahead decoding enabled (%s)", drafter.cfg)

    @functools.wraps(original_prepare)
    def _prepare_inputs(self, scheduler_output, *args, **kwargs):
        result = original_prepare(self, scheduler_output, *args, **kwargs)
        driver = getattr(self, "lade_driver", None)
        if driver is not None:
            driver.before_forward(scheduler_output)
        return result

    GPUModelRunner.__init__ = __init__
    GPUModelRunner._prepare_inputs = _prepare_inputs


def apply() -> None:
    """Install all overrides (idempotent; runs in every vLLM process via register())."""
    global _APPLIED
    if _APPLIED:
        return
    _patch_engine_args()
    _patch_runner()
    from lade_vllm.attention import register_cpu_tree_backend
    register_cpu_tree_backend()
    _APPLIED = True
