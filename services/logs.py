"""Request ids and structured (JSON) logs.

Request ids: the router takes a client's ``X-Request-ID`` (1-128 characters of
``A-Za-z0-9._:/+=@-``; anything else is replaced, so a hostile value never reaches a log line or a
header) or makes one (a per-process random prefix and a counter: unique, and far cheaper than a
UUID on the hot path), returns it in the response's ``X-Request-ID`` and puts it on every log line
written while the request is served (:data:`REQUEST_ID`, a context variable: each request runs in
its own task).

JSON logs (``SERVERY_LOG_FORMAT=json``; the Kubernetes manifests set it): every line a worker
writes through Python logging (BentoML, uvicorn, circus, servery) becomes one JSON object with
``time``, ``level``, ``logger``, ``component`` (BentoML's service:worker), ``message``,
``request_id`` when there is one, ``trace_id``/``span_id`` when OpenTelemetry tracing is on, and
the access-log fields of a request line (``method``, ``path``, ``status``, ``latency_ms``,
``model``, ``version``, ``client``). Serialised by python-json-logger (a BentoML dependency);
BentoML configures each worker's handlers before it imports the service, so :func:`configure`
swaps their formatter afterwards.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

from pythonjsonlogger.json import JsonFormatter as _JsonFormatter

HEADER = "x-request-id"
REQUEST_ID: ContextVar[str | None] = ContextVar("servery_request_id", default=None)
MODEL_KEY = "servery.model"
"""Scope key where the prediction handlers put ``(model, version)`` of their answer, for the
access line."""
ACCESS_FIELDS = "servery_access"
"""A log record's attribute holding an access line's fields (``extra={ACCESS_FIELDS: {...}}``)."""

_VALID = re.compile(rb"[A-Za-z0-9._:/+=@-]{1,128}")
_PREFIX = os.urandom(6).hex()
_COUNTER = itertools.count(1)
_HEADER_BYTES = HEADER.encode()


def new_id() -> str:
    """A request id unique across processes and restarts: random prefix, then a counter."""
    return f"{_PREFIX}{next(_COUNTER):06x}"


def request_id(headers: list[tuple[bytes, bytes]]) -> str:
    """The client's ``X-Request-ID`` from raw ASGI headers if well formed, else a new one."""
    for key, value in headers:
        if key == _HEADER_BYTES:
            if _VALID.fullmatch(value):
                return value.decode("ascii")
            break
    return new_id()


class RequestIdFilter(logging.Filter):
    """Puts the current request's id on each record (``record.servery_request_id``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        rid = REQUEST_ID.get()
        if rid is not None:
            record.servery_request_id = rid
        return True


class JsonFormatter(_JsonFormatter):
    """One JSON object per line: see the module docstring for the fields."""

    def add_fields(
        self, log_data: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]
    ) -> None:
        log_data["time"] = datetime.fromtimestamp(record.created, tz=UTC).isoformat(
            timespec="milliseconds"
        )
        log_data["level"] = record.levelname
        log_data["logger"] = record.name
        component = getattr(record, "component", None)
        if component:
            log_data["component"] = component.strip("[]")
        log_data["message"] = record.message
        rid = getattr(record, "servery_request_id", None)
        if rid is not None:
            log_data["request_id"] = rid
        access = getattr(record, ACCESS_FIELDS, None)
        if access:
            log_data.update(access)
        trace_id, span_id = _trace_ids()
        if trace_id:
            log_data["trace_id"] = trace_id
            log_data["span_id"] = span_id
        log_data.update(message_dict)  # exc_info, stack_info


def _trace_ids() -> tuple[str | None, str | None]:
    """The current OpenTelemetry span's ids (hex, as OTLP backends show them), if sampled."""
    from opentelemetry import trace

    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return None, None
    return format(ctx.trace_id, "032x"), format(ctx.span_id, "016x")


LOGGERS = ("", "bentoml", "uvicorn", "uvicorn.error", "uvicorn.access", "circus", "servery")


_STRUCTURED = [False]


def structured() -> bool:
    """Whether this process writes JSON lines (:func:`configure` with ``json``)."""
    return _STRUCTURED[0]


def configure(fmt: str) -> None:
    """Add the request-id filter to every handler of the server's loggers and, for ``json``,
    give them the JSON formatter (idempotent). Called at import of ``services``, after BentoML
    configured the worker's logging."""
    _STRUCTURED[0] = fmt == "json"
    seen: set[int] = set()
    for name in LOGGERS:
        for handler in logging.getLogger(name).handlers:
            if id(handler) in seen:
                continue
            seen.add(id(handler))
            if not any(isinstance(f, RequestIdFilter) for f in handler.filters):
                handler.addFilter(RequestIdFilter())
            if fmt == "json" and not isinstance(handler.formatter, JsonFormatter):
                handler.setFormatter(JsonFormatter())
