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
| 6 | ``GMR`` ``GPUModelRunner.sample_tokens``             | wrap    | attach this step's per-request count of scheduled *window* nodes to the ``ModelRunnerOutput`` (attribute ``lade_window_nodes``; survives pickling to the engine core) |
| 7 | ``v1/core/sched/scheduler.py`` ``Scheduler.update_from_output`` | wrap | add those counts to ``scheduler_output.num_invalid_spec_tokens``, which vLLM subtracts from the *drafted* metrics only (``make_spec_decoding_stats``), never from KV bookkeeping: window tokens are not counted as drafted |
| 8 | ``v1/engine/input_processor.py`` ``InputProcessor._validate_params`` | wrap | front-end admission: reject invalid per-request lade options (``extra_args["lade"]``, lade_vllm.request_options) with a ValueError naming the field, so a bad request fails alone (offline ``LLM.generate``; HTTP 400) |
| 9 | ``v1/engine/async_llm.py`` ``AsyncLLM.generate``     | wrap    | the same check before the result generator exists, so a streamed HTTP request with bad lade options gets 400 instead of an error inside a 200 event stream |
| 10 | ``v1/sample/logits_processor/__init__.py`` ``build_logitsprocs`` (l. 191-224, as imported by ``GMR``) and ``sampling_params.py`` ``SamplingParams._validate_spec_decode`` (l. 1182-1194) | wrap | under ANY speculative config vLLM builds only ``MinTokensLogitsProcessor`` (l. 208-216) and refuses ``min_p`` / ``logit_bias`` requests; for lade only, build the builtin processors (MinTokens, LogitBias, MinP) as without speculation and admit those requests: the root row goes through vLLM's ``Sampler`` and tree rows apply them per node (lade_vllm.sampling). Other methods keep vLLM's behaviour |
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

    original_sample = GPUModelRunner.sample_tokens

    @functools.wraps(original_sample)
    def sample_tokens(self, *args, **kwargs):
        output = original_sample(self, *args, **kwargs)
        driver = getattr(self, "lade_driver", None)
        if driver is not None and driver.window_counts and output is not None \
                and hasattr(output, "req_id_to_index"):
            output.lade_window_nodes = driver.window_counts
            driver.window_counts = {}
        return output

    GPUModelRunner.__init__ = __init__
    GPUModelRunner._prepare_inputs = _prepare_inputs
    GPUModelRunner.sample_tokens = sample_tokens


def _patch_scheduler() -> None:
    from vllm.v1.core.sched.scheduler import Scheduler

    original_update = Scheduler.update_from_output

    @functools.wraps(original_update)
    def update_from_output(self, scheduler_output, model_runner_output, *args, **kwargs):
        window = getattr(model_runner_output, "lade_window_nodes", None)
        if window:
            merged = dict(scheduler_output.num_invalid_spec_tokens or {})
            for req_id, n in window.items():
                merged[req_id] = merged.get(req_id, 0) + n
            scheduler_output.num_invalid_spec_tokens = merged
        return original_update(self, scheduler_output, model_runner_output, *args, **kwargs)

    Scheduler.update_from_output = update_from_output


def engine_lade_config(vllm_config):
    """The engine's LadeConfig when lade is its speculative method, else None."""
    extra = getattr(vllm_config, "additional_config", None) or {}
    spec = getattr(vllm_config, "speculative_config", None)
    if "lade" not in extra or spec is None or getattr(spec, "method", None) != "custom_class" \
            or getattr(spec, "model", None) != PROPOSER_PATH:
        return None
    from lade_vllm.config import LadeConfig
    return LadeConfig.from_user(extra["lade"])


def _check_request(vllm_config, params) -> None:
    """Raise LadeRequestError (a ValueError and a vLLM client error) for bad lade options."""
    extra = getattr(params, "extra_args", None)
    if not extra or "lade" not in extra:
        return
    engine = engine_lade_config(vllm_config)
    if engine is not None:
        from lade_vllm.request_options import parse_request_options
        parse_request_options(extra, engine)


def _patch_admission() -> None:
    from vllm.v1.engine.async_llm import AsyncLLM
    from vllm.v1.engine.input_processor import InputProcessor

    original_validate = InputProcessor._validate_params

    @functools.wraps(original_validate)
    def _validate_params(self, params, *args, **kwargs):
        result = original_validate(self, params, *args, **kwargs)
        _check_request(self.vllm_config, params)
        return result

    InputProcessor._validate_params = _validate_params

    original_generate = AsyncLLM.generate

    # A plain function returning vLLM's async generator: the check runs when the server calls
    # generate(), not at the first iteration inside the streaming response.
    @functools.wraps(original_generate)
    def generate(self, *args, **kwargs):
        params = kwargs.get("sampling_params", args[1] if len(args) > 1 else None)
        _check_request(self.vllm_config, params)
        return original_generate(self, *args, **kwargs)

    AsyncLLM.generate = generate


def _is_lade_spec_config(spec) -> bool:
    """Whether a (built) SpeculativeConfig is lade's (#1 turned it into our custom_class)."""
    return spec is not None and getattr(spec, "method", None) == "custom_class" \
        and getattr(spec, "model", None) == PROPOSER_PATH


def _patch_logitsprocs() -> None:
    """#10: min_p and logit_bias under lade."""
    import vllm.v1.worker.gpu_model_runner as gmr
    from vllm.sampling_params import SamplingParams
    from vllm.v1.sample.logits_processor import BUILTIN_LOGITS_PROCESSORS, LogitsProcessors

    original_build = gmr.build_logitsprocs

    @functools.wraps(original_build)
    def build_logitsprocs(vllm_config, device, is_pin_memory, is_pooling_model,
                          custom_logitsprocs=(), *args, **kwargs):
        if is_pooling_model or custom_logitsprocs or engine_lade_config(vllm_config) is None:
            # vLLM's own answer (custom processors under speculation: its ValueError)
            return original_build(vllm_config, device, is_pin_memory, is_pooling_model,
                                  custom_logitsprocs, *args, **kwargs)
        # the no-speculation branch of build_logitsprocs (no custom processors here)
        return LogitsProcessors(ctor(vllm_config, device, is_pin_memory)
                                for ctor in BUILTIN_LOGITS_PROCESSORS)

    gmr.build_logitsprocs = build_logitsprocs

    original_validate = SamplingParams._validate_spec_decode

    @functools.wraps(original_validate)
    def _validate_spec_decode(self, speculative_config, *args, **kwargs):
        if _is_lade_spec_config(speculative_config):
            return None
        return original_validate(self, speculative_config, *args, **kwargs)

    SamplingParams._validate_spec_decode = _validate_spec_decode


def apply() -> None:
    """Install all overrides (idempotent; runs in every vLLM process via register())."""
    global _APPLIED
    if _APPLIED:
        return
    _patch_engine_args()
    _patch_runner()
    _patch_scheduler()
    _patch_admission()
    _patch_logitsprocs()
    from lade_vllm.attention import register_cpu_tree_backend
    register_cpu_tree_backend()
    _APPLIED = True
