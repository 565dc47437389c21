"""Worker extension for tests/test_lade_sampling.py (``worker_extension_cls``): records lade's
warnings and the tokens each tree verification emitted (with which sampling settings its request
had), inside the engine's worker process."""
from __future__ import annotations

import functools
import logging


class SamplingProbe:
    def lade_probe_start(self) -> bool:
        """Forget which ineligibility warnings were logged, then record warnings and emitted runs."""
        import lade_vllm.eligibility as eligibility
        eligibility._warned.clear()
        probe = {"warnings": [], "runs": [], "tagged": []}
        self._lade_probe = probe

        class Recorder(logging.Handler):
            def emit(self, record):
                probe["warnings"].append(record.getMessage())

        logger = logging.getLogger("vllm.lade_vllm")
        for h in [h for h in logger.handlers if type(h).__name__ == "Recorder"]:
            logger.removeHandler(h)
        logger.addHandler(Recorder(logging.WARNING))
        driver = self.model_runner.lade_driver
        if not getattr(driver, "_probe_wrapped", False):
            original = driver.verify

            @functools.wraps(original)
            def verify(*args, **kwargs):
                out = original(*args, **kwargs)
                if out is not None:
                    self._lade_probe["runs"].extend(out.tokens)
                    batch, reqs = self.model_runner.input_batch, self.model_runner.requests
                    for i, run in zip(out.batch_idx, out.tokens):
                        req = reqs.get(batch.req_ids[i])
                        sp = getattr(req, "sampling_params", None)
                        self._lade_probe["tagged"].append(
                            (bool(getattr(sp, "logit_bias", None)),
                             float(getattr(sp, "min_p", 0.0) or 0.0), list(run), _features(sp)))
                return out

            driver.verify = verify
            driver._probe_wrapped = True
        return True

    def lade_probe(self) -> dict:
        """warnings; runs: tokens emitted by each tree verification; tagged: the same runs as
        (request has logit_bias, request's min_p, run, the request's token rules)."""
        return {"warnings": list(self._lade_probe["warnings"]),
                "runs": [list(r) for r in self._lade_probe["runs"]],
                "tagged": list(self._lade_probe["tagged"])}


def _features(sp) -> list[str]:
    """The token rules of a request's SamplingParams that lade applies per tree node."""
    out = []
    if sp is not None and (sp.presence_penalty or sp.frequency_penalty
                           or sp.repetition_penalty != 1.0):
        out.append("penalties")
    if getattr(sp, "bad_words", None):
        out.append("bad_words")
    if getattr(sp, "allowed_token_ids", None):
        out.append("allowed_token_ids")
    if getattr(sp, "min_tokens", 0):
        out.append("min_tokens")
    if getattr(sp, "structured_outputs", None) is not None:
        out.append("structured output")
    return out


from tools.testing import ForwardCounter  # noqa: E402


class LadeTestProbe(SamplingProbe, ForwardCounter):
    """Both probes, for the session's shared lade engine (conftest ``lade_trees_llm``)."""
