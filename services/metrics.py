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
