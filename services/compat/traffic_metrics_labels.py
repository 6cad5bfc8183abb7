"""Label BentoML's traffic metrics by route template, never by the raw request path.

Replaces: BentoML 1.4.40, ``bentoml/_internal/server/http/instruments.py``,
``RunnerTrafficMetricsMiddleware.__call__``: wrapped; the original runs on a per-request copy
of the middleware that sees the route template as ``scope["path"]``.

Defect: ``endpoint = scope["path"]`` labels ``bentoml_service_request_total``,
``_request_duration_seconds`` (every bucket) and ``_request_in_progress``, so every distinct path
a client sends (``/models/<any name>``, ``/no/such/path/<random>``) makes new series for good.

Harm: unbounded metric cardinality, growing with every new path a client (or a scanner) sends
(tests/integration/test_metrics_workers.py). Here the middleware sees the matched route's
template (``/models/{name}``, ``/v2/{path:path}``) or ``/_unmatched``; the app still routes on
the real path. Only requests that go through BentoML's middleware pay (~30 route matches, cached
per path): the fast path's prediction routes never reach it.

Known for: bentoml 1.4.40. Guard: refuse (it relies on the middleware's private ``_is_setup`` and
``_setup`` and on a shallow copy of it behaving as the original: a mismatch could fail every
request that goes through BentoML's middleware).
Reported upstream: not reported.
"""

from __future__ import annotations

import copy
import functools
from typing import Any

# What this fix was written against: services.compat.fingerprint() of each upstream definition.
UPSTREAM = {
    "bentoml._internal.server.http.instruments:RunnerTrafficMetricsMiddleware": "05e7b8c039e93919",
}


def _label(routes: Any, scope: dict[str, Any], prefix: str) -> str | None:
    """The template of the route (or mount) in ``routes`` that matches ``scope``, if any."""
    from starlette.routing import Match, Mount

    partial = None
    for route in routes:
        match, child = route.matches(scope)
        if match is Match.NONE:
            continue
        if isinstance(route, Mount):
            inner = _label(route.routes, {**scope, **child}, prefix + route.path)
            found = inner if inner is not None else f"{prefix}{route.path}/{{path:path}}"
        else:
            found = prefix + getattr(route, "path", "/_unmatched")
        if match is Match.FULL:
            return found
        partial = partial or found
    return partial


@functools.lru_cache(maxsize=512)
def _endpoint(app: Any, kind: str, method: str, path: str) -> str:
    scope = {"type": kind, "method": method, "path": path, "root_path": ""}
    return _label(getattr(app, "routes", ()), scope, "") or "/_unmatched"


def patch() -> None:
    """Wrap ``RunnerTrafficMetricsMiddleware.__call__``: its label is the route template."""
    from bentoml._internal.server.http.instruments import RunnerTrafficMetricsMiddleware

    original = RunnerTrafficMetricsMiddleware.__call__

    async def __call__(self: Any, scope: Any, receive: Any, send: Any) -> None:
        kind = scope["type"]
        if kind not in ("http", "websocket") or scope["path"] == "/metrics" or "app" not in scope:
            return await original(self, scope, receive, send)
        name = _endpoint(scope["app"], kind, scope.get("method", "GET"), scope["path"])
        if name == scope["path"]:
            return await original(self, scope, receive, send)
        # The original reads the label from scope["path"]: hand it a copy carrying the label and
        # a per-request copy of itself whose app gets the real scope back.
        inner = self.app

        async def real(_: Any, receive: Any, send: Any) -> None:
            await inner(scope, receive, send)

        if not self._is_setup:  # set up once, here: a copy would register the metrics again
            self._setup()
        shim = copy.copy(self)
        shim.app = real
        await original(shim, {**scope, "path": name}, receive, send)

    RunnerTrafficMetricsMiddleware.__call__ = __call__  # type: ignore[method-assign]
