"""Remove the services' Unix sockets after the workers stop, not before.

Replaces: BentoML 1.4.40, ``bentoml/_internal/utils/circus/__init__.py``, ``Arbiter.start`` and
``Arbiter.stop`` (wholesale; circus is the ``kantoku`` 0.18.3 fork BentoML depends on).

Defect: ``Arbiter.stop`` closes its exit stack *before* circus stops the watchers, and that stack
holds ``shutil.rmtree(uds_path)`` (``_bentoml_impl/server/serving.py``, ``serve_http``): on
SIGTERM the directory of the dependencies' Unix sockets is deleted at once, so while the
framework services drain (services/ops/shutdown.py) every *new* connection from the router fails
(``ENOENT``) and the request answers 503; only pooled keep-alive connections still work.

Harm: measured in CI, 6 admitted requests to a service-placed model lost that way
(tests/integration/test_graceful_shutdown.py). Here ``stop`` only stops circus; the exit stack
closes when the arbiter's loop has ended (``start`` returns), after every watcher stopped and
circus closed its sockets. Applied in the ``bentoml serve`` process, which imports ``services``
before it builds the arbiter.

Known for: bentoml 1.4.40, kantoku (circus) 0.18.3. Guard: refuse (both methods are replaced
wholesale, and ``start`` relies on circus's ``start`` returning a future).
Reported upstream: not reported.
"""

from __future__ import annotations

from typing import Any

# What this fix was written against: services.compat.fingerprint() of each upstream definition.
UPSTREAM = {
    "bentoml._internal.utils.circus:Arbiter": "8950f69018ed2d07",
    "circus.arbiter:Arbiter.start": "f712049303b9af87",
    "circus.arbiter:Arbiter.stop": "16adf252313e0ce6",
}


def patch() -> None:
    """Replace BentoML's ``Arbiter.start``/``stop``: the exit stack closes after the loop."""
    # circus's own Arbiter is reached through super(): circus is BentoML's dependency, not one
    # this package pins (tests/integration/test_bento_build.py).
    from bentoml._internal.utils import circus as bentoml_circus

    arbiter = bentoml_circus.Arbiter

    def start(self: Any, cb: Any = None) -> None:
        self.exit_stack.__enter__()
        try:
            fut = super(arbiter, self).start(cb)
            if exc := fut.exception():
                raise exc
        finally:
            self.exit_stack.__exit__(None, None, None)

    def stop(self: Any) -> Any:
        return super(arbiter, self).stop()

    arbiter.start = start  # type: ignore[method-assign]
    arbiter.stop = stop  # type: ignore[method-assign]
