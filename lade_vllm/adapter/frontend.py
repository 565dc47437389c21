"""Patch records for vLLM's front-end: configuring lade and admitting requests.

vLLM has no registry of speculative methods and ``SpeculativeConfig`` forbids extra keys, so lade
is configured as vLLM's ``custom_class`` method: the ``lade`` spec (word, JSON or dict) becomes
``{"method": "custom_class", "model": PROPOSER_PATH, ...}`` plus ``additional_config["lade"]``.
Every function here imports vLLM only inside the replacement it builds.
"""
from __future__ import annotations

import functools

from lade_vllm.adapter.patches import Patch

#: the class vLLM instantiates as lade's drafter (``SpeculativeConfig.model`` of custom_class)
PROPOSER_PATH = "lade_vllm.adapter.runner.LadeDraftSlot"


def _translate_spec(engine_args) -> None:
    """Rewrite a lade speculative config in place on an ``EngineArgs``; raise
    ``UnsupportedPlatform`` when lade is configured where it cannot run."""
    from lade_vllm.adapter.gate import require_supported_platform
    from lade_vllm.config import LadeConfig, is_lade_spec
    spec = engine_args.speculative_config
    if spec is None or not is_lade_spec(spec):
        return
    require_supported_platform()
    cfg = LadeConfig.from_user(spec)
    extra = dict(engine_args.additional_config or {})
    extra["lade"] = cfg.to_dict()
    engine_args.additional_config = extra
    engine_args.speculative_config = {"method": "custom_class", "model": PROPOSER_PATH,
                                      "num_speculative_tokens": cfg.max_draft_nodes}


def is_lade_spec_config(spec) -> bool:
    """Whether a built ``SpeculativeConfig`` is lade's (``_translate_spec`` made it)."""
    return spec is not None and getattr(spec, "method", None) == "custom_class" \
        and getattr(spec, "model", None) == PROPOSER_PATH


def engine_lade_config(vllm_config):
    """The engine's ``LadeConfig`` when lade is its speculative method, else None."""
    extra = getattr(vllm_config, "additional_config", None) or {}
    if "lade" not in extra or not is_lade_spec_config(
            getattr(vllm_config, "speculative_config", None)):
        return None
    from lade_vllm.config import LadeConfig
    return LadeConfig.from_user(extra["lade"])


def check_request(vllm_config, params) -> None:
    """Raise ``LadeRequestError`` (a ValueError, a vLLM client error) for bad per-request lade
    options (``SamplingParams.extra_args["lade"]``, lade_vllm.request_options)."""
    extra = getattr(params, "extra_args", None)
    if not extra or "lade" not in extra:
        return
    engine = engine_lade_config(vllm_config)
    if engine is not None:
        from lade_vllm.request_options import parse_request_options
        parse_request_options(extra, engine)


def wrap_create_speculative_config(original):
    @functools.wraps(original)
    def create_speculative_config(self, *args, **kwargs):
        _translate_spec(self)
        return original(self, *args, **kwargs)
    return create_speculative_config


def wrap_add_cli_args(original):
    @functools.wraps(original)
    def add_cli_args(parser, *args, **kwargs):
        parser = original(parser, *args, **kwargs)
        for action in parser._actions:
            if "--speculative-config" in action.option_strings and action.type is not None:
                json_type = action.type

                def lade_or_json(value, _json_type=json_type):
                    return "lade" if value.strip() == "lade" else _json_type(value)

                action.type = lade_or_json
        return parser
    return add_cli_args


def wrap_validate_params(original):
    @functools.wraps(original)
    def _validate_params(self, params, *args, **kwargs):
        result = original(self, params, *args, **kwargs)
        check_request(self.vllm_config, params)
        return result
    return _validate_params


def wrap_generate(original):
    # A plain function returning vLLM's async generator: the check runs when the server calls
    # generate(), not at the first iteration inside the streaming response.
    @functools.wraps(original)
    def generate(self, *args, **kwargs):
        params = kwargs.get("sampling_params", args[1] if len(args) > 1 else None)
        check_request(self.vllm_config, params)
        return original(self, *args, **kwargs)
    return generate


def wrap_validate_spec_decode(original):
    @functools.wraps(original)
    def _validate_spec_decode(self, speculative_config, *args, **kwargs):
        if is_lade_spec_config(speculative_config):
            return None
        return original(self, speculative_config, *args, **kwargs)
    return _validate_spec_decode


PATCHES = [
    Patch("vllm.engine.arg_utils.EngineArgs.create_speculative_config",
          wrap_create_speculative_config, any_platform=True,
          why="translate the lade spec into custom_class + additional_config['lade']; refuse "
              "lade on unsupported platforms"),
    Patch("vllm.engine.arg_utils.EngineArgs.add_cli_args", wrap_add_cli_args, any_platform=True,
          why="--speculative-config parses JSON only; also accept the bare word lade"),
    Patch("vllm.v1.engine.input_processor.InputProcessor._validate_params", wrap_validate_params,
          why="reject invalid per-request lade options at admission (offline ValueError, HTTP "
              "400), so a bad request fails alone"),
    Patch("vllm.v1.engine.async_llm.AsyncLLM.generate", wrap_generate,
          why="the same admission check before the result stream exists (400, not an error "
              "inside a 200 event stream)"),
    Patch("vllm.sampling_params.SamplingParams._validate_spec_decode", wrap_validate_spec_decode,
          why="vLLM refuses min_p / logit_bias under any speculation; lade applies them per tree "
              "node (lade_vllm.adapter.sampling), so admit them for lade only"),
]
