"""Per-request lade options: ``SamplingParams(extra_args={"lade": ...})``, parsed and validated.

Accepted values of ``extra_args["lade"]`` (absent or ``extra_args=None``: engine defaults):

- ``False``: no lookahead for this request (decoded normally in the same batch);
- ``True``: the engine's window_size / ngram_size / guess_set_size;
- an object with any subset of ``window_size`` (1..engine W), ``ngram_size`` (2..engine N) and
  ``guess_set_size`` (0..engine G): a smaller tree for this request;
- any of the above as JSON text (``"false"``, ``'{"window_size": 2}'``). This is the form to use
  over HTTP: the OpenAI server's ``vllm_xargs`` only carries strings, numbers and lists, and it
  turns JSON ``true``/``false`` into ``1``/``0`` (which are therefore rejected, never guessed).

Unknown keys, wrong types (a bool is not an integer) and out-of-range values raise
:class:`LadeRequestError`, whose message names the field, the value and the allowed range. The
front-end rejects such a request at admission (the ``InputProcessor._validate_params`` and
``AsyncLLM.generate`` records in lade_vllm.adapter.frontend): HTTP 400 on the server, a
ValueError from ``LLM.generate`` offline; other requests are not affected.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from lade_vllm.config import LadeConfig

try:  # vLLM's client-error class: the server answers it with 400 and AsyncLLM re-raises it as is
    from vllm.exceptions import VLLMValidationError as _ClientError
except ImportError:  # pragma: no cover - vLLM is always installed with this package
    _ClientError = Exception

#: option -> (lower bound, name of the LadeConfig field giving the upper bound)
_FIELDS = {"window_size": (1, "window_size"), "ngram_size": (2, "ngram_size"),
           "guess_set_size": (0, "guess_set_size")}


class LadeRequestError(ValueError, _ClientError):
    """A request's lade options are invalid; the message names the field, value and range."""

    def __init__(self, message: str, field: str = "lade", value: Any = None):
        Exception.__init__(self, message)
        self.field = field
        self.parameter = f"vllm_xargs.{field}" if field == "lade" else f"vllm_xargs.lade.{field}"
        self.value = value

    def __str__(self) -> str:  # the message already names field and value
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class RequestOptions:
    enabled: bool = True
    window_size: int | None = None      # None = engine value
    ngram_size: int | None = None
    guess_set_size: int | None = None

    def resolved(self, engine: LadeConfig) -> tuple[int, int, int]:
        """(W, N, G) for this request: its overrides, else the engine's values."""
        return (engine.window_size if self.window_size is None else self.window_size,
                engine.ngram_size if self.ngram_size is None else self.ngram_size,
                engine.guess_set_size if self.guess_set_size is None else self.guess_set_size)


_DEFAULT = RequestOptions()
_DISABLED = RequestOptions(enabled=False)
_FORMS = ('expected true, false, an object with any of "window_size", "ngram_size", '
          '"guess_set_size", or one of these as JSON text (over HTTP: vllm_xargs={"lade": '
          '"false"} or {"lade": "{\\"window_size\\": 2}"})')


def parse_request_options(extra_args: dict | None, engine: LadeConfig) -> RequestOptions:
    """The lade options of one request, checked against the engine's ``LadeConfig``."""
    if extra_args is None or "lade" not in extra_args:
        return _DEFAULT
    if not isinstance(extra_args, dict):  # SamplingParams types it as a dict; be strict anyway
        raise LadeRequestError(f"extra_args must be a dict, got {type(extra_args).__name__}",
                               "extra_args", extra_args)
    spec = extra_args["lade"]
    if isinstance(spec, str):
        text = spec.strip()
        try:
            spec = json.loads(text)
        except json.JSONDecodeError:
            raise LadeRequestError(f"lade request option 'lade' is not valid JSON text: "
                                   f"{text[:80]!r}; {_FORMS}", "lade", text[:80]) from None
        if isinstance(spec, str):  # no double encoding
            raise LadeRequestError(f"lade request option 'lade' must not be a JSON string "
                                   f"({spec[:80]!r}); {_FORMS}", "lade", spec[:80])
    if spec is True:
        return _DEFAULT
    if spec is False:
        return _DISABLED
    if not isinstance(spec, dict):
        hint = ""
        if isinstance(spec, int) and spec in (0, 1):
            hint = (" (the OpenAI server's vllm_xargs turns JSON true/false into 1/0; send the "
                    "string \"true\"/\"false\" instead)")
        raise LadeRequestError(f"lade request option 'lade' got {type(spec).__name__} "
                               f"{spec!r}{hint}; {_FORMS}", "lade", spec)
    unknown = sorted(str(k) for k in spec if k not in _FIELDS)
    if unknown:
        raise LadeRequestError(f"unknown lade request option(s) {unknown}; allowed: "
                               f"{sorted(_FIELDS)}", unknown[0])
    values: dict[str, int] = {}
    for name, (lo, engine_field) in _FIELDS.items():
        if name not in spec:
            continue
        value = spec[name]
        hi = getattr(engine, engine_field)
        if isinstance(value, bool) or not isinstance(value, int):
            raise LadeRequestError(f"lade request option {name!r} must be an integer in "
                                   f"[{lo}, {hi}], got {type(value).__name__} {value!r}",
                                   name, value)
        if not lo <= value <= hi:
            raise LadeRequestError(f"lade request option {name!r} must be in [{lo}, {hi}] "
                                   f"(this engine's {engine_field} is {hi}), got {value}",
                                   name, value)
        values[name] = value
    return RequestOptions(enabled=True, **values)
