"""Batch jobs' series in ``/metrics`` (the consumers' sweeps set the gauges)."""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import Counter, Gauge

STATUSES = ("validating", "in_progress", "finalizing", "cancelling")

JOBS = Gauge(
    "servery_batch_jobs",
    "Batches not ended yet, by status (as the last sweep of a consumer saw them)",
    ["status"],
    multiprocess_mode="livemax",
)
FINISHED = Counter(
    "servery_batch_jobs_finished_total",
    "Batches ended, by how (completed, cancelled, expired, failed)",
    ["status"],
)
LINES = Counter(
    "servery_batch_lines_total",
    "Batch lines answered, by outcome (completed: a 2xx answer in the output file; failed: "
    "an entry in the error file)",
    ["outcome"],
)
LINE_CALLS = Counter(
    "servery_batch_line_calls_total",
    "Requests batch lines made to the router's handlers (retries included): what the "
    "consumers subtract from servery_requests_total to see online traffic",
)
RETRIES = Counter(
    "servery_batch_line_retries_total",
    "Line attempts that met a transient failure (429, 502-504, a connection error) and were "
    "retried",
)
QUEUE = Gauge(
    "servery_batch_queue_chunks",
    "Chunks (SERVERY_BATCH_CHUNK_LINES lines each) waiting in the queue",
    multiprocess_mode="livemax",
)
WAITING_LINES = Gauge(
    "servery_batch_waiting_lines",
    "Lines of running batches not answered yet",
    multiprocess_mode="livemax",
)
OLDEST = Gauge(
    "servery_batch_oldest_waiting_seconds",
    "Age of the oldest batch not ended yet (0: none)",
    multiprocess_mode="livemax",
)


def observe_queue(batches: Any, by_status: dict[str, int]) -> None:
    """Set the gauges from the queue and the active batches (after a sweep)."""
    jobs = batches.jobs
    for status in STATUSES:
        JOBS.labels(status).set(by_status.get(status, 0))
    QUEUE.set(batches.huey.pending_count())
    oldest, waiting = None, 0
    for batch_id in jobs.state.zmembers("active"):
        rec = jobs.record(batch_id)
        if rec is None:
            continue
        oldest = rec["created_at"] if oldest is None else min(oldest, rec["created_at"])
        waiting += rec["request_counts"]["total"] - jobs.state.hlen("res:" + batch_id)
    WAITING_LINES.set(waiting)
    OLDEST.set(0 if oldest is None else max(0.0, time.time() - oldest))
