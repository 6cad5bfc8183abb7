"""Answer request-body validation errors of ``@bentoml.api`` endpoints in the platform's envelope.

Replaces: BentoML 1.4.40, ``_bentoml_impl/server/app.py``: wraps
``ServiceAppFactory.api_endpoint``, so the ``ValidationError`` branch of
``api_endpoint_wrapper`` (its caller) is not reached for the request body's own errors.

Defect: ``api_endpoint_wrapper`` answers pydantic errors with
``{"error": "N validation error for ...", "detail": [...]}``; the platform has one envelope
(``{"error": {"type", "message"}}``) and maps ``model_not_found`` to 404 (CONVENTIONS.md 7).

Harm: two error shapes for one API, and an unknown model answered 400 instead of 404. Only the
error path changes: a successful call costs one extra ``try``. A ``ValidationError`` raised by
the service's own code is a server bug and stays a 500.

Known for: bentoml 1.4.40. Guard: warn (a wrapper: upstream's code still runs unchanged).
Reported upstream: not reported (BentoML's own envelope, not a bug upstream).
"""

from __future__ import annotations

from typing import Any

from services import compat

# What this fix was written against: services.compat.fingerprint() of each upstream definition.
UPSTREAM = {
    "_bentoml_impl.server.app:ServiceAppFactory.api_endpoint": "e2982cb9c2d51e2e",
    "_bentoml_impl.server.app:ServiceAppFactory.api_endpoint_wrapper": "06817cc25a0e76a7",
}


def patch() -> None:
    """Wrap ``ServiceAppFactory.api_endpoint``: the request body's ``ValidationError`` becomes
    the platform's 400/404 (once the entry set the envelope: ``services.compat.use_envelope``);
    everything else passes through."""
    from _bentoml_impl.server.app import ServiceAppFactory
    from pydantic import ValidationError

    original = ServiceAppFactory.api_endpoint

    async def api_endpoint(self: Any, name: str, request: Any) -> Any:
        try:
            return await original(self, name, request)
        except ValidationError as exc:
            # Only the request body's own validation is a client mistake; a ValidationError
            # raised by the service's code is a server bug and stays a 500.
            env = compat.envelope()
            if env is None or exc.title != self.service.apis[name].input_spec.__name__:
                raise
            return env.respond(env.invalid_body(exc))

    ServiceAppFactory.api_endpoint = api_endpoint  # type: ignore[method-assign]
