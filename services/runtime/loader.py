"""Loading model versions for the router and rebuilding its tables (see
``services/runtime/registry.py``).

:class:`Loader` turns a :class:`models.reload.Desired` state into the router's
:class:`~services.runtime.registry.ModelRoutes`: it loads each planned version once (inline: the
model
in this worker; ``service``: its metadata, then the framework service loads it via ``prepare``),
remembers failures until the model's store folder changes, and unloads what no table uses.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from models.aliases import AliasStore
from models.config import (
    ConfigError,
    Framework,
    ModelConfig,
    ModelEntry,
    Placement,
    Settings,
    load_model_config,
)
from models.reload import Desired, desired, fingerprint, read_desired
from services.ops import metrics
from services.runtime.batcher import MicroBatcher
from services.runtime.predictors import load_info, load_runtime
from services.runtime.registry import (
    LoadFailure,
    ModelRoutes,
    Registry,
    RemotePredict,
    RemotePrepare,
    ServedModel,
)

logger = logging.getLogger("servery")


class Loader:
    """Loads versions for the router and rebuilds its tables from a :class:`Desired` state."""

    def __init__(
        self,
        settings: Settings,
        remote: Mapping[Framework, RemotePredict],
        prepare: Mapping[Framework, RemotePrepare] | None = None,
        *,
        models_file: Path | str | None = None,
        aliases: AliasStore | None = None,
    ) -> None:
        self.settings = settings
        self.remote = remote
        self.prepare = prepare or {}
        self.models_file = Path(models_file or settings.models_file)
        self.aliases = aliases or AliasStore()
        self.loaded: dict[tuple[str, str], ServedModel] = {}
        # (name, version) -> (failure, the model's store fingerprint when it failed): not retried
        # until that model's store entry changes or a forced reload.
        self.failed: dict[tuple[str, str], tuple[LoadFailure, object]] = {}
        self.config: ModelConfig | None = None
        self._fingerprint: tuple[object, ...] | None = None

    # --- change detection ---

    def changed(self) -> bool:
        return fingerprint(self.models_file, self.config, self.aliases) != self._fingerprint

    # --- loading one version ---

    def _load_key(self, entry: ModelEntry, config: ModelConfig) -> tuple[Any, ...]:
        return (
            entry.store_name,
            entry.framework,
            config.placement_of(entry),
            config.batch_size_of(entry, self.settings),
        )

    def _load_sync(self, entry: ModelEntry, config: ModelConfig, version: str) -> ServedModel:
        """Load one version (inline: the model; service: its metadata). Blocking."""
        placement = config.placement_of(entry)
        if placement is Placement.INLINE:
            runtime = load_runtime(entry, self.settings.model_threads, version)
            info, predict, is_async = runtime.info, runtime.predict, False
        else:
            info, _ = load_info(entry, version)
            call = self.remote[info.framework]

            # servery_model_ready follows the service's health (a failed call marks it down,
            # an answered one up): Registry._publish_ready, through ServiceHealth.on_change.
            predict = functools.partial(call, info.name, info.version)

            is_async = True
        batcher = MicroBatcher(
            predict,
            max_batch_size=config.batch_size_of(entry, self.settings),
            is_async=is_async,
            hold_s=self.settings.batch_hold_ms / 1000.0,
            max_queue=config.queue_of(entry, self.settings),
            metrics=metrics.BatchMetrics(info.name, info.version, placement.value),
        )
        return ServedModel(info, placement, batcher, self._load_key(entry, config))

    async def _load(self, entry: ModelEntry, config: ModelConfig, version: str) -> ServedModel:
        served = await asyncio.to_thread(self._load_sync, entry, config, version)
        if served.placement is Placement.SERVICE:
            prepare = self.prepare.get(served.info.framework)
            if prepare is not None:
                await prepare(entry.name, version)
        return served

    # --- building tables ---

    def build(
        self, state: Desired, loaded: dict[tuple[str, str], ServedModel]
    ) -> tuple[dict[str, ModelRoutes], dict[str, str]]:
        """Tables for every planned model whose default version is loaded (no old tables)."""
        models: dict[str, ModelRoutes] = {}
        errors = dict(state.errors)
        for name, plan in state.plans.items():
            versions = {v: loaded[(name, v)] for v in plan.versions if (name, v) in loaded}
            if plan.default not in versions:
                errors[name] = f"default version {plan.default} did not load"
                continue
            failures = tuple(
                self.failed[(name, v)][0] for v in plan.versions if (name, v) in self.failed
            )
            models[name] = ModelRoutes(plan, versions, failures=failures)
        return models, errors

    def initial(self, config: ModelConfig | None = None) -> Registry:
        """Load everything synchronously (at worker start); raises if a model cannot be served."""
        config = config or load_model_config(self.models_file)
        self._fingerprint = fingerprint(self.models_file, config, self.aliases)
        state = desired(config, self.aliases)
        if state.errors:
            raise ConfigError("; ".join(f"{n}: {e}" for n, e in state.errors.items()))
        entries = {e.name: e for e in config.models}
        for name, plan in state.plans.items():
            for version in plan.versions:
                try:
                    self.loaded[(name, version)] = self._load_sync(entries[name], config, version)
                except Exception as e:
                    if version == plan.default:
                        raise
                    self._record_failure(name, version, e)
            logger.info(
                "serving '%s': versions %s, default %s (%s)",
                name,
                list(plan.versions),
                plan.default,
                plan.default_how,
            )
        models, errors = self.build(state, self.loaded)
        self.config = config
        return Registry(models, loader=self, errors=errors)

    def _record_failure(self, name: str, version: str, e: BaseException) -> LoadFailure:
        failure = LoadFailure(version, f"{type(e).__name__}: {e}")
        store_name = self.config_store_name(name)
        self.failed[(name, version)] = (failure, self.aliases.fingerprint(store_name))
        metrics.LOAD_FAILURES.labels(name, version).inc()
        logger.error("model '%s' version %s failed to load: %s", name, version, failure.error)
        return failure

    def config_store_name(self, name: str) -> str:
        if self.config is not None:
            for entry in self.config.models:
                if entry.name == name:
                    return entry.store_name
        return name

    async def reconcile(self, registry: Registry, *, force: bool) -> dict[str, Any]:
        started = time.perf_counter()
        fp = fingerprint(self.models_file, self.config, self.aliases)
        try:
            state = await asyncio.to_thread(read_desired, self.models_file, self.aliases)
        except ConfigError as e:
            logger.error("model config not reloaded, still serving the previous one: %s", e)
            self._fingerprint = fp
            metrics.RELOADS.labels("failed").inc()
            report = {"ok": False, "error": str(e)}
            registry.last_reload = report
            return report
        config = state.config
        self.config = config
        entries = {e.name: e for e in config.models}
        if force:
            self.failed.clear()
        loaded_now: list[str] = []
        failed_now: list[str] = []
        for name, plan in state.plans.items():
            entry = entries[name]
            key = self._load_key(entry, config)
            store_fp = self.aliases.fingerprint(entry.store_name)
            for version in plan.versions:
                have = self.loaded.get((name, version))
                if have is not None and have.load_key == key:
                    continue
                failed = self.failed.get((name, version))
                if failed is not None and failed[1] == store_fp:
                    continue
                try:
                    self.loaded[(name, version)] = await self._load(entry, config, version)
                    self.failed.pop((name, version), None)
                    loaded_now.append(f"{name}:{version}")
                except Exception as e:  # any load failure keeps the old version
                    self.failed.pop((name, version), None)
                    self._record_failure(name, version, e)
                    failed_now.append(f"{name}:{version}")

        models, errors = self.build(state, self.loaded)
        old = registry._models
        for name in list(errors):
            if name in old and name in state.plans:
                # the default of the new plan did not load: keep serving the old table
                plan = state.plans[name]
                failures = tuple(
                    self.failed[(name, v)][0] for v in plan.versions if (name, v) in self.failed
                )
                models[name] = old[name].with_failures(
                    failures, f"still serving the previous table: {errors.pop(name)}"
                )
            elif name in old:
                # planning failed (e.g. unreadable alias file): keep the old table as well
                models[name] = old[name].with_failures((), f"not reloaded: {errors.pop(name)}")
        registry._swap(models, errors)
        self._fingerprint = fp

        in_use = {id(s) for r in models.values() for s in r.versions.values()}
        unloaded = [f"{n}:{v}" for (n, v), s in self.loaded.items() if id(s) not in in_use]
        self.loaded = {k: s for k, s in self.loaded.items() if id(s) in in_use}
        if unloaded:
            # Unloaded versions were frozen with the heap at start-up (patches.freeze_heap); let
            # a full collection reclaim any cycles among them, then freeze the new heap again.
            gc.unfreeze()
            gc.collect()
            gc.freeze()
        ok = not failed_now and not errors
        metrics.RELOADS.labels("ok" if ok else "failed").inc()
        report = {
            "ok": ok,
            "loaded": loaded_now,
            "unloaded": unloaded,
            "failed": failed_now,
            "errors": errors,
            "seconds": round(time.perf_counter() - started, 3),
        }
        registry.last_reload = report
        if loaded_now or unloaded or failed_now:
            logger.info("models reloaded: %s", report)
        return report


def build_registry(
    config: ModelConfig, settings: Settings, remote: Mapping[Framework, RemotePredict]
) -> Registry:
    """A registry serving ``config`` as planned from the current store; raises if it cannot."""
    return Loader(settings, remote).initial(config)
