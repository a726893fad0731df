"""Serving many LoRA-XS adapters of one base at once.

* ``bank``:   ``AdapterBank`` (N slots of R + heads on device, shared A and B, load/unload with
  no recompilation, LRU over a source), ``AdapterDirectory``, ``AdapterStore`` (memory-mapped
  host tier), ``per_row_adapters``.
* ``rows``:   per-row adapters in our encoder and decoder forward passes and in KV-cache
  generation (``intercept.replay(..., rows=adapter_ids)``).
* ``server``: an HTTP service (Starlette + Uvicorn) with dynamic batching across adapters,
  OpenAI-style completions, classification and adapter management (``loraxs-serve``).
* ``score``:  offline scoring of a JSONL of {adapter, input} (``loraxs-score``).

A layer beside ``experiments`` and ``interop``: it uses the core, ``models`` and ``parallel``;
nothing imports it.
"""

from loraxs_jax.serving.bank import (
    BASE,
    AdapterBank,
    AdapterDirectory,
    AdapterStore,
    BankError,
    BankFull,
    per_row_adapters,
)

__all__ = ["BASE", "AdapterBank", "AdapterDirectory", "AdapterStore", "BankError", "BankFull",
           "per_row_adapters"]
