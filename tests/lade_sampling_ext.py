"""Worker extension for tests/test_lade_sampling.py (``worker_extension_cls``): records lade's
warnings and the tokens each tree verification emitted, inside the engine's worker process."""
from __future__ import annotations

import functools
import logging


class SamplingProbe:
    def lade_probe_start(self) -> bool:
        """Forget which ineligibility warnings were logged, then record warnings and emitted runs."""
        import lade_vllm.eligibility as eligibility
        eligibility._warned.clear()
        probe = {"warnings": [], "runs": []}
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
                return out

            driver.verify = verify
            driver._probe_wrapped = True
        return True

    def lade_probe(self) -> dict:
        return {"warnings": list(self._lade_probe["warnings"]),
                "runs": [list(r) for r in self._lade_probe["runs"]]}
