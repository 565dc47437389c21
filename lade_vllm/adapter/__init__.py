"""Everything lade-vllm does to vLLM, in one package (the engine, lade_vllm.engine, imports no vLLM).

- ``gate``: version and platform checks made by ``lade_vllm.register()``.
- ``patches``: the patch registry and ``apply_all()``, the one place records are applied.
- ``frontend``: records for configuring lade and admitting requests (front-end process).
- ``runtime``: records for the engine core and the model runner (worker processes).
- ``runner``: the runner view (``LadeRunnerAdapter``) and the drafter / rejection sampler built
  on it; one decoding step reads top to bottom there and in lade_vllm.engine.
- ``sampling``: per-node targets from vLLM's logits with vLLM's sampling functions, the seeded
  requests' noise streams, and the rows written back into vLLM's sampler output.
- ``kv_move``: relocation of the accepted path's K/V inside vLLM's paged cache.
"""
