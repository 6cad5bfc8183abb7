"""servery's own Prometheus metrics, merged by BentoML into the entry service's ``/metrics``.

Defined at module level: ``bentoml serve`` hands ``PROMETHEUS_MULTIPROC_DIR`` to each worker before
it imports the service module, and creating them per instance raised DuplicateTimeseries
(STACK.md). Label values are served model names and versions only, so cardinality is bounded by the
model config; unknown names are counted under ``model="_unknown"``.
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram

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
REQUESTS = Counter(
    "servery_requests",
    "Prediction requests answered by the router, by model, version and HTTP status",
    ["model", "version", "status"],
)

UNKNOWN_MODEL = "_unknown"
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
    services.patches.freeze_heap).

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
    "OpenAI API requests proxied by the router to the LLM service, by model (or task) as sent "
    "and HTTP status (499: the client went away before the answer started)",
    ["model", "status"],
)
LLM_SECONDS = Histogram(
    "servery_llm_request_duration_seconds",
    "Time from request to the last streamed byte of OpenAI API requests, by model as sent",
    ["model"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0),
)
