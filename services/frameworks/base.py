"""What the three framework services share: load their models' versions, batch, predict, reload.

Each framework service (``sklearn_service.py``, ``xgboost_service.py``, ``torch_service.py``) is a
thin ``@bentoml.service`` subclass of :class:`FrameworkService` naming its framework. For every
model placed ``service`` in the model config it loads each version of the model's plan
(``models/versions.py``) whose stored framework is its own, keyed by (served name, version), and
offers:

* ``predict`` — public, BentoML adaptive batching (``batchable=True``); body
  ``{"rows": [{"model": "iris", "inputs": [5.1, 3.5, 1.4, 0.2]}, ...]}``, one result per row.
  A row without ``version`` goes to the model's default (its ``production`` alias, else the newest
  served version); a row may name any loaded version id. Each request is validated on its own
  before it joins a batch, so a bad one fails alone.
* ``predict_batch`` — what the router calls with a whole micro-batch of validated rows.
* ``prepare`` — what the router calls before it routes to a version during a hot reload; an error
  answer (404 unknown, 500 unloadable) makes the router keep its previous version.

Every ``SERVERY_RELOAD_INTERVAL_S`` the service compares ``models/reload.py``'s fingerprint and, on
a change, re-plans and loads the versions now needed; a new default that fails to load leaves the
previous one answering (a broken version is retried only once the store changes). The router polls
on its own clock, so it may route to a version this process has not loaded yet: ``predict_batch``
and ``prepare`` load any stored version of one of its models on demand (off the event loop, one
load per version at a time). For the same reason a version no plan wants any more is unloaded only
once nothing used it for max(30 s, 5 x the interval): a router still on its old table is not
pushed into reloading it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections import defaultdict
from typing import Annotated, Any, ClassVar

import bentoml
import numpy as np
from pydantic import AfterValidator, BaseModel, Field, Strict
from pydantic_core import PydanticCustomError

from models.aliases import AliasStore
from models.config import (
    ConfigError,
    Framework,
    ModelEntry,
    Placement,
    load_model_config,
)
from models.formats import framework_of
from models.signature import OUTPUT_LABEL, OUTPUT_PROBA, Task
from models.store import get_model
from services.ops.heap import freeze_heap
from services.ops.shutdown import delay_sigterm
from services.protocols.errors import error_response
from services.runtime.errors import InvalidInput, ModelLoadFailed, ModelNotFound, ServeryError
from services.runtime.inputs import check_shape, finite
from services.runtime.predictors import Runtime, load_runtime
from services.runtime.reload import DesiredWatch, FailedLoads, poll, release_memory
from services.runtime.service_versions import (
    Key,
    Served,
    idle_unplanned,
    served_table,
    service_entry,
    service_plans,
    unload_grace_s,
)
from services.settings import SETTINGS

logger = logging.getLogger("servery")

# BentoML version ids are lowercase alphanumerics; anything else (``latest``, a path) must not
# reach the store lookup, where ``latest`` would resolve to some other version.
_VERSION_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,127}\Z")


class _OtherFramework(ModelNotFound):
    """The version exists but belongs to another framework's service."""


# Request validators run in BentoML's input parsing, before the service instance is reachable, so
# they look models up here; FrameworkService keeps it in step with what it has loaded.
_LOADED: dict[str, Served] = {}

Number = Annotated[float, Strict(), Field(allow_inf_nan=False)]


class Row(BaseModel):
    """One row for one model."""

    model: str = Field(description="Served model name")
    version: str | None = Field(None, description="Exact version id; default: the model's default")
    inputs: list[Number] = Field(description="Feature values of one row", min_length=1)


def _check_row(row: Row) -> Row:
    served = _LOADED.get(row.model)
    runtime = served.get(row.version) if served is not None else None
    if runtime is None:
        raise PydanticCustomError(
            "model_not_found",
            "model '{model}' (version {version}) is not served here; served: {served}",
            {
                "model": row.model,
                "version": row.version or "default",
                "served": {n: sorted(s.runtimes) for n, s in sorted(_LOADED.items())},
            },
        )
    info = runtime.info
    if info.n_features < 0 or info.signature.columnar:
        raise ValueError(
            f"model '{row.model}' takes {[t.describe() for t in info.signature.inputs]}, not one "
            "flat row of numbers: call it on the router (POST /predict or OIP V2)"
        )
    try:  # the one input rule (services/runtime/inputs.py), for one row
        check_shape((1, len(row.inputs)), info.n_features, 1, row.model, "'inputs'")
        finite(np.asarray([row.inputs]), info.dtype, "'inputs'")
    except InvalidInput as e:
        raise ValueError(e.message) from None  # pydantic reports ValueErrors as 400s
    # Pin the version the row was checked against: a reload may move the default before the
    # batch runs, and the new default may expect other inputs.
    return row if row.version == info.version else row.model_copy(update={"version": info.version})


CheckedRow = Annotated[Row, AfterValidator(_check_row)]


class RowResult(BaseModel):
    model: str
    version: str
    prediction: Any = Field(description="Class index, regression value(s), or first output")
    label: str | None = None
    probabilities: list[float] | None = None


def service_config() -> dict[str, Any]:
    """``@bentoml.service`` options shared by the framework services."""
    return {
        "workers": SETTINGS.service_workers,
        "traffic": {"timeout": SETTINGS.request_timeout_s},
        # BentoML 1.4.40's client (``_bentoml_impl/client/proxy2.py``, SessionManager) closes its
        # HTTP session every 100 requests or 300 s while calls are still in flight: the router
        # lost 10-32 % of requests at c=16-64 (bentoml/BentoML#5540, fix in PR #5541/#5698).
        # Calls go over a local Unix socket, so recycling the session buys nothing: never do it.
        "runner_connection": {"max_requests": 2**62, "max_age": 1e12},
    }


class FrameworkService:
    """Base class; subclasses set ``framework`` and are decorated with ``@bentoml.service``."""

    framework: ClassVar[Framework]

    def __init__(self) -> None:
        self._aliases = AliasStore()
        self._desired = DesiredWatch(SETTINGS.models_file, self._aliases)
        self._grace_s = unload_grace_s(SETTINGS.reload_interval_s)
        self._runtimes: dict[Key, Runtime] = {}
        self._last_used: dict[Key, float] = {}
        self._defaults: dict[str, str] = {}
        self._loading: dict[Key, asyncio.Task[Runtime]] = {}
        # key -> the message: not retried until the model's store folder changes
        self._failed: FailedLoads[str] = FailedLoads(self._aliases)
        self._watcher: asyncio.Task[None] | None = None

        state = self._desired.first()
        self._plans = service_plans(state.config, state.plans)
        entries = {e.name: e for e in state.config.models}
        errors = {
            name: error
            for name, error in state.errors.items()
            if name in entries  # not an invalid entry of a salvaged file (the router reports it)
            and state.config.placement_of(entries[name]) is Placement.SERVICE
            and entries[name].framework in (None, self.framework)
        }
        for name, error in errors.items():
            # the router reports it (readiness, GET /models); the other models are served
            logger.error("%s service: model '%s' cannot be served: %s", self.framework, name, error)
        for name, plan in self._plans.items():
            for version in plan.versions:
                try:
                    self._store(self._load_sync(entries[name], version))
                except _OtherFramework:
                    continue
                except Exception:  # logged and remembered by _load_sync; the others are served
                    continue
            if (name, plan.default) in self._runtimes:
                self._defaults[name] = plan.default
        self._publish()
        freeze_heap()

    # --- loading ------------------------------------------------------------------------------

    def _load_sync(self, entry: ModelEntry, version: str) -> Runtime:
        """Load one version of ``entry`` (blocking); ModelNotFound if it is not ours to load."""
        key = (entry.name, version)
        if not _VERSION_RE.match(version) or version == "latest":
            raise ModelNotFound(f"'{version}' is not a version id of model '{entry.name}'")
        if not (self._aliases.models_dir / entry.store_name / version).is_dir():
            raise ModelNotFound(f"model '{entry.name}' has no version '{version}' in the store")
        failed = self._failed.blocked(key, entry.store_name)
        if failed is not None:
            raise ModelLoadFailed(failed)
        try:
            framework = framework_of(get_model(f"{entry.store_name}:{version}"), entry.framework)
            if framework is not self.framework:
                raise _OtherFramework(
                    f"model '{entry.name}' version {version} is a {framework} model, "
                    f"not served by the {self.framework} service"
                )
            runtime = load_runtime(entry, SETTINGS.model_threads, version)
        except ModelNotFound:
            raise
        except Exception as e:
            logger.error(
                "%s service: model '%s' version %s failed to load",
                self.framework,
                entry.name,
                version,
                exc_info=True,
            )
            message = (
                f"model '{entry.name}' version {version} failed to load ({type(e).__name__}); "
                "see the service log"
            )
            self._failed.record(key, entry.store_name, message)
            raise ModelLoadFailed(message) from e
        self._failed.forget(key)
        logger.info("%s service loaded %s as '%s'", self.framework, runtime.info.tag, entry.name)
        return runtime

    def _store(self, runtime: Runtime) -> None:
        key = (runtime.info.name, runtime.info.version)
        self._runtimes[key] = runtime
        self._last_used[key] = time.monotonic()  # a fresh load gets a full grace period

    def _publish(self) -> None:
        table = served_table(self._runtimes, self._defaults)
        # update before pop: a validator never sees a served name missing in between
        _LOADED.update(table)
        for name in set(_LOADED) - set(table):
            del _LOADED[name]

    async def _entry(self, model: str) -> ModelEntry:
        """The config entry of ``model`` if it is placed ``service``; ModelNotFound otherwise."""
        entry = service_entry(self._desired.config, model)
        if entry is None:
            # The router may have read a newer models file than this process: look there too.
            with contextlib.suppress(ConfigError):
                config = await asyncio.to_thread(load_model_config, self._desired.models_file)
                entry = service_entry(config, model)
        if entry is None:
            raise ModelNotFound(f"model '{model}' is not served by the {self.framework} service")
        return entry

    async def _ensure(self, model: str, version: str, entry: ModelEntry | None = None) -> Runtime:
        """The runtime of (model, version), loading it first if needed; marks it used."""
        key = (model, version)
        runtime = self._runtimes.get(key)
        if runtime is None:
            task = self._loading.get(key)
            if task is None:
                task = asyncio.create_task(self._load(key, entry))
                # nobody may be left to await a failed load (all callers gone): consume its error
                task.add_done_callback(lambda t: t.cancelled() or t.exception())
                self._loading[key] = task
            # shield: a caller that gives up (timeout, disconnect) must not cancel the shared load
            runtime = await asyncio.shield(task)
        self._last_used[key] = time.monotonic()
        return runtime

    async def _load(self, key: Key, entry: ModelEntry | None) -> Runtime:
        try:
            if entry is None:
                entry = await self._entry(key[0])
            runtime = await asyncio.to_thread(self._load_sync, entry, key[1])
            self._store(runtime)
            plan = self._plans.get(key[0])
            if plan is not None and plan.default == key[1]:
                # the plan's default failed at the last reload and loads now (the store changed)
                self._defaults[key[0]] = key[1]
            self._publish()
            return runtime
        finally:
            self._loading.pop(key, None)

    # --- hot reload ---------------------------------------------------------------------------

    async def _reconcile(self) -> None:
        """Re-read the desired state, load what it newly needs, switch defaults, sweep."""
        try:
            state, seen = await self._desired.read()
        except ConfigError:  # logged; the previous config keeps serving
            return
        plans = service_plans(state.config, state.plans)
        for name, error in state.errors.items():
            if name in self._plans:  # planning failed (e.g. unreadable alias file): keep the old
                logger.error("model '%s' not re-planned, keeping its versions: %s", name, error)
                plans[name] = self._plans[name]
        entries = {e.name: e for e in state.config.models}
        for name, plan in plans.items():
            for version in plan.versions:
                if (name, version) in self._runtimes:
                    continue
                with contextlib.suppress(ServeryError):  # not ours, or logged by _load_sync
                    await self._ensure(name, version, entries.get(name))
        self._plans = plans
        for name, plan in plans.items():
            if (name, plan.default) in self._runtimes:
                self._defaults[name] = plan.default
            elif name in self._defaults:
                logger.error(
                    "model '%s': default version %s did not load; %s stays the default",
                    name,
                    plan.default,
                    self._defaults[name],
                )
        self._desired.settle(seen)
        self._publish()

    def _sweep(self) -> list[Key]:
        """Unload versions that no plan wants and that nothing used for the grace period."""
        keep = {(n, v) for n, p in self._plans.items() for v in p.versions}
        keep |= {(n, v) for n, v in self._defaults.items() if n in self._plans}
        gone = idle_unplanned(
            self._runtimes, keep, self._last_used, time.monotonic(), self._grace_s
        )
        if not gone:
            return gone
        for key in gone:
            del self._runtimes[key]
            self._last_used.pop(key, None)
        names = {n for n, _ in self._runtimes}
        self._defaults = {n: v for n, v in self._defaults.items() if n in names}
        self._publish()
        logger.info("%s service unloaded %s", self.framework, [f"{n}:{v}" for n, v in gone])
        release_memory()
        return gone

    async def _watch(self, interval_s: float) -> None:
        async def tick() -> None:
            if self._desired.changed():
                await self._reconcile()
            # every tick, not only on changes: the grace of an idle version ends on its own
            self._sweep()

        await poll(interval_s, tick, f"{self.framework} service: model reload failed")

    @bentoml.on_startup
    async def _start_watcher(self) -> None:
        """Poll the models file, the store and the aliases; reload on change. Keep serving
        ``SERVERY_SHUTDOWN_DRAIN_S`` after SIGTERM (services/ops/shutdown.py)."""
        self._watcher = asyncio.create_task(self._watch(SETTINGS.reload_interval_s))
        delay_sigterm(SETTINGS.shutdown_drain_s)

    @bentoml.on_shutdown
    async def _stop_watcher(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
            self._watcher = None

    # --- APIs ---------------------------------------------------------------------------------

    @bentoml.api(
        batchable=True,
        batch_dim=0,
        max_batch_size=SETTINGS.service_max_batch_size,
        max_latency_ms=SETTINGS.service_max_latency_ms,
    )
    async def predict(self, rows: list[CheckedRow]) -> list[RowResult]:
        """Predict rows of any models this service holds (adaptive batching across requests)."""
        groups: dict[Key, list[int]] = defaultdict(list)
        for i, row in enumerate(rows):
            # Validated rows carry their version; internal calls skip validation and may not.
            version = row.version or self._defaults.get(row.model)
            if version is None:
                raise ModelNotFound(f"model '{row.model}' has no default version loaded")
            groups[(row.model, version)].append(i)
        results: list[RowResult | None] = [None] * len(rows)
        for (name, version), idx in groups.items():
            runtime = await self._ensure(name, version)
            info = runtime.info
            x = np.asarray([rows[i].inputs for i in idx], dtype=info.dtype)
            outputs = runtime.predict(x)
            first = (
                outputs[OUTPUT_LABEL] if OUTPUT_LABEL in outputs else next(iter(outputs.values()))
            )
            proba = outputs.get(OUTPUT_PROBA)
            classify = info.task is Task.CLASSIFICATION
            names = info.class_names
            for j, i in enumerate(idx):
                k = first[j].tolist()
                results[i] = RowResult(
                    model=name,
                    version=info.version,
                    prediction=k,
                    label=(names[k] if 0 <= k < len(names) else str(k)) if classify else None,
                    probabilities=proba[j].tolist() if proba is not None else None,
                )
        return results  # type: ignore[return-value]

    @bentoml.api
    async def predict_batch(self, model: str, version: str, inputs: np.ndarray) -> Any:
        """Internal: predict a validated micro-batch from the router (pickled numpy in and out)."""
        try:
            runtime = await self._ensure(model, version)
        except ServeryError as e:
            return error_response(e)
        single = runtime.info.signature.single
        if single is None or inputs.shape[1:] != single.shape:
            raise ValueError(f"router sent a {inputs.shape} batch for model '{model}'")
        return {"outputs": runtime.predict(inputs)}

    @bentoml.api
    async def prepare(self, model: str, version: str) -> dict[str, Any]:
        """Internal: load ``model`` at ``version`` now, before the router routes to it.

        Answers ``{"model", "version", "loaded": true}``, or an error (404: not a stored version
        of a model of this service; 500: the version cannot be loaded) so the router keeps its
        previous version.
        """
        try:
            await self._ensure(model, version)
        except ServeryError as e:
            return error_response(e)  # type: ignore[return-value]  # BentoML passes it through
        return {"model": model, "version": version, "loaded": True}
