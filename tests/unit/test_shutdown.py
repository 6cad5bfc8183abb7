"""services/ops/shutdown.py: SIGTERM postponed by the drain window, a second one goes through."""

from __future__ import annotations

import asyncio
import os
import signal
import time

from services.ops.shutdown import delay_sigterm
from tests.conftest import eventually_async


def test_sigterm_reaches_the_previous_handler_after_the_drain() -> None:
    calls: list[tuple[int, float]] = []
    original = signal.getsignal(signal.SIGTERM)

    def uvicorn_like(signum: int, frame: object) -> None:
        calls.append((signum, time.monotonic()))

    async def main() -> None:
        assert delay_sigterm(0.3)
        t0 = time.monotonic()
        # os.kill runs the Python handler of a signal sent to this process before it returns
        os.kill(os.getpid(), signal.SIGTERM)
        assert calls == []  # still serving: postponed, not delivered
        await eventually_async(lambda: calls, "the postponed SIGTERM", every=0.01)
        assert [s for s, _ in calls] == [signal.SIGTERM]
        assert calls[0][1] - t0 >= 0.29  # not before the drain was over
        # a second SIGTERM is not postponed: uvicorn's handler is back, and runs at once
        assert signal.getsignal(signal.SIGTERM) is uvicorn_like
        os.kill(os.getpid(), signal.SIGTERM)
        assert len(calls) == 2

    signal.signal(signal.SIGTERM, uvicorn_like)
    try:
        asyncio.run(main())
    finally:
        signal.signal(signal.SIGTERM, original)


def test_no_drain_or_no_handler_changes_nothing() -> None:
    original = signal.getsignal(signal.SIGTERM)

    async def main() -> tuple[bool, bool]:
        zero = delay_sigterm(0)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        default = delay_sigterm(5)  # nothing of Python's to postpone
        return zero, default

    try:
        assert asyncio.run(main()) == (False, False)
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    finally:
        signal.signal(signal.SIGTERM, original)
