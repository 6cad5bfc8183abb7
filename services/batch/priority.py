"""Online requests first: how a batch consumer paces its lines while its worker serves online
traffic (services/batch/worker.py runs every line through :meth:`Priority.run`)."""

from __future__ import annotations

import asyncio
import glob
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

logger = logging.getLogger("servery.batch")

ONLINE = ("servery_requests_total", "servery_llm_requests_total")
"""The handlers' request counters (services/ops/metrics.py): online requests and batch lines."""
OURS = "servery_batch_line_calls_total"
"""What batch lines called (services/batch/metrics.py)."""


def counted() -> tuple[float, float]:
    """``(requests the handlers counted, calls batch lines made)`` so far, in every process of
    this server: the multiprocess files ``bentoml serve`` keeps its metrics in (a worker that
    takes no online request still sees its sibling's), else this process's own counters."""
    folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not folder:
        from services.batch import metrics
        from services.ops import metrics as ops

        def total(*counters: Any) -> float:
            return sum(
                s.value
                for c in counters
                for family in c.collect()
                for s in family.samples
                if s.name.endswith("_total")
            )

        return total(ops.REQUESTS, ops.LLM_REQUESTS), total(metrics.LINE_CALLS)
    from prometheus_client.mmap_dict import MmapedDict

    requests = calls = 0.0
    for path in glob.glob(os.path.join(folder, "counter_*.db")):
        try:
            values = MmapedDict.read_all_values_from_file(path)
        except (OSError, ValueError):  # a file being created or removed
            continue
        for entry in values:  # (key, value, timestamp, position)
            key, value = entry[0], entry[1]
            if OURS not in key and not any(name in key for name in ONLINE):
                continue  # most keys: skipped without parsing
            name = json.loads(key)[1]  # (metric, sample name, label names, values, help)
            if name == OURS:
                calls += value
            elif name in ONLINE:
                requests += value
    return requests, calls


class Priority:
    """Online requests first: while this server answers online prediction or LLM requests,
    batch lines run one at a time and pause after each, so that they take at most
    ``SERVERY_BATCH_BUSY_SHARE`` of the time; with no online traffic they run
    ``SERVERY_BATCH_CONCURRENCY`` at once, unpaced.

    Online traffic is what the server's ``servery_requests_total`` and
    ``servery_llm_requests_total`` counted beyond the calls batch lines made
    (``servery_batch_line_calls_total``; each line's call counts in the first two as well),
    read every :data:`WATCH_S` (:func:`counted`). Server-wide, not per worker: connections are
    not spread evenly over the workers, and a worker with no online connection would otherwise
    run lines unpaced on the CPUs the others serve online requests with."""

    WATCH_S = 0.2
    HOLD_S = 1.0
    """Busy until this long after the last online request seen."""

    def __init__(self, share: float) -> None:
        self.share = share
        self.busy = False
        self.lines = 0
        """Lines running now: the counters are read only while lines run (and for
        :data:`HOLD_S` after), so an idle server reads nothing."""
        self._line_at = -self.HOLD_S
        self._one = asyncio.Lock()

    @staticmethod
    def online() -> float:
        requests, calls = counted()
        return requests - calls

    async def watch(self) -> None:
        last: float | None = None
        seen_at = -self.HOLD_S
        while True:
            await asyncio.sleep(self.WATCH_S)
            if self.lines == 0 and time.monotonic() - self._line_at > self.HOLD_S:
                last = None  # no batch line for a while: nothing to pace, nothing to read
                continue
            try:
                now = await asyncio.to_thread(self.online)
            except Exception:  # unreadable counters: count it as online traffic, to be safe
                logger.exception("batch priority: could not read the request counters")
                seen_at = time.monotonic()
                self.busy = True
                continue
            # a stray count at the boundary of a line is not traffic
            if last is not None and now - last >= 2:
                seen_at = time.monotonic()
            last = now
            self.busy = time.monotonic() - seen_at < self.HOLD_S

    async def run(self, line: Callable[[], Awaitable[Any]]) -> Any:
        self.lines += 1
        try:
            if not self.busy or self.share >= 1:
                return await line()
            async with self._one:
                start = time.monotonic()
                out = await line()
                await asyncio.sleep((time.monotonic() - start) * (1 / self.share - 1))
                return out
        finally:
            self.lines -= 1
            self._line_at = time.monotonic()
