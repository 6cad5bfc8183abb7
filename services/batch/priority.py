"""Online requests first: how a batch consumer paces its lines while its worker serves online
traffic (services/batch/worker.py runs every line through :meth:`Priority.run`)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any


class Priority:
    """Online requests first: while this process answers online prediction or LLM requests,
    batch lines run one at a time and pause after each, so that they take at most
    ``SERVERY_BATCH_BUSY_SHARE`` of the time; with no online traffic they run
    ``SERVERY_BATCH_CONCURRENCY`` at once, unpaced.

    Online traffic is what this process's ``servery_requests_total`` and
    ``servery_llm_requests_total`` counted beyond the calls its batch lines made (each line's
    call counts there as well), read every :data:`WATCH_S`."""

    WATCH_S = 0.2
    HOLD_S = 1.0
    """Busy until this long after the last online request seen."""

    def __init__(self, share: float) -> None:
        self.share = share
        self.busy = False
        self.mine = 0
        """Calls this process's batch lines made (the watcher subtracts them)."""
        self._one = asyncio.Lock()

    @staticmethod
    def answered() -> float:
        """Requests this process's handlers counted so far (online and batch lines)."""
        from services.ops import metrics as ops

        total = 0.0
        for counter in (ops.REQUESTS, ops.LLM_REQUESTS):
            for family in counter.collect():
                total += sum(s.value for s in family.samples if s.name.endswith("_total"))
        return total

    async def watch(self) -> None:
        last = self.answered() - self.mine
        seen_at = -self.HOLD_S
        while True:
            await asyncio.sleep(self.WATCH_S)
            now = self.answered() - self.mine
            if now - last >= 2:  # a stray count at the boundary of a line is not traffic
                seen_at = time.monotonic()
            last = now
            self.busy = time.monotonic() - seen_at < self.HOLD_S

    async def run(self, line: Callable[[], Awaitable[Any]]) -> Any:
        if not self.busy or self.share >= 1:
            return await line()
        async with self._one:
            start = time.monotonic()
            out = await line()
            await asyncio.sleep((time.monotonic() - start) * (1 / self.share - 1))
            return out
