"""Per-request lade options (``SamplingParams(extra_args={"lade": ...})``): the parser, and their
rejection at request admission in the front-end (lade_vllm.overrides #8) so that a bad request
fails alone while the engine keeps serving the others."""
import pytest

from helpers import close_llm, make_llm
from lade_vllm.config import LadeConfig
from lade_vllm.request_options import LadeRequestError, RequestOptions, parse_request_options

ENGINE = LadeConfig(window_size=5, ngram_size=4, guess_set_size=3)


@pytest.mark.parametrize("extra_args, want", [
    (None, RequestOptions()),
    ({}, RequestOptions()),
    ({"other_plugin": 1}, RequestOptions()),
    ({"lade": True}, RequestOptions()),
    ({"lade": False}, RequestOptions(enabled=False)),
    ({"lade": {}}, RequestOptions()),
    ({"lade": {"window_size": 1}}, RequestOptions(window_size=1)),
    ({"lade": {"window_size": 5}}, RequestOptions(window_size=5)),
    ({"lade": {"ngram_size": 2}}, RequestOptions(ngram_size=2)),
    ({"lade": {"ngram_size": 4}}, RequestOptions(ngram_size=4)),
    ({"lade": {"guess_set_size": 0}}, RequestOptions(guess_set_size=0)),
    ({"lade": {"guess_set_size": 3}}, RequestOptions(guess_set_size=3)),
    ({"lade": {"window_size": 2, "ngram_size": 3, "guess_set_size": 1}},
     RequestOptions(window_size=2, ngram_size=3, guess_set_size=1)),
    # JSON text: the form that survives the OpenAI server's vllm_xargs
    ({"lade": "true"}, RequestOptions()),
    ({"lade": " false "}, RequestOptions(enabled=False)),
    ({"lade": '{"window_size": 2, "guess_set_size": 0}'},
     RequestOptions(window_size=2, guess_set_size=0)),
])
def test_valid_options(extra_args, want):
    got = parse_request_options(extra_args, ENGINE)
    assert got == want
    w, n, g = got.resolved(ENGINE)
    assert (w, n, g) == (want.window_size or 5, want.ngram_size or 4,
                         3 if want.guess_set_size is None else want.guess_set_size)


@pytest.mark.parametrize("extra_args, field, words", [
    # out of range, each bound, against this engine's W5/N4/G3
    ({"lade": {"window_size": 0}}, "window_size", ["[1, 5]", "got 0"]),
    ({"lade": {"window_size": 6}}, "window_size", ["[1, 5]", "got 6"]),
    ({"lade": {"window_size": -3}}, "window_size", ["[1, 5]", "got -3"]),
    ({"lade": {"ngram_size": 1}}, "ngram_size", ["[2, 4]", "got 1"]),
    ({"lade": {"ngram_size": 5}}, "ngram_size", ["[2, 4]", "got 5"]),
    ({"lade": {"guess_set_size": -1}}, "guess_set_size", ["[0, 3]", "got -1"]),
    ({"lade": {"guess_set_size": 4}}, "guess_set_size", ["[0, 3]", "got 4"]),
    ({"lade": '{"guess_set_size": 99}'}, "guess_set_size", ["[0, 3]", "got 99"]),
    # wrong types: a bool is not an integer, nor are floats, strings, None, lists
    ({"lade": {"window_size": True}}, "window_size", ["integer", "bool True"]),
    ({"lade": {"ngram_size": 3.0}}, "ngram_size", ["integer", "float 3.0"]),
    ({"lade": {"guess_set_size": "2"}}, "guess_set_size", ["integer", "str '2'"]),
    ({"lade": {"window_size": None}}, "window_size", ["integer", "NoneType None"]),
    ({"lade": {"window_size": [2]}}, "window_size", ["integer", "list [2]"]),
    # unknown keys
    ({"lade": {"window": 2}}, "window", ["unknown", "'window'", "window_size"]),
    ({"lade": {"window_size": 2, "seed": 1}}, "seed", ["unknown", "'seed'"]),
    ({"lade": {"method": "lade"}}, "method", ["unknown", "'method'"]),
    # the value of "lade" itself
    ({"lade": 0}, "lade", ["int 0", "\"false\""]),
    ({"lade": 1}, "lade", ["int 1", "\"true\""]),
    ({"lade": 2.5}, "lade", ["float 2.5"]),
    ({"lade": None}, "lade", ["NoneType None"]),
    ({"lade": [1, 2]}, "lade", ["list [1, 2]"]),
    ({"lade": "yes"}, "lade", ["not valid JSON", "'yes'"]),
    ({"lade": "{\"window_size\": 2"}, "lade", ["not valid JSON"]),
    ({"lade": '"false"'}, "lade", ["JSON string"]),
    ({"lade": "3"}, "lade", ["int 3"]),
])
def test_invalid_options(extra_args, field, words):
    with pytest.raises(LadeRequestError) as info:
        parse_request_options(extra_args, ENGINE)
    err = info.value
    assert isinstance(err, ValueError)
    assert err.field == field
    message = str(err)
    assert field in message
    for w in words:
        assert w in message, (w, message)


def test_limits_follow_the_engine():
    small = LadeConfig(window_size=2, ngram_size=3, guess_set_size=0)
    assert parse_request_options({"lade": {"window_size": 2, "ngram_size": 3}}, small) == \
        RequestOptions(window_size=2, ngram_size=3)
    for key, bad in (("window_size", 3), ("ngram_size", 4), ("guess_set_size", 1)):
        with pytest.raises(LadeRequestError, match=key):
            parse_request_options({"lade": {key: bad}}, small)
    # the same values are fine for the default engine (W7/N5/G7)
    assert parse_request_options({"lade": {"window_size": 3, "ngram_size": 4,
                                           "guess_set_size": 1}}, LadeConfig()).enabled


def test_error_is_a_vllm_client_error():
    """The server answers vLLM client errors with 400 and AsyncLLM re-raises them untouched."""
    from vllm.exceptions import VLLMClientError, VLLMValidationError
    with pytest.raises(VLLMValidationError) as info:
        parse_request_options({"lade": {"ngram_size": 9}}, ENGINE)
    assert isinstance(info.value, VLLMClientError)
    assert info.value.parameter == "vllm_xargs.lade.ngram_size"
    assert info.value.value == 9


# ---- offline engine: a bad request fails at admission, alone ----

MAX_TOKENS = 24


@pytest.fixture(scope="module")
def lade_llm(model_dir):
    llm = make_llm(model_dir, speculative_config={"method": "lade", "window_size": 4,
                                                  "ngram_size": 4, "guess_set_size": 3},
                   max_num_seqs=4, max_model_len=1024)
    yield llm
    close_llm(llm)


def test_offline_bad_options_fail_alone(lade_llm, vanilla_llm, tokenizer):
    from vllm import SamplingParams

    from tools import prompts
    ps = prompts.load("mtbench", 3, tokenizer)

    def sp(lade=None):
        return SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS,
                              extra_args=None if lade is None else {"lade": lade})

    want = [list(o.outputs[0].token_ids)
            for o in vanilla_llm.generate(ps, sp(), use_tqdm=False)]
    # the vanilla engine ignores lade options: lade is not its speculative method
    assert list(vanilla_llm.generate(ps[:1], sp({"window_size": 99}), use_tqdm=False)[0]
                .outputs[0].token_ids) == want[0]

    for bad, field in (({"window_size": 5}, "window_size"), ({"ngram_size": 1}, "ngram_size"),
                       ({"guess_set_size": True}, "guess_set_size"), ({"tree": 3}, "tree"),
                       (7, "lade")):
        with pytest.raises(ValueError, match=field):
            lade_llm.generate(ps[:1], sp(bad), use_tqdm=False)
    # a batch holding one bad request fails as a whole before anything runs (vLLM aborts the
    # requests it had already added) ...
    with pytest.raises(ValueError, match="window_size"):
        lade_llm.generate(ps, [sp(), sp({"window_size": 0}), sp()], use_tqdm=False)
    # ... through add_request too, and the engine holds nothing afterwards
    with pytest.raises(ValueError, match="guess_set_size"):
        lade_llm.llm_engine.add_request("bad", ps[0], sp({"guess_set_size": 4}))
    assert not lade_llm.llm_engine.has_unfinished_requests()

    # and the engine keeps serving: good, disabled and overridden requests give vanilla's tokens
    got = lade_llm.generate(ps, [sp(), sp(False), sp({"window_size": 2, "ngram_size": 3,
                                                        "guess_set_size": 0})], use_tqdm=False)
    assert [list(o.outputs[0].token_ids) for o in got] == want
    got = lade_llm.generate(ps[:1], sp('{"window_size": 4}'), use_tqdm=False)
    assert list(got[0].outputs[0].token_ids) == want[0]
