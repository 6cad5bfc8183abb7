"""Graceful shutdown of the services the router depends on.

``bentoml serve`` runs the router and its dependencies (framework services, the LLM service) as
circus watchers; on SIGTERM (Kubernetes stopping the pod) circus stops them all **at once**
(``circus/arbiter.py``, ``_stop_watchers``). Each worker's uvicorn then stops accepting and
finishes what it has, so a request the router admitted but had not yet forwarded (a micro-batch
waiting for its turn, an LLM request just arriving) found its service closed: measured, 160 of
~2,900 requests to a service-placed model answered 503 when the Bento got SIGTERM under load.

:func:`delay_sigterm` makes a dependency keep serving for ``SERVERY_SHUTDOWN_DRAIN_S`` after
SIGTERM before handing the signal to uvicorn, whose graceful shutdown then finishes every request
in flight (an LLM stream included) before the lifespan hooks stop the engines. The router itself
stops at once: it stops accepting, and its in-flight requests complete against services that are
still up. A second SIGTERM stops at once. BentoML gives circus a ``graceful_timeout`` of a day,
so what bounds the whole shutdown is the orchestrator (Kubernetes: ``terminationGracePeriodSeconds``
of the pod, then SIGKILL); keep the drain well inside it. The LLM worker's engine processes are
not signalled by circus (services/compat/llm_watcher_stop.py), so vLLM does not abort the streams
in flight. The services' Unix sockets stay in place until every worker has stopped
(services/compat/arbiter_stop_order.py): BentoML deleted them at SIGTERM, so a router worker that
opened a new connection during the drain could not reach a service that was still serving.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from types import FrameType

logger = logging.getLogger("servery")


def delay_sigterm(seconds: float) -> bool:
    """From a startup hook (uvicorn has installed its handlers): postpone SIGTERM by ``seconds``.

    Returns whether a handler was installed (not for ``seconds`` <= 0, or outside the main thread
    or when SIGTERM has no Python handler to postpone).
    """
    if seconds <= 0:
        return False
    try:
        previous = signal.getsignal(signal.SIGTERM)
    except ValueError:
        return False
    if not callable(previous):
        return False
    loop = asyncio.get_running_loop()

    def handler(signum: int, frame: FrameType | None) -> None:
        # A second SIGTERM goes straight to uvicorn's handler.
        signal.signal(signal.SIGTERM, previous)
        logger.info("SIGTERM: serving %.1f s more for requests already admitted upstream", seconds)
        loop.call_soon_threadsafe(loop.call_later, seconds, previous, signum, None)

    try:
        signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        return False
    return True
