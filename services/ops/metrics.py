"""servery's own Prometheus metrics, merged by BentoML into the entry service's ``/metrics``.

Defined at module level: ``bentoml serve`` hands ``PROMETHEUS_MULTIPROC_DIR`` to each worker before
it imports the service module, and creating them per instance raised DuplicateTimeseries
(docs/internals/stack.md). Label values are served model names and versions only, so cardinality is
bounded by the
model config; unknown names are counted under ``model="_unknown"``.

Per served version the children are resolved once, at load (:class:`RequestMetrics`,
:class:`BatchMetrics`): a multiprocess write takes prometheus_client's one global lock and writes
an mmap (~1-2 us), and ``.labels()`` costs about as much again, so the hot path pays for
per-request series (count, end-to-end time) per request and for everything else once per batch.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from bisect import bisect_left
from collections.abc import Sequence
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)

BATCH_SIZE = Histogram(
    "servery_batch_size",
    "Rows per model call made by the router's micro-batcher",
    ["model", "version", "placement"],
    buckets=BATCH_BUCKETS,
)
BATCH_REQUESTS = Histogram(
    "servery_batch_requests",
    "Requests merged into one model call by the router's micro-batcher",
    ["model", "version", "placement"],
    buckets=BATCH_BUCKETS,
)
FLUSH_REASONS = ("tick", "full", "hold_ended", "hold_alone")
"""Why the micro-batcher (services/runtime/batcher.py) flushed: ``tick``, the next loop turn (no
hold); ``full``, a hold cut short by ``max_batch_size`` rows waiting; ``hold_ended``, a hold that
ran out or saw as many requests as the previous batch come back, with company; ``hold_alone``, a
hold that gathered nobody (wasted: the back-off follows)."""

BATCH_FLUSHES = Counter(
    "servery_batch_flushes",
    "Micro-batcher flushes by reason: tick (the next event-loop turn, no hold), full (a hold cut "
    "short by max_batch_size rows), hold_ended (a hold that ended with company), hold_alone (a "
    "hold that gathered nobody)",
    ["model", "version", "placement", "reason"],
)
BATCH_HOLD_SECONDS = Histogram(
    "servery_batch_hold_seconds",
    "How long each micro-batcher hold waited for company before its flush (SERVERY_BATCH_HOLD_MS)",
    ["model", "version", "placement"],
    buckets=(0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1),
)
BATCH_SHED = Counter(
    "servery_batch_shed",
    "Requests refused at once (503) because the model version's micro-batcher queue was full "
    "(max_queue)",
    ["model", "version", "placement"],
)
REQUESTS = Counter(
    "servery_requests",
    "Prediction requests answered by the router, by model, version and HTTP status",
    ["model", "version", "status"],
)

UNKNOWN_MODEL = "_unknown"

SECONDS_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
)  # fmt: skip
"""Latency buckets from 100 us (an inline model's whole request) to 10 s."""

MODEL_REQUEST_SECONDS = Histogram(
    "servery_model_request_duration_seconds",
    "End-to-end time of prediction requests (/predict, OIP REST and gRPC) in the router's "
    'handler, by model and version (model="_unknown" when none was resolved)',
    ["model", "version"],
    buckets=SECONDS_BUCKETS,
)
MODEL_COMPUTE_SECONDS = Histogram(
    "servery_model_compute_seconds",
    "Time of each model call (one micro-batch): inline in the router, or the call to the "
    "framework service",
    ["model", "version", "placement"],
    buckets=SECONDS_BUCKETS,
)
QUEUE_WAIT_SECONDS = Histogram(
    "servery_queue_wait_seconds",
    "Per request, time from entering the micro-batcher to the start of the model call that "
    "carries it",
    ["model", "version", "placement"],
    buckets=SECONDS_BUCKETS,
)
IN_FLIGHT = Gauge(
    "servery_in_flight_requests",
    "Requests admitted to a model version's micro-batcher and not answered yet (sampled at "
    "every batch; 0 when idle)",
    ["model", "version"],
    multiprocess_mode="livesum",
)
QUEUE_DEPTH = Gauge(
    "servery_queue_depth",
    "Requests waiting in a model version's micro-batcher for a model call (sampled when a batch "
    "is taken; 0 when idle)",
    ["model", "version"],
    multiprocess_mode="livesum",
)
MODEL_READY = Gauge(
    "servery_model_ready",
    "1 when the router worker can serve some version of the model, 0 when not (nothing loaded, "
    "or its framework service unreachable); the minimum over workers",
    ["model"],
    multiprocess_mode="livemin",
)
REQUEST_SECONDS = Histogram(
    "servery_request_duration_seconds",
    "End-to-end time of prediction requests on the router's fast path, by route",
    ["route"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)

GC_PAUSE_SECONDS = Histogram(
    "servery_gc_pause_seconds",
    "Time the router worker spent in each garbage collection, by generation",
    ["generation"],
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
)


GC_FLUSH_INTERVAL_S = 1.0


def watch_gc(flush_interval_s: float = GC_FLUSH_INTERVAL_S) -> None:
    """Record every collection's pause in ``servery_gc_pause_seconds`` (idempotent).

    A stop-the-world collection stalls every request of the worker; this shows whether pauses grow
    with the number of requests served (they should not: the heap is frozen after start-up, see
    services.ops.heap.freeze_heap).

    The GC callback only appends to a deque; a daemon thread moves the pauses into the histogram
    every ``flush_interval_s``. Observing from the callback deadlocked workers: a collection runs
    inside whatever allocated, including prometheus_client's multiprocess value code while it
    holds its one global, non-reentrant lock (``prometheus_client/values.py``, ``inc``/``set``
    and new label children), and the callback's ``observe`` then waited on that lock forever (a
    router worker froze in CI; ``tests/unit/test_metrics.py`` reproduces it).
    """
    import gc
    import threading
    import time
    from collections import deque

    if any(getattr(cb, "__servery_gc__", False) for cb in gc.callbacks):
        return
    children = [GC_PAUSE_SECONDS.labels(str(g)) for g in range(3)]
    started = [0.0]
    pauses: deque[tuple[int, float]] = deque(maxlen=100_000)

    def on_gc(phase: str, info: dict[str, int]) -> None:
        # no locks, no metrics here: see the docstring
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            pauses.append((info["generation"], time.perf_counter() - started[0]))

    def flush() -> None:
        while pauses:
            generation, seconds = pauses.popleft()
            children[generation].observe(seconds)

    def flush_forever() -> None:
        while True:
            time.sleep(flush_interval_s)
            flush()

    on_gc.__servery_gc__ = True  # type: ignore[attr-defined]
    on_gc.flush = flush  # type: ignore[attr-defined]
    gc.callbacks.append(on_gc)
    threading.Thread(target=flush_forever, name="servery-gc-metrics", daemon=True).start()


def flush_gc() -> None:
    """Move the pauses recorded so far into the histogram now (tests; the thread does it too)."""
    import gc

    for cb in gc.callbacks:
        if getattr(cb, "__servery_gc__", False):
            cb.flush()


SHADOW_REQUESTS = Counter(
    "servery_shadow_requests",
    "Copies of routed requests sent to a model's shadow version, by outcome: agree/disagree "
    "(same predicted classes as the answer returned or not), error, dropped (too many in flight)",
    ["model", "version", "outcome"],
)
RELOADS = Counter(
    "servery_reloads",
    "Model reloads by router workers (ok, or failed: some model kept its previous versions)",
    ["outcome"],
)
LOAD_FAILURES = Counter(
    "servery_model_load_failures",
    "Model versions that failed to load (the previous version kept serving)",
    ["model", "version"],
)

LLM_REQUESTS = Counter(
    "servery_llm_requests",
    "OpenAI API requests proxied by the router to the LLM service, by model as sent (an LLM, "
    "task, RAG app or LoRA adapter, NAME@ALIAS included; _unknown: a name never served) and "
    "HTTP status (499: the client went away before the answer started)",
    ["model", "status"],
)
LLM_SECONDS = Histogram(
    "servery_llm_request_duration_seconds",
    "Time from request to the last streamed byte of OpenAI API requests, by model as sent",
    ["model"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0),
)


# --- per-version children, resolved once ---------------------------------------------------------


class RequestMetrics:
    """Per-request series of one served version: ``servery_requests_total`` and
    ``servery_model_request_duration_seconds``; the handlers call :meth:`answered` once."""

    __slots__ = ("_ok", "_seconds", "model", "version")

    def __init__(self, model: str, version: str, *, eager: bool = True) -> None:
        self.model = model
        self.version = version
        # Eager children also create the series at 0 when the version loads, so rate() has a
        # starting point; the _unknown ones appear only once such an error happens.
        self._ok = REQUESTS.labels(model, version, "200") if eager else None
        self._seconds = MODEL_REQUEST_SECONDS.labels(model, version) if eager else None

    def answered(self, status: int, seconds: float) -> None:
        """Count one answered request with its HTTP(-equivalent) status and end-to-end time."""
        if status == 200 and self._ok is not None:
            self._ok.inc()
        else:
            REQUESTS.labels(self.model, self.version, str(status)).inc()
        child = self._seconds
        if child is None:
            child = MODEL_REQUEST_SECONDS.labels(self.model, self.version)
        child.observe(seconds)


UNKNOWN_REQUESTS = RequestMetrics(UNKNOWN_MODEL, "", eager=False)
"""Requests that failed before a model version was resolved (bad body, unknown model, ...)."""


class BatchMetrics:
    """Micro-batcher series of one served version (services/runtime/batcher.py calls :meth:`called`
    and
    :meth:`batch` per model call): batch size and requests per batch, compute time, queue wait;
    and the in-flight and queue-depth gauges, sampled off the hot path (:func:`sample_gauges`)."""

    __slots__ = (
        "__weakref__",
        "_batcher",
        "_compute",
        "_depth",
        "_flushes",
        "_gauges",
        "_hold",
        "_in_flight",
        "_requests",
        "_rows",
        "_shed",
        "_wait",
    )

    def __init__(self, model: str, version: str, placement: str) -> None:
        # every reason's series exists from the load on, so rate() and ratios have a start
        self._flushes = {
            r: BATCH_FLUSHES.labels(model, version, placement, r) for r in FLUSH_REASONS
        }
        self._hold = BATCH_HOLD_SECONDS.labels(model, version, placement)
        self._shed = BATCH_SHED.labels(model, version, placement)
        self._rows = BATCH_SIZE.labels(model, version, placement)
        self._requests = BATCH_REQUESTS.labels(model, version, placement)
        self._compute = MODEL_COMPUTE_SECONDS.labels(model, version, placement)
        self._wait = QUEUE_WAIT_SECONDS.labels(model, version, placement)
        self._in_flight = IN_FLIGHT.labels(model, version)
        self._depth = QUEUE_DEPTH.labels(model, version)
        self._gauges = (0, 0)
        self._batcher: weakref.ref[Any] | None = None

    def batch(self, rows: int, requests: int) -> None:
        """A model call answered ``requests`` requests with ``rows`` rows."""
        self._rows.observe(rows)
        self._requests.observe(requests)

    def flushed(self, reason: str) -> None:
        """The batcher flushed its queue, for ``reason`` (one of ``FLUSH_REASONS``)."""
        self._flushes[reason].inc()

    def held(self, seconds: float) -> None:
        """A hold ended after ``seconds``."""
        self._hold.observe(seconds)

    def shed(self) -> None:
        """A request was refused: the queue was full."""
        self._shed.inc()

    def called(self, seconds: float, waits: Sequence[float]) -> None:
        """A model call took ``seconds``; its requests had waited ``waits`` for it."""
        self._compute.observe(seconds)
        observe_many(self._wait, waits)

    def watch(self, batcher: Any) -> None:
        """Sample ``batcher.queued`` (in flight) and ``batcher.waiting`` (queue depth) into the
        gauges every :data:`GAUGE_INTERVAL_S` while it lives (then both go to 0)."""
        self._batcher = weakref.ref(batcher)
        with _watched_lock:
            _watched.append(self)
        _start_sampler()

    def gauges(self, in_flight: int, depth: int) -> None:
        """Set the in-flight and queue-depth gauges (only what changed is written)."""
        old_in_flight, old_depth = self._gauges
        if in_flight == old_in_flight and depth == old_depth:
            return
        self._gauges = (in_flight, depth)
        if in_flight != old_in_flight:
            self._in_flight.set(in_flight)
        if depth != old_depth:
            self._depth.set(depth)


GAUGE_INTERVAL_S = 0.5
"""How often ``servery_in_flight_requests`` and ``servery_queue_depth`` are sampled."""

_watched: list[BatchMetrics] = []
_watched_lock = threading.Lock()
_sampler: list[threading.Thread] = []


def sample_gauges() -> None:
    """Write every watched batcher's in-flight and queue depth now (the sampler thread does it
    every :data:`GAUGE_INTERVAL_S`; tests call it directly).

    Sampling instead of counting each request in and out keeps gauge writes (a lock and an mmap
    write each) off the request path; a sample is at most :data:`GAUGE_INTERVAL_S` old, far less
    than any scrape interval. Reading two ints of a batcher another thread mutates is safe under
    the GIL; a version unloaded (its batcher gone) is set to 0 and forgotten.
    """
    with _watched_lock:
        watched = list(_watched)
    gone = []
    for bm in watched:
        batcher = bm._batcher() if bm._batcher is not None else None
        if batcher is None:
            bm.gauges(0, 0)
            gone.append(bm)
        else:
            bm.gauges(batcher.queued, batcher.waiting)
    if gone:
        with _watched_lock:
            _watched[:] = [bm for bm in _watched if bm not in gone]


def _start_sampler() -> None:
    with _watched_lock:
        if _sampler:
            return

        def sample_forever() -> None:
            while True:
                time.sleep(GAUGE_INTERVAL_S)
                try:
                    sample_gauges()
                except Exception:  # the thread must outlive any one failed write
                    logging.getLogger("servery").exception("sampling batcher gauges failed")

        thread = threading.Thread(target=sample_forever, name="servery-gauges", daemon=True)
        _sampler.append(thread)
        thread.start()


def observe_many(child: Histogram, values: Sequence[float]) -> None:
    """``child.observe(v)`` for every value, in one write per bucket hit plus one for the sum.

    A batch's requests waited about as long as each other, so they mostly share a bucket: a batch
    of 32 costs 2-3 multiprocess writes instead of 64. Relies on the child's ``_upper_bounds``,
    ``_buckets`` and ``_sum`` (prometheus_client 0.26, as ``Histogram.observe`` uses them); falls
    back to plain observes if those ever change.
    """
    if len(values) == 1:
        child.observe(values[0])
        return
    try:
        bounds = child._upper_bounds  # type: ignore[attr-defined]
        buckets = child._buckets  # type: ignore[attr-defined]
        total = child._sum  # type: ignore[attr-defined]
    except AttributeError:
        for v in values:
            child.observe(v)
        return
    counts: dict[int, int] = {}
    for v in values:
        i = bisect_left(bounds, v)  # the first bound >= v, as observe() picks it (last: +Inf)
        counts[i] = counts.get(i, 0) + 1
    total.inc(sum(values))
    for i, n in counts.items():
        buckets[i].inc(n)


_ready: dict[str, bool | None] = {}


def set_model_ready(model: str, ready: bool | None) -> None:
    """Set ``servery_model_ready{model}`` in this process (written only when it changes).

    ``None``: the name is no longer configured. Multiprocess series cannot be removed, so it reads
    NaN: neither ready nor an outage (``== 0`` alerts stay quiet for a model taken out on purpose).
    """
    if model not in _ready or _ready[model] is not ready:
        _ready[model] = ready
        MODEL_READY.labels(model).set(float("nan") if ready is None else 1 if ready else 0)
