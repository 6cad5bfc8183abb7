"""Whether the services behind the router answer, as one router worker sees them (issue 7).

The framework services and the LLM service are processes of their own under ``bentoml serve``;
when one dies, circus starts it again, and meanwhile only the models it serves are unavailable.
A router worker learns the state of each service it uses in two ways:

* a **probe**: its ``/readyz`` over the service's Unix socket, every ``interval_s`` (every
  ``fast_interval_s`` while one has not answered yet or is down), with a short timeout. circus
  keeps the socket listening while it restarts the worker, so a dead service shows as a probe
  that times out rather than a refused connection;
* the **calls themselves**: a prediction that cannot reach the service marks it down at once
  (``mark_down``), one that is answered marks it up again (``mark_up``).

Each service is ``starting`` (has not answered since this worker started), ``up`` or ``down``
(answered before, not now). The readiness policy built on this lives in
:meth:`services.runtime.registry.Registry.ready` and docs/operations.md ("Readiness and failures").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

logger = logging.getLogger("servery")

Probe = Callable[[float], Awaitable[bool]]
"""``probe(timeout_s)``: True when the service answers its readiness check in time."""

PROBE_TIMEOUT_S = 1.0
"""A framework service answers ``/readyz`` from its event loop (predictions run off it), in
milliseconds even under load; a second without an answer means nothing is accepting."""


def probe_of(dependency: Any) -> Probe:
    """The probe of a ``bentoml.depends`` handle: its client's readiness check. A dependency
    served in-process (no ``is_ready``: not under ``bentoml serve``) always answers."""
    is_ready = getattr(dependency, "is_ready", None)

    async def probe(timeout_s: float) -> bool:
        if is_ready is None:
            return True
        return bool(await asyncio.wait_for(is_ready(timeout_s), timeout_s + 0.5))

    return probe


class ServiceHealth:
    """The last known state of each backing service, by name (``sklearn``, ..., ``llm``)."""

    def __init__(
        self,
        probes: Mapping[str, Probe],
        *,
        timeout_s: float = PROBE_TIMEOUT_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._probes = dict(probes)
        self.timeout_s = timeout_s
        self._clock = clock
        self._answered: set[str] = set()  # answered at least once since this worker started
        self._down: dict[str, str] = {}  # answered before, unreachable now: why, since when
        self._listeners: list[Callable[[], None]] = []

    def on_change(self, listener: Callable[[], None]) -> None:
        """Call ``listener()`` whenever a service's :meth:`problem` changes (first answer, down,
        up again): the registry republishes ``servery_model_ready`` from it."""
        self._listeners.append(listener)

    def _changed(self) -> None:
        for listener in self._listeners:
            listener()

    def problem(self, service: str) -> str | None:
        """Why ``service`` cannot answer now (None: it can, as far as this worker knows)."""
        if not self._down and service in self._answered:  # the common case, two lookups
            return None
        why = self._down.get(service)
        if why is not None:
            return why
        if service not in self._answered:
            return f"the {service} service has not answered since the router started"
        return None

    def started(self, services: Iterable[str]) -> bool:
        """Whether each of ``services`` has answered at least once (it may be down since)."""
        return all(s in self._answered for s in services)

    def down(self, service: str) -> str | None:
        """Why ``service`` is known to be down (None: up, or not answered yet)."""
        return self._down.get(service) if self._down else None

    def mark_up(self, service: str) -> None:
        if not self._down and service in self._answered:  # every answered call: nothing new
            return
        first = service not in self._answered
        self._answered.add(service)
        back = self._down.pop(service, None) is not None
        if back:
            logger.warning("the %s service answers again", service)
        if first or back:
            self._changed()

    def mark_down(self, service: str, cause: str) -> None:
        """Record that ``service`` was not reached (one that never answered stays starting)."""
        if service not in self._answered or service in self._down:
            return
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self._clock()))
        self._down[service] = f"the {service} service is not reachable since {when} ({cause})"
        logger.error("the %s service is not reachable (%s)", service, cause)
        self._changed()

    async def probe(self, services: Iterable[str]) -> None:
        """Probe ``services`` concurrently and record what they answered."""
        names = [s for s in services if s in self._probes]
        results = await asyncio.gather(
            *(self._probes[s](self.timeout_s) for s in names), return_exceptions=True
        )
        for name, ok in zip(names, results, strict=True):
            if ok is True:
                self.mark_up(name)
            else:
                cause = "not ready" if ok is False else f"probe failed: {type(ok).__name__}"
                self.mark_down(name, cause)

    async def watch(
        self,
        services: Callable[[], Iterable[str]],
        interval_s: float,
        fast_interval_s: float = 0.5,
    ) -> None:
        """Probe what ``services()`` names now and every interval (forever)."""
        while True:
            names = list(services())
            with contextlib.suppress(Exception):  # the watcher outlives anything one probe does
                await self.probe(names)
            calm = self.started(names) and not any(n in self._down for n in names)
            await asyncio.sleep(interval_s if calm else min(interval_s, fast_interval_s))
