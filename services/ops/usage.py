"""Usage per API key: requests, rows and LLM tokens, by key and model.

What is counted (``servery_usage_*_total``, and ``GET /v1/usage``):

* ``servery_usage_requests_total{key, model}``: requests answered successfully (status below
  400): predictions on every front end (``/predict``, OIP REST and gRPC, counted by
  :class:`services.runtime.inference.Call`) and OpenAI API calls that name a model (chat,
  completions, embeddings; counted by services/llm/usage_tap.py, RAG apps included);
* ``servery_usage_rows_total{key, model}``: rows those predictions carried;
* ``servery_usage_tokens_total{key, model, kind}``: ``prompt`` and ``completion`` tokens as the
  engine counted them (vLLM's ``usage``; the RAG service's for embeddings).

Labels stay bounded: ``key`` is a key's name from the keys file or ``SERVERY_API_KEYS`` (``-``
when keys are off), ``model`` a served model's name from the config: only requests that a served
model answered are counted, and past :data:`MAX_MODELS` distinct names a worker counts the rest
under ``_unknown`` (a safety net; config names never get there).

Counting is off the hot path's cost: :class:`Tally` adds to plain integers and writes the
Prometheus series (a lock and an mmap write each, in multiprocess mode) once per
:data:`FLUSH_INTERVAL_S` per worker, from a loop timer armed by the first count. Counts reach
``/metrics`` and ``/v1/usage`` within that interval.

:func:`report` reads the counters summed over every router worker (prometheus_client's
multiprocess files, as ``/metrics`` does) for ``GET /v1/usage``.
"""

from __future__ import annotations

import asyncio
import glob
import os
import time
from collections.abc import Callable, Container
from typing import Any

from prometheus_client import REGISTRY, Counter

OPEN = "-"
"""The ``key`` label when API keys are off."""

UNKNOWN_MODEL = "_unknown"
MAX_MODELS = 256
"""Distinct model labels one worker counts; more are counted as :data:`UNKNOWN_MODEL`."""

FLUSH_INTERVAL_S = 1.0

REQUESTS = Counter(
    "servery_usage_requests",
    "Requests answered successfully, by API key name ('-': keys off) and model: predictions on "
    "every front end and OpenAI API calls naming a model",
    ["key", "model"],
)
ROWS = Counter(
    "servery_usage_rows",
    "Rows predicted, by API key name ('-': keys off) and model",
    ["key", "model"],
)
TOKENS = Counter(
    "servery_usage_tokens",
    "LLM tokens as the engine counted them, by API key name ('-': keys off), model and kind "
    "(prompt, completion)",
    ["key", "model", "kind"],
)

_FIELDS = ("requests", "rows", "prompt_tokens", "completion_tokens")


class Tally:
    """Usage counts of one worker, added in memory and written to the Prometheus series at most
    once per ``interval_s`` (a timer on the running event loop; at once outside a loop)."""

    def __init__(self, interval_s: float = FLUSH_INTERVAL_S) -> None:
        self.interval_s = interval_s
        self._pending: dict[tuple[str, str], list[int]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._models: set[str] = set()
        self._children: dict[tuple[str, str, int], Any] = {}

    def add(
        self,
        key: str,
        model: str,
        *,
        requests: int = 1,
        rows: int = 0,
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
    ) -> None:
        """Count ``requests`` answered for ``key`` by ``model`` with their rows and tokens."""
        if model not in self._models:
            if len(self._models) >= MAX_MODELS:
                model = UNKNOWN_MODEL
            self._models.add(model)
        counts = self._pending.get((key, model))
        if counts is None:
            counts = self._pending[(key, model)] = [0, 0, 0, 0]
        counts[0] += requests
        counts[1] += rows
        counts[2] += prompt_tokens
        counts[3] += completion_tokens
        if self._timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self.flush()
                return
            self._timer = loop.call_later(self.interval_s, self.flush)

    def flush(self) -> None:
        """Write what was counted since the last flush to the Prometheus series."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        pending, self._pending = self._pending, {}
        for (key, model), counts in pending.items():
            for field, n in enumerate(counts):
                if n:
                    self._child(key, model, field).inc(n)

    def _child(self, key: str, model: str, field: int) -> Any:
        child = self._children.get((key, model, field))
        if child is None:
            if field == 0:
                child = REQUESTS.labels(key, model)
            elif field == 1:
                child = ROWS.labels(key, model)
            else:
                child = TOKENS.labels(key, model, "prompt" if field == 2 else "completion")
            self._children[(key, model, field)] = child
        return child


TALLY = Tally()
"""This worker's usage counts."""


# --- reading the counts back ---------------------------------------------------------------------


def _samples(multiproc_dir: str | None) -> Any:
    """Every counter sample of this server: summed over the workers' multiprocess files when
    ``multiproc_dir`` is set (``bentoml serve``), else this process's registry."""
    if multiproc_dir:
        from prometheus_client.multiprocess import MultiProcessCollector

        files = glob.glob(os.path.join(multiproc_dir, "counter_*.db"))
        families = MultiProcessCollector.merge(files, accumulate=True)
    else:
        families = REGISTRY.collect()
    for family in families:
        if family.name in ("servery_usage_requests", "servery_usage_rows", "servery_usage_tokens"):
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    yield family.name, sample.labels, sample.value


def totals(multiproc_dir: str | None = None) -> dict[tuple[str, str], dict[str, int]]:
    """``{(key, model): {"requests", "rows", "prompt_tokens", "completion_tokens"}}`` over the
    whole server (this worker's pending counts flushed first)."""
    TALLY.flush()
    out: dict[tuple[str, str], dict[str, int]] = {}
    for name, labels, value in _samples(multiproc_dir):
        counts = out.setdefault((labels["key"], labels["model"]), dict.fromkeys(_FIELDS, 0))
        if name == "servery_usage_tokens":
            field = "prompt_tokens" if labels.get("kind") == "prompt" else "completion_tokens"
        else:
            field = "requests" if name == "servery_usage_requests" else "rows"
        counts[field] += int(value)
    return out


def report(
    keys: Container[str] | None,
    *,
    multiproc_dir: str | None = None,
    since: float,
    now: Callable[[], float] = time.time,
) -> dict[str, Any]:
    """``GET /v1/usage``'s answer for ``keys`` (None: every key), OpenAI-like: one page with one
    bucket (``since`` .. now: the counters run from the server's start) whose ``results`` are the
    usage of each key and model (OpenAI's usage API grouped by ``api_key_id`` and ``model``),
    with servery's ``rows`` beside the token counts."""
    results = [
        {
            "object": "usage.result",
            "api_key_id": key,
            "model": model,
            "num_model_requests": c["requests"],
            "rows": c["rows"],
            "input_tokens": c["prompt_tokens"],
            "output_tokens": c["completion_tokens"],
        }
        for (key, model), c in sorted(totals(multiproc_dir).items())
        if keys is None or key in keys
    ]
    return {
        "object": "page",
        "data": [
            {
                "object": "bucket",
                "start_time": int(since),
                "end_time": int(now()),
                "results": results,
            }
        ],
        "has_more": False,
        "next_page": None,
    }


def server_start() -> float:
    """When the counters started: the server's start under ``bentoml serve`` (the parent of
    the worker, which owns the multiprocess files and outlives restarted workers), else this
    process's start."""
    import psutil

    process = psutil.Process()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        parent = process.parent()
        if parent is not None:
            return float(parent.create_time())
    return float(process.create_time())
