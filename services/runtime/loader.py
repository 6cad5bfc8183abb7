"""Loading model versions for the router and computing its new tables (``registry.py`` swaps them).

:class:`Loader` turns a :class:`models.reload.Desired` state into the router's
:class:`~services.runtime.registry.ModelRoutes`: it loads each planned version once (inline: the
model in this worker; ``service``: its metadata, then the framework service loads it via
``prepare``), remembers failures until the model's store folder changes (the shared reload
mechanics, ``reload.py``, which the framework services use too), and lets go of what no table
uses. :meth:`Loader.reconcile` returns a :class:`~services.runtime.registry.Reload` (what to
swap); it never touches the registry.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from models.aliases import AliasStore
from models.config import ConfigError, Framework, ModelConfig, ModelEntry, Placement, Settings
from models.formats import inline_only
from models.reload import Desired
from services.ops import metrics
from services.runtime.batcher import MicroBatcher
from services.runtime.predictors import load_info, load_runtime
from services.runtime.registry import (
    LoadFailure,
    ModelRoutes,
    Registry,
    Reload,
    RemotePredict,
    RemotePrepare,
    ServedModel,
)
from services.runtime.reload import DesiredWatch, FailedLoads

logger = logging.getLogger("servery")


class Loader:
    """Loads versions for the router and computes its tables from a :class:`Desired` state."""

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
        self.aliases = aliases or AliasStore()
        self.watch = DesiredWatch(models_file or settings.models_file, self.aliases)
        self.loaded: dict[tuple[str, str], ServedModel] = {}
        self.failed: FailedLoads[LoadFailure] = FailedLoads(self.aliases)
        self._reported: dict[str, str] = {}  # planning errors logged: once per distinct error

    @property
    def config(self) -> ModelConfig | None:
        return self.watch.config

    def changed(self) -> bool:
        return self.watch.changed()

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
            why = inline_only(entry.name, info.framework, info.signature)
            if why is not None:
                raise ConfigError(why)
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

    def _failures(self, name: str, versions: Iterable[str]) -> tuple[LoadFailure, ...]:
        found = (self.failed.get((name, v)) for v in versions)
        return tuple(f for f in found if f is not None)

    def build(
        self, state: Desired, loaded: dict[tuple[str, str], ServedModel]
    ) -> tuple[dict[str, ModelRoutes], dict[str, str]]:
        """Tables for every planned model whose default version is loaded (no old tables)."""
        models: dict[str, ModelRoutes] = {}
        errors = dict(state.errors)
        for name, plan in state.plans.items():
            versions = {v: loaded[(name, v)] for v in plan.versions if (name, v) in loaded}
            if plan.default not in versions:
                failure = self.failed.get((name, plan.default))
                why = f": {failure.error}" if failure is not None else ""
                errors[name] = f"default version {plan.default} did not load{why}"
                continue
            models[name] = ModelRoutes(plan, versions, failures=self._failures(name, plan.versions))
        return models, errors

    def initial(self, config: ModelConfig | None = None) -> Registry:
        """Load everything synchronously (at worker start). A model that cannot be served (an
        invalid entry, not in the store, or its default version fails to load) is left out with
        the reason (``GET /models``): the others are served, instead of a worker that exits and
        is restarted in a loop. Never raises: a models file that cannot be used at all serves
        nothing (``/readyz`` 503, the error in ``last_reload``) until it is fixed."""
        state = self.watch.first(config)
        self._reported = dict(state.errors)
        for name, error in state.errors.items():
            logger.error(
                "model '%s' cannot be served: %s (the other models are served; `python -m "
                "models.check` lists every problem, `make models` trains the demo models)",
                name,
                error,
            )
        entries = {e.name: e for e in state.config.models}
        for name, plan in state.plans.items():
            for version in plan.versions:
                try:
                    self.loaded[(name, version)] = self._load_sync(
                        entries[name], state.config, version
                    )
                except Exception as e:
                    self._record_failure(entries[name], version, e)
            logger.info(
                "serving '%s': versions %s, default %s (%s)",
                name,
                list(plan.versions),
                plan.default,
                plan.default_how,
            )
        models, errors = self.build(state, self.loaded)
        registry = Registry(models, loader=self, errors=errors)
        if state.config_error is not None:
            registry.last_reload = {"ok": False, "error": state.config_error, "at": "start"}
        return registry

    def _record_failure(self, entry: ModelEntry, version: str, e: BaseException) -> LoadFailure:
        failure = LoadFailure(version, f"{type(e).__name__}: {e}")
        self.failed.record((entry.name, version), entry.store_name, failure)
        metrics.LOAD_FAILURES.labels(entry.name, version).inc()
        logger.error("model '%s' version %s failed to load: %s", entry.name, version, failure.error)
        return failure

    async def reconcile(self, current: Mapping[str, ModelRoutes], *, force: bool) -> Reload:
        """Re-read the desired state and load what it newly needs: the tables to serve next
        (``current`` kept for a model whose new default did not load or that could not be
        planned) and the report. The caller swaps them in."""
        started = time.perf_counter()
        try:
            state, seen = await self.watch.read()
        except ConfigError as e:
            return Reload(dict(current), None, {"ok": False, "error": str(e)}, ok=False)
        config = state.config
        entries = {e.name: e for e in config.models}
        for name, error in state.errors.items():
            if self._reported.get(name) != error:
                logger.error("model '%s' cannot be planned: %s", name, error)
        self._reported = dict(state.errors)
        if force:
            self.failed.clear()
        loaded_now: list[str] = []
        failed_now: list[str] = []
        for name, plan in state.plans.items():
            entry = entries[name]
            key = self._load_key(entry, config)
            for version in plan.versions:
                have = self.loaded.get((name, version))
                if have is not None and have.load_key == key:
                    continue
                if self.failed.blocked((name, version), entry.store_name) is not None:
                    continue
                try:
                    self.loaded[(name, version)] = await self._load(entry, config, version)
                    self.failed.forget((name, version))
                    loaded_now.append(f"{name}:{version}")
                except Exception as e:  # any load failure keeps the old version
                    self._record_failure(entry, version, e)
                    failed_now.append(f"{name}:{version}")

        models, errors = self.build(state, self.loaded)
        for name in list(errors):
            if name in current and name in state.plans:
                # the default of the new plan did not load: keep serving the old table
                plan = state.plans[name]
                models[name] = current[name].with_failures(
                    self._failures(name, plan.versions),
                    f"still serving the previous table: {errors.pop(name)}",
                )
            elif name in current:
                # planning failed (e.g. unreadable alias file): keep the old table as well
                models[name] = current[name].with_failures((), f"not reloaded: {errors.pop(name)}")
        self.watch.settle(seen)

        in_use = {id(s) for r in models.values() for s in r.versions.values()}
        unloaded = [f"{n}:{v}" for (n, v), s in self.loaded.items() if id(s) not in in_use]
        self.loaded = {k: s for k, s in self.loaded.items() if id(s) in in_use}
        ok = not failed_now and not errors
        report = {
            "ok": ok,
            "loaded": loaded_now,
            "unloaded": unloaded,
            "failed": failed_now,
            "errors": errors,
            "seconds": round(time.perf_counter() - started, 3),
        }
        if loaded_now or unloaded or failed_now:
            logger.info("models reloaded: %s", report)
        return Reload(models, errors, report, ok=ok, unloaded=bool(unloaded))


def build_registry(
    config: ModelConfig, settings: Settings, remote: Mapping[Framework, RemotePredict]
) -> Registry:
    """A registry serving ``config`` as planned from the current store; raises if it cannot."""
    return Loader(settings, remote).initial(config)
