"""The fast path's request timeout: one loop timer for every request in flight
(:class:`Deadlines`, used by services/gateway/fastpath.py)."""

from __future__ import annotations

import asyncio
from typing import Any


class Deadlines:
    """The request timeout of every fast-path request, kept by one loop timer.

    ``asyncio.timeout`` arms a loop timer per request and cancels it when the request ends: a
    profile of a router worker at c=64 put that at ~3.5 % of its CPU (Timeout.__aenter__/__aexit__,
    reschedule), ~5-7 us of the ~200 us a request costs. Every request here has the same timeout,
    so deadlines come due in the order requests arrived: they are kept in an insertion-ordered
    dict (task -> deadline), and one timer, armed for the oldest deadline, cancels the tasks whose
    deadline has passed, then re-arms for the next one but no sooner than ``tick_s`` later. A
    request is thus cancelled between ``timeout_s`` and ``timeout_s + tick_s`` after it started.
    ``tick_s`` defaults to a two-hundredth of the timeout (at most 1 s): BentoML's client gives a
    framework service 1 % more than its traffic timeout (the same setting), so a request stuck in
    a hung service still ends here with a 504 ``timeout``, before the client gives up (503).

    The cancellation is told apart from any other (server shutdown) as ``asyncio.timeout`` does:
    the task's cancel count at arming, and ``Task.uncancel`` when the request ends.
    """

    def __init__(self, timeout_s: float, tick_s: float | None = None) -> None:
        self.timeout_s = timeout_s
        # 0.5 % of the timeout, between 1 ms (uvloop's timer resolution) and 1 s: 0.3 s for 60 s
        self.tick_s = min(1.0, max(0.001, timeout_s / 200)) if tick_s is None else tick_s
        # task -> (deadline, its cancel count when armed); insertion order is deadline order
        self._due: dict[asyncio.Task[Any], tuple[float, int]] = {}
        # tasks this timeout cancelled -> their cancel count when armed
        self._expired: dict[asyncio.Task[Any], int] = {}
        self._timer: asyncio.TimerHandle | None = None

    def __len__(self) -> int:
        """Requests whose timeout is running."""
        return len(self._due)

    def arm(self) -> asyncio.Task[Any]:
        """Start the current task's timeout; returns the task (for :meth:`end`)."""
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("Deadlines.arm runs inside a task")
        loop = task.get_loop()
        due = loop.time() + self.timeout_s
        self._due[task] = (due, task.cancelling())
        if self._timer is None:
            self._timer = loop.call_at(due, self._check, loop)
        return task

    def end(self, task: asyncio.Task[Any], cancelled: bool) -> bool:
        """End ``task``'s timeout; True when its deadline cancelled it and nothing else did.

        ``cancelled``: the request ended with ``CancelledError``. When True is returned, that
        error was this timeout's and is consumed: answer the timeout instead of re-raising."""
        self._due.pop(task, None)
        if not self._due and self._timer is not None:
            self._timer.cancel()  # nothing in flight: no timer (the next arm starts one)
            self._timer = None
        cancelling = self._expired.pop(task, None)
        if cancelling is None:
            return False
        # our cancel request is withdrawn either way; any other one (shutdown) still stands
        return task.uncancel() <= cancelling and cancelled

    def _check(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        now = loop.time()
        while self._due:
            task, (due, cancelling) = next(iter(self._due.items()))
            if due > now:
                self._timer = loop.call_at(max(due, now + self.tick_s), self._check, loop)
                return
            del self._due[task]
            self._expired[task] = cancelling
            task.cancel()
