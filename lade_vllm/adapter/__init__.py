"""Everything lade-vllm does to vLLM, in one package.

- ``gate``: version and platform checks made by ``lade_vllm.register()``.
- ``patches``: the patch registry and ``apply_all()``, the one place records are applied.
- ``frontend``: records for configuring lade and admitting requests (front-end process).
- ``runtime``: records for the engine core and the model runner (worker processes).
"""
