"""Development tooling for lade-vllm: the offline models, prompt sets, measurement helpers, the
demo, the Hugging Face reference loop, test instrumentation and the server launcher.

Not part of the installed package (``pip install`` ships ``lade_vllm`` only). Run from the
repository root (``python -m tools.models``), or with the root on ``PYTHONPATH``; pytest adds it
(``pythonpath`` in pyproject.toml) and the benchmarks add it themselves.
"""
