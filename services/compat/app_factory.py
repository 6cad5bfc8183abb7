"""A hook around the ASGI app BentoML builds for each service: the fast path's way in.

Replaces: BentoML 1.4.40, ``_bentoml_impl/server/app.py``, ``ServiceAppFactory.__call__``:
wrapped; the app it builds passes through the one function set with :func:`wrap_apps`
(services/gateway/fastpath.py sets it in ``install``).

Defect: BentoML offers no per-route way out of its per-request middleware stack (request
context, traffic metrics, OpenTelemetry, access log, timeout, routing into the mounted app):
``add_asgi_middleware`` runs inside it, and nothing can wrap the outermost app.

Harm (docs/internals/stack.md, "Where the time goes"): on the router the model was 0.7-5 % of the
CPU and
BentoML's front end the rest; with the prediction routes served outside the stack (the fast
path, services/gateway/fastpath.py) iris at c=64 measured about 9,700 req/s against 3,500
through it (same session, wrk, 2 cores). The same wrapper is where the API-key gate and the
body-size check see every request, and where the router's 404 becomes the platform's JSON.

Known for: bentoml 1.4.40. Guard: refuse (the wrapper carries the API-key gate and reads
``ServiceAppFactory.service.inner`` and ``is_main``: a mismatch could serve without the gate).
Reported upstream: not reported. bentoml/BentoML#5246 and its open fix, PR #5654 (outer
timeout and concurrency middleware around mounted apps), would change this function.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# What this fix was written against: services.compat.fingerprint() of each upstream definition.
UPSTREAM = {
    "_bentoml_impl.server.app:ServiceAppFactory.__call__": "ded36d960a9f22ba",
    "_bentoml_impl.server.app:ServiceAppFactory.__init__": "47f62c0c1d997dbc",
}


@dataclass(frozen=True)
class BuiltApp:
    """What a wrapper learns about an app BentoML has just built."""

    app: Any
    """The Starlette app BentoML built (its middleware stack, routes and mounted apps)."""
    service: type
    """The user's service class (``@bentoml.service``'s ``inner``)."""
    is_main: bool
    """Whether it is the entry service (the one listening on TCP)."""
    access_log: bool
    """Whether BentoML's access log is on (``api_server.logging.access.enabled``)."""


Wrapper = Callable[[BuiltApp], Any]
_WRAPPER: list[Wrapper] = []


def wrap_apps(wrapper: Wrapper) -> None:
    """Pass every app BentoML builds from now on through ``wrapper`` (it returns the ASGI app to
    serve). One wrapper per process: a second call replaces the first.

    Nothing is patched here: :func:`services.compat.apply` installs the hook, and must have run
    (``services/__init__.py`` calls it first)."""
    from services import compat

    if "app_factory" not in compat.APPLIED:
        raise RuntimeError("services.compat.apply() must run before wrap_apps()")
    _WRAPPER[:] = [wrapper]


def patch() -> None:
    """Wrap ``ServiceAppFactory.__call__``: the built app goes through the :func:`wrap_apps`
    wrapper, if one is set."""
    from _bentoml_impl.server.app import ServiceAppFactory
    from bentoml._internal.container import BentoMLContainer

    original = ServiceAppFactory.__call__

    def __call__(self: Any) -> Any:
        app = original(self)
        if not _WRAPPER:
            return app
        access = bool(BentoMLContainer.api_server_config.logging.access.enabled.get())
        return _WRAPPER[0](BuiltApp(app, self.service.inner, self.is_main, access))

    ServiceAppFactory.__call__ = __call__  # type: ignore[method-assign]
