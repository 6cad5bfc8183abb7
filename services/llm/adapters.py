"""LoRA adapters from the model store, loaded into their base LLM's running vLLM engine.

An LLM entry with ``adapters:`` (``models/llm_config.py``) starts its engine with vLLM's LoRA
support on; :class:`Adapters` then keeps the engine's adapters equal to what the store says,
through vLLM's dynamic LoRA loading (``OpenAIServingModels.load_lora_adapter`` /
``unload_lora_adapter``, the code behind ``/v1/load_lora_adapter``), never restarting the engine:

* each served name (``NAME``: the ``production`` alias, else the latest version) is loaded at
  start and re-checked every ``SERVERY_RELOAD_INTERVAL_S``; when its alias moves (promote,
  rollback) or a new version is added it is reloaded in place from the new version's folder, so
  requests after the reload use the new weights and requests in flight finish on the old ones;
* ``adapters: all`` adds adapters stored later for this base, and drops removed ones;
* ``NAME@ALIAS`` / ``NAME@VERSION`` is loaded the first time a request names it, and follows its
  alias like ``NAME``.

An adapter that is not of this base, has a rank over ``max_lora_rank`` or is one more than
``max_adapters`` is not loaded (logged; a request naming it is answered 404 by vLLM).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable
from typing import Any

from prometheus_client import Counter

from models.llm_features import DEFAULT_MAX_LORA_RANK
from models.llm_lora import Adapter, adapters_of, resolve_adapter, split_ref

logger = logging.getLogger("servery")

ADAPTER_REQUESTS = Counter(
    "servery_llm_adapter_requests",
    "OpenAI API requests answered with a LoRA adapter, by adapter name as sent, its version and "
    "its base LLM (served name)",
    ["adapter", "version", "base"],
)
ADAPTER_LOADS = Counter(
    "servery_llm_adapter_loads",
    "LoRA adapter versions loaded into a running engine (start, hot reload, on demand), by "
    "adapter and outcome",
    ["adapter", "outcome"],
)


class Adapters:
    """The adapters one engine serves: served name -> the loaded :class:`Adapter` version."""

    def __init__(self, entry: Any, knobs: Any, serving_models: Any) -> None:
        self.entry = entry
        self.base = entry.tag.split(":", 1)[0]
        self.rank_limit = knobs.max_lora_rank or DEFAULT_MAX_LORA_RANK
        self.models = serving_models
        """vLLM's ``OpenAIServingModels`` of the engine."""
        self.loaded: dict[str, Adapter] = {}
        self.refused: dict[str, str] = {}
        """Served name -> why it is not loaded (logged once per distinct reason)."""
        self._lock = asyncio.Lock()

    def wanted(self) -> list[str]:
        """Served names to keep loaded: the configured ones (or every stored adapter of this
        base) and those requests asked for by ``NAME@REF``."""
        listed = adapters_of(self.base) if self.entry.adapters == "all" else self.entry.adapters
        extra = [n for n in self.loaded if split_ref(n)[1] is not None]
        return list(dict.fromkeys([*listed, *extra]))

    def serves(self, served: str) -> bool:
        """Whether ``served`` (``NAME`` or ``NAME@REF``) is one of this engine's adapters."""
        name = split_ref(served)[0]
        return served in self.loaded or name in self.loaded or name in (self.entry.adapters or ())

    async def sync(self, names: Iterable[str] | None = None) -> None:
        """Load what the store says each served name is now; unload what is gone."""
        async with self._lock:
            if names is None:
                names = await asyncio.to_thread(self.wanted)
                gone = set(self.loaded) - set(names)
            else:
                gone = set()
            for served in names:
                await self._sync_one(served)
            for served in gone:
                await self._unload(served, "removed from the store")

    def _refuse(self, served: str, why: str) -> None:
        if self.refused.get(served) != why:
            logger.error("LLM %s: adapter %s not served: %s", self.entry.name, served, why)
            self.refused[served] = why

    async def _sync_one(self, served: str) -> None:
        from models.store import StoreError

        try:
            adapter = await asyncio.to_thread(resolve_adapter, served)
        except StoreError as e:
            if served in self.loaded:
                await self._unload(served, str(e))
            else:
                self._refuse(served, str(e))
            return
        current = self.loaded.get(served)
        if current is not None and current.path == adapter.path:
            return
        if adapter.base != self.base:
            return self._refuse(served, f"{adapter.tag} adapts {adapter.base!r}, not {self.base!r}")
        if adapter.rank > self.rank_limit:
            return self._refuse(
                served, f"{adapter.tag} has rank {adapter.rank} > max_lora_rank {self.rank_limit}"
            )
        if current is None and len(self.loaded) >= self.entry.max_adapters:
            return self._refuse(served, f"max_adapters ({self.entry.max_adapters}) reached")
        await self._load(served, adapter, inplace=current is not None)

    async def _load(self, served: str, adapter: Adapter, *, inplace: bool) -> None:
        from vllm.entrypoints.serve.lora.protocol import LoadLoRAAdapterRequest

        request = LoadLoRAAdapterRequest(
            lora_name=served, lora_path=str(adapter.path), load_inplace=inplace
        )
        result = await self.models.load_lora_adapter(request, base_model_name=self.entry.name)
        if not isinstance(result, str):  # vLLM's ErrorResponse
            ADAPTER_LOADS.labels(served, "failed").inc()
            return self._refuse(served, f"{adapter.tag}: {result.error.message}")
        ADAPTER_LOADS.labels(served, "loaded").inc()
        self.refused.pop(served, None)
        self.loaded[served] = adapter
        logger.info("LLM %s: adapter %s serves %s", self.entry.name, served, adapter.tag)

    async def _unload(self, served: str, why: str) -> None:
        from vllm.entrypoints.serve.lora.protocol import UnloadLoRAAdapterRequest

        with contextlib.suppress(Exception):
            await self.models.unload_lora_adapter(UnloadLoRAAdapterRequest(lora_name=served))
        self.loaded.pop(served, None)
        logger.info("LLM %s: adapter %s unloaded (%s)", self.entry.name, served, why)

    async def ensure(self, served: str) -> bool:
        """Load ``NAME@REF`` the first time a request names it; whether it is loaded."""
        if served not in self.loaded:
            await self.sync([served])
        return served in self.loaded

    def card(self, card: dict[str, Any]) -> dict[str, Any]:
        """vLLM's model card of a loaded adapter with the store tag as ``root`` (not a path)."""
        adapter = self.loaded.get(card["id"])
        if adapter is None:
            return card
        return {**card, "root": adapter.tag, "parent": self.entry.name, "owned_by": "servery"}

    def count(self, served: str) -> None:
        adapter = self.loaded.get(served)
        if adapter is not None:
            ADAPTER_REQUESTS.labels(served, adapter.version, self.entry.name).inc()
