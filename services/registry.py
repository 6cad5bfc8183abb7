"""The router's table of served models: per name, its loaded versions, aliases and routing.

Each served version is a :class:`ServedModel` with its own micro-batcher. A name's versions and
routing are one immutable :class:`ModelRoutes`; the :class:`Registry` maps names to them and
replaces the whole map in one assignment when it reloads (:meth:`Registry.reload`), so a request
sees either the old table or the new one, never half of each. Requests already holding an old
version finish on it; versions no longer needed are dropped once nothing routes to them.

Reload, in every router worker, every ``SERVERY_RELOAD_INTERVAL_S`` when the models file, the store
or an alias changed (``models/reload.py``), or at once on ``POST /admin/reload``:

1. plan every model (``models/versions.py``): versions to serve, aliases, default, split, shadow;
2. load the versions not loaded yet, off the event loop (inline: the model itself; ``service``
   placement: its metadata, then the framework service is asked to load it);
3. a model whose default version failed to load keeps its old table (the failure is logged, counted
   in ``servery_model_load_failures_total`` and shown in ``GET /models``); other failed versions
   are left out of the new table (a split renormalises over the rest);
4. switch the map, drop versions nothing routes to.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

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
from models.routing import Split
from models.versions import ModelPlan, resolve_ref
from services import metrics
from services.batcher import MicroBatcher, Result
from services.errors import ModelNotFound
from services.runtimes import ModelInfo, load_info, load_runtime

logger = logging.getLogger("servery")
shadow_log = logging.getLogger("servery.shadow")

# (served name, version, rows) -> (class indices, probabilities), answered by a framework service
RemotePredict = Callable[[str, str, np.ndarray], Awaitable[Result]]
# (served name, version) -> None once the framework service has loaded that version; raises if not
RemotePrepare = Callable[[str, str], Awaitable[None]]

ROUTE_KEY_HEADER = "x-servery-route-key"
"""Request header (gRPC: metadata key) whose value places a request in a model's split for good."""

MAX_SHADOW_IN_FLIGHT = 256
"""Shadow copies in flight per worker; more are dropped (counted) so a slow shadow never queues
up work without bound behind the traffic it copies."""


@dataclass
class ServedModel:
    """One loaded version of a served model."""

    info: ModelInfo
    placement: Placement
    batcher: MicroBatcher
    load_key: tuple[Any, ...] = ()

    def describe(self) -> dict[str, Any]:
        return {**self.info.describe(), "placement": self.placement.value, "ready": True}


@dataclass(frozen=True)
class LoadFailure:
    version: str
    error: str
    at: float = field(default_factory=time.time)

    def describe(self) -> dict[str, Any]:
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.at))
        return {"version": self.version, "error": self.error, "at": when}


class ModelRoutes:
    """One served name at one moment: loaded versions, aliases, default, split and shadow."""

    def __init__(
        self,
        plan: ModelPlan,
        versions: dict[str, ServedModel],
        *,
        failures: tuple[LoadFailure, ...] = (),
        warnings: tuple[str, ...] = (),
    ) -> None:
        self.name = plan.name
        self.plan = plan
        self.versions = versions
        self.ordered = tuple(v for v in plan.versions if v in versions)
        self.aliases = {a: v for a, v in plan.aliases.items() if v in versions}
        self.default = versions[plan.default]
        self.default_how = plan.default_how
        notes = list(plan.warnings) + list(warnings)
        targets = []
        for ref, version, weight in plan.split:
            if version in versions:
                targets.append(((f"split:{ref}", versions[version]), weight))
            else:
                notes.append(f"split target '{ref}' ({version}) is not loaded: left out")
        self.split: Split[tuple[str, ServedModel]] | None = (
            Split(plan.name, targets) if targets else None
        )
        self.shadow: ServedModel | None = None
        if plan.shadow is not None:
            self.shadow = versions.get(plan.shadow[1])
            if self.shadow is None:
                notes.append(f"shadow '{plan.shadow[0]}' ({plan.shadow[1]}) is not loaded")
        self.failures = failures
        self.warnings = tuple(notes)

    def with_failures(self, failures: tuple[LoadFailure, ...], warning: str) -> ModelRoutes:
        """This table unchanged, reporting why a newer plan could not replace it."""
        return ModelRoutes(
            self.plan,
            self.versions,
            failures=failures,
            warnings=(warning,),
        )

    def resolve(self, ref: str) -> tuple[ServedModel, str]:
        """The served version for ``ref`` (id, unique prefix, alias or ``latest``)."""
        served = self.versions.get(ref)
        if served is not None:
            return served, "version"
        try:
            version, how = resolve_ref(ref, self.ordered, self.aliases)
        except LookupError as e:
            stored = [v for v in self.plan.store_versions if v.startswith(ref)]
            hint = (
                f"; stored version {stored[0]} is not served (version_policy "
                f"{self.plan.policy}, aliases {sorted(self.aliases)})"
                if len(stored) == 1
                else ""
            )
            raise ModelNotFound(
                f"model '{self.name}': {e}{hint}; served versions: {list(self.ordered)}, "
                f"aliases: {self.aliases}",
                param="version",
            ) from None
        return self.versions[version], how

    def route(self, ref: str | None, key: str | None) -> tuple[ServedModel, str]:
        """The version answering a request: ``ref`` if given, else the split, else the default."""
        if ref is not None:
            return self.resolve(ref)
        if self.split is None:
            return self.default, self.default_how
        how, served = self.split.pick(key)
        return served, how

    def describe(self) -> dict[str, Any]:
        by_version = {v: [a for a, t in self.aliases.items() if t == v] for v in self.ordered}
        out = self.default.describe()
        out.update(
            {
                "default_version": self.default.info.version,
                "default_from": self.default_how,
                "aliases": dict(self.aliases),
                "version_policy": self.plan.policy,
                "versions": [
                    {
                        "version": v,
                        "aliases": by_version[v],
                        "placement": self.versions[v].placement.value,
                        "created": self.versions[v].info.labels.get("created"),
                    }
                    for v in self.ordered
                ],
                "routing": {
                    "split": [
                        {
                            "target": how.removeprefix("split:"),
                            "version": s.info.version,
                            "weight": w,
                        }
                        for (how, s), w in zip(self.split.targets, self.split.weights, strict=True)
                    ]
                    if self.split
                    else [],
                    "shadow": self.shadow.info.version if self.shadow else None,
                },
                "load_errors": [f.describe() for f in self.failures],
                "warnings": list(self.warnings),
            }
        )
        return out


class Registry:
    """Served models by name; :meth:`route` picks the version for a request."""

    def __init__(
        self,
        models: Mapping[str, ModelRoutes],
        *,
        loader: Loader | None = None,
        errors: Mapping[str, str] | None = None,
    ) -> None:
        self._models = dict(models)
        self._errors = dict(errors or {})  # configured names with nothing served, and why
        self._loader = loader
        self._lock = asyncio.Lock()
        self._shadows: set[asyncio.Task[None]] = set()
        self.last_reload: dict[str, Any] = {}

    def __len__(self) -> int:
        return len(self._models)

    def names(self) -> list[str]:
        return list(self._models)

    def routes(self, name: str) -> ModelRoutes:
        routes = self._models.get(name)
        if routes is None:
            why = self._errors.get(name)
            raise ModelNotFound(
                f"model '{name}' is not served"
                + (f" ({why})" if why else f"; served models: {sorted(self._models)}"),
                param="model",
            )
        return routes

    def get(self, name: str, version: str | None = None) -> ServedModel:
        """The version ``version`` names (default: the default version; never the split)."""
        routes = self.routes(name)
        return routes.default if version is None else routes.resolve(version)[0]

    def route(
        self, name: str, version: str | None, key: str | None = None
    ) -> tuple[ModelRoutes, ServedModel, str]:
        """``(routes, served version, routed_by)`` for one request."""
        routes = self.routes(name)
        served, how = routes.route(version, key)
        return routes, served, how

    def ready(self) -> bool:
        """Every configured model has a serving version (Triton's strict readiness)."""
        return bool(self._models) and not self._errors

    def describe(self) -> list[dict[str, Any]]:
        out = [m.describe() for m in self._models.values()]
        out += [{"name": n, "ready": False, "error": e} for n, e in sorted(self._errors.items())]
        return out

    # --- shadow traffic ------------------------------------------------------------------------

    def mirror(self, routes: ModelRoutes, primary: ServedModel, x: np.ndarray, labels: Any) -> None:
        """Send a copy of a request the table routed to ``primary`` to the model's shadow version
        (callers check ``routes.shadow`` first: the hot path pays one attribute test)."""
        shadow = routes.shadow
        if shadow is None or shadow is primary:
            return
        counter = metrics.SHADOW_REQUESTS
        if len(self._shadows) >= MAX_SHADOW_IN_FLIGHT:
            counter.labels(routes.name, shadow.info.version, "dropped").inc()
            return
        task = asyncio.get_running_loop().create_task(
            self._shadow(routes.name, primary, shadow, x, labels)
        )
        self._shadows.add(task)
        task.add_done_callback(self._shadows.discard)

    async def _shadow(
        self, name: str, primary: ServedModel, shadow: ServedModel, x: np.ndarray, labels: Any
    ) -> None:
        start = time.perf_counter()
        try:
            if x.shape[1] != shadow.info.n_features:
                raise ValueError(
                    f"shadow expects {shadow.info.n_features} features, request has {x.shape[1]}"
                )
            got, _ = await shadow.batcher.submit(x.astype(shadow.info.dtype, copy=False))
            outcome = "agree" if np.array_equal(got, labels) else "disagree"
            detail = ""
        except Exception as e:  # a failing shadow never affects the client
            outcome, detail = "error", f" error={type(e).__name__}: {e}"
        metrics.SHADOW_REQUESTS.labels(name, shadow.info.version, outcome).inc()
        shadow_log.info(
            "model=%s primary=%s shadow=%s rows=%d outcome=%s %.3fms%s",
            name,
            primary.info.version,
            shadow.info.version,
            x.shape[0],
            outcome,
            (time.perf_counter() - start) * 1000.0,
            detail,
        )

    # --- reload --------------------------------------------------------------------------------

    async def reload(self, *, force: bool = False) -> dict[str, Any]:
        """Re-read config, store and aliases; load, switch, unload (see the module docstring)."""
        if self._loader is None:
            raise RuntimeError("this registry was built without a loader and cannot reload")
        async with self._lock:
            return await self._loader.reconcile(self, force=force)

    async def watch(self, interval_s: float) -> None:
        """Poll for changes every ``interval_s`` and reload when something changed (forever)."""
        assert self._loader is not None
        while True:
            await asyncio.sleep(interval_s)
            try:
                if self._loader.changed():
                    await self.reload()
            except Exception:  # the watcher must survive anything one reload throws
                logger.exception("model reload failed; still serving the previous models")

    def _swap(self, models: dict[str, ModelRoutes], errors: dict[str, str]) -> None:
        self._models = models
        self._errors = errors


def _batch_hook(info: ModelInfo, placement: Placement) -> Callable[[int, int], None]:
    rows_hist = metrics.BATCH_SIZE.labels(info.name, info.version, placement.value)
    reqs_hist = metrics.BATCH_REQUESTS.labels(info.name, info.version, placement.value)

    def on_batch(rows: int, requests: int) -> None:
        rows_hist.observe(rows)
        reqs_hist.observe(requests)

    return on_batch


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

            async def predict(x: np.ndarray, _call=call, _info=info) -> Result:
                return await _call(_info.name, _info.version, x)

            is_async = True
        batcher = MicroBatcher(
            predict,
            max_batch_size=config.batch_size_of(entry, self.settings),
            is_async=is_async,
            hold_s=self.settings.batch_hold_ms / 1000.0,
            on_batch=_batch_hook(info, placement),
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
