"""The router's table of served models: per name, its loaded versions, aliases and routing.

Each served version is a :class:`ServedModel` with its own micro-batcher. A name's versions and
routing are one immutable :class:`ModelRoutes`; the :class:`Registry` maps names to them and
replaces the whole map in one assignment when it reloads (:meth:`Registry.reload`), so a request
sees either the old table or the new one, never half of each. Requests already holding an old
version finish on it; versions no longer needed are dropped once nothing routes to them.

Reload, in every router worker, every ``SERVERY_RELOAD_INTERVAL_S`` when the models file, the store
or an alias changed (``models/reload.py``), or at once on ``POST /admin/reload``:

1. plan every model (``models/versions.py``): versions to serve, aliases, default, split, shadow;
2. load the versions not loaded yet, off the event loop (``services/runtime/loader.py``; inline:
the model
   itself; ``service`` placement: its metadata, then the framework service is asked to load it);
3. a model whose default version failed to load keeps its old table (the failure is logged, counted
   in ``servery_model_load_failures_total`` and shown in ``GET /models``); other failed versions
   are left out of the new table (a split renormalises over the rest);
4. switch the map, drop versions nothing routes to.

``servery_model_ready{model}`` follows the map: 1 for every name with a table, 0 for configured
names with nothing served, NaN for names no longer configured (a multiprocess series cannot be
removed; NaN keeps ``== 0`` alerts quiet for a model taken out on purpose); a model whose
framework service this worker finds unreachable (a probe or a call, services/ops/health.py), or that
has not answered since the worker started, is 0 until the service answers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from models.config import Placement
from models.routing import Split
from models.signature import OUTPUT_LABEL
from models.versions import ModelPlan, resolve_ref
from services.ops import metrics
from services.runtime.batcher import MicroBatcher, Result, n_rows
from services.runtime.errors import ModelNotFound
from services.runtime.predictors import ModelInfo
from services.runtime.reload import poll, release_memory

if TYPE_CHECKING:
    from services.ops.health import ServiceHealth

logger = logging.getLogger("servery")
shadow_log = logging.getLogger("servery.shadow")

# (served name, version, rows) -> the outputs by name, answered by a framework service
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
    """One loaded version of a served model; ``metrics`` counts and times its requests (the
    handlers call ``served.metrics.answered(status, seconds)``)."""

    info: ModelInfo
    placement: Placement
    batcher: MicroBatcher
    load_key: tuple[Any, ...] = ()
    metrics: metrics.RequestMetrics = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.metrics = metrics.RequestMetrics(self.info.name, self.info.version)

    @property
    def service(self) -> str | None:
        """The framework service this version runs in (``sklearn``, ...), None when inline."""
        return self.info.framework.value if self.placement is Placement.SERVICE else None

    def describe(self) -> dict[str, Any]:
        return {**self.info.describe(), "placement": self.placement.value, "ready": True}


@dataclass(frozen=True)
class Reload:
    """What one reload computed (``services/runtime/loader.py``) for the registry to swap in."""

    models: dict[str, ModelRoutes]
    errors: dict[str, str] | None
    """Configured names with nothing served, and why; None: nothing to swap (the models file
    could not be read, the previous tables keep serving)."""
    report: dict[str, Any]
    """What ``POST /admin/reload`` answers and ``GET /models`` shows as ``last_reload``."""
    ok: bool
    unloaded: bool = False
    """Versions were let go: memory to reclaim once the new tables are in."""


class Reloader(Protocol):
    """Computes reloads (``services.runtime.loader.Loader``)."""

    def changed(self) -> bool: ...

    async def reconcile(self, current: Mapping[str, ModelRoutes], *, force: bool) -> Reload: ...


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
        loader: Reloader | None = None,
        errors: Mapping[str, str] | None = None,
    ) -> None:
        self._models = dict(models)
        self._errors = dict(errors or {})  # configured names with nothing served, and why
        self._loader = loader
        self._lock = asyncio.Lock()
        self._shadows: set[asyncio.Task[None]] = set()
        self.last_reload: dict[str, Any] = {}
        self._health: ServiceHealth | None = None
        self.other_services: tuple[str, ...] = ()
        """Services the router needs besides those of its models (the LLM service)."""
        self._published: set[str] = set()
        self._publish_ready()

    @property
    def health(self) -> ServiceHealth | None:
        """What the router knows of the services behind ``service`` placements (None: all up).
        Setting it republishes ``servery_model_ready`` now and whenever a service's state
        changes (a probe or a call finds it down, or answering again)."""
        return self._health

    @health.setter
    def health(self, health: ServiceHealth | None) -> None:
        self._health = health
        if health is not None:
            health.on_change(self._publish_ready)
        self._publish_ready()

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
        self, name: str, version: str | None, route_key: Callable[[], str | None] | None = None
    ) -> tuple[ModelRoutes, ServedModel, str]:
        """``(routes, served version, routed_by)`` for one request (see :meth:`ModelRoutes.route`).

        ``route_key`` reads the request's route key; it is called only when the model's split
        needs it (no pinned ``version``), so the hot path reads no header it does not use."""
        routes = self.routes(name)
        key = None
        if version is None and route_key is not None and routes.split is not None:
            key = route_key()
        served, how = routes.route(version, key)
        return routes, served, how

    def ready(self) -> bool:
        """The router's readiness (``/readyz``, ``/v2/health/ready``, gRPC ``ServerReady``):
        something is served (a model with a serving version, or the LLM API), every service
        the served models (and the LLM API) need has answered since start, and at least one of
        them can answer now. A configured model with nothing to serve (not in the store, an
        invalid entry, its default failed to load) is listed not ready (:meth:`describe`) but
        does not take readiness from the others: it would be the same in every replica, so the
        whole Service would drop. A service that answered before and is unreachable now (circus
        restarts it) leaves the router ready: only its models report not ready
        (:meth:`problem`); see docs/operations.md, "Readiness and failures"."""
        health = self.health
        if health is None:
            return bool(self._models)
        if not self._models and not self.other_services:
            return False
        if not health.started(self.services()):
            return False
        return any(self._problem(r.default) is None for r in self._models.values()) or any(
            health.problem(s) is None for s in self.other_services
        )

    def services(self) -> set[str]:
        """The services the served models and the LLM API need now."""
        versions = (s for r in self._models.values() for s in r.versions.values())
        return {s.service for s in versions if s.service is not None} | set(self.other_services)

    def problem(self, name: str, version: str | None = None) -> str | None:
        """Why the served model ``name`` (at ``version``; default: its default version) cannot
        answer now (its service is unreachable), or None. Raises ModelNotFound like ``get``."""
        return self._problem(self.get(name, version))

    def _problem(self, served: ServedModel) -> str | None:
        service = served.service
        if service is None or self.health is None:
            return None
        return self.health.problem(service)

    def describe(self) -> list[dict[str, Any]]:
        out = [self._describe(m) for m in self._models.values()]
        out += [{"name": n, "ready": False, "error": e} for n, e in sorted(self._errors.items())]
        return out

    def describe_model(self, name: str) -> dict[str, Any]:
        """``GET /models/{name}``: one entry of :meth:`describe`; raises ModelNotFound."""
        return self._describe(self.routes(name))

    def _describe(self, routes: ModelRoutes) -> dict[str, Any]:
        out = routes.describe()
        why = self._problem(routes.default)
        if why is not None:
            out.update(ready=False, error=why)
        return out

    # --- shadow traffic ------------------------------------------------------------------------

    def mirror(self, routes: ModelRoutes, primary: ServedModel, x: Any, outputs: Any) -> None:
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
            self._shadow(routes.name, primary, shadow, x, outputs)
        )
        self._shadows.add(task)
        task.add_done_callback(self._shadows.discard)

    async def _shadow(
        self, name: str, primary: ServedModel, shadow: ServedModel, x: Any, outputs: Any
    ) -> None:
        start = time.perf_counter()
        try:
            want, have = shadow.info.signature, primary.info.signature
            if not want.accepts_rows_of(have):
                raise ValueError(
                    f"shadow takes inputs {[t.describe() for t in want.inputs]}, the primary "
                    f"{[t.describe() for t in have.inputs]}"
                )
            if isinstance(x, np.ndarray):
                x = x.astype(want.inputs[0].dtype, copy=False)
            got = await shadow.batcher.submit(x)
            outcome = "agree" if _agree(got, outputs) else "disagree"
            detail = ""
        except Exception as e:  # a failing shadow never affects the client
            outcome, detail = "error", f" error={type(e).__name__}: {e}"
        metrics.SHADOW_REQUESTS.labels(name, shadow.info.version, outcome).inc()
        shadow_log.info(
            "model=%s primary=%s shadow=%s rows=%d outcome=%s %.3fms%s",
            name,
            primary.info.version,
            shadow.info.version,
            n_rows(x),
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
            result = await self._loader.reconcile(self._models, force=force)
            if result.errors is not None:
                self._swap(result.models, result.errors)
            if result.unloaded:
                release_memory()
            metrics.RELOADS.labels("ok" if result.ok else "failed").inc()
            self.last_reload = result.report
            return result.report

    async def watch(self, interval_s: float) -> None:
        """Poll for changes every ``interval_s`` and reload when something changed (forever)."""
        loader = self._loader
        assert loader is not None

        async def tick() -> None:
            if loader.changed():
                await self.reload()

        await poll(interval_s, tick, "model reload failed; still serving the previous models")

    def _swap(self, models: dict[str, ModelRoutes], errors: dict[str, str]) -> None:
        self._models = models
        self._errors = errors
        self._publish_ready()

    def _publish_ready(self) -> None:
        """``servery_model_ready``: 1 per served name whose default version can answer, 0 per
        served name whose service cannot (:meth:`problem`) and per configured name with nothing
        served, NaN for a name published before and no longer configured."""
        for name, routes in self._models.items():
            metrics.set_model_ready(name, self._problem(routes.default) is None)
        for name in self._errors:
            metrics.set_model_ready(name, False)
        for name in self._published - self._models.keys() - self._errors.keys():
            metrics.set_model_ready(name, None)
        self._published |= self._models.keys() | self._errors.keys()


def _agree(got: Any, want: Any) -> bool:
    """A shadow's answer agrees with the primary's: the same ``predict`` (class indices exactly;
    floats within 1e-5, e.g. a compiled version of the same regressor); for a tensor model, every
    output of the primary."""
    names = [OUTPUT_LABEL] if OUTPUT_LABEL in want else list(want)
    for name in names:
        a, b = got.get(name), want.get(name)
        if a is None or b is None or np.shape(a) != np.shape(b):
            return False
        if np.asarray(b).dtype.kind == "f":
            if not np.allclose(a, b, rtol=1e-5, atol=1e-5):
                return False
        elif not np.array_equal(a, b):
            return False
    return True
