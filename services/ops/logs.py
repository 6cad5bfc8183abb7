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

Cost per line. With the access log on, every request writes a line, and Python logging's
per-record work was about 10 % of a router worker's CPU under load (py-spy, XGBoost OIP REST at
c=64). :func:`configure` trims what no configured format shows, along the logging HOWTO's
"Optimization" section: the caller's file and line are not looked up for access-log lines when
no handler's format asks for them (services/compat/log_caller_lookup.py); the time stamp
of a format with a seconds-resolution ``datefmt`` (BentoML's) is rendered once per second
(services/compat/log_time_stamps.py); and
the stream handlers hold access-log lines and write them out every ``SERVERY_LOG_FLUSH_MS``
(100 ms) from a thread, many lines per write, instead of a write (a system call) per line.
Any other line flushes them at once, and so do exit and SIGTERM (:func:`_flush_on_sigterm`); a
process killed by SIGKILL loses at most that interval of access lines. Writes stay whole lines
of at most 4096 bytes, so workers sharing a stdout pipe never cut each other's lines.
``SERVERY_LOG_FLUSH_MS=0`` flushes every
line. Measured on one record of the access line's shape: 12.8 -> 7.3 us.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import signal
import threading
import time
import weakref
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

from pythonjsonlogger.json import JsonFormatter as _JsonFormatter

from services.compat.log_caller_lookup import skip_caller_lookup
from services.compat.log_time_stamps import cache_seconds

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
    """Puts the current request's id on each record (``record.servery_request_id``), and escapes
    what clients wrote into access lines.

    Access lines quote the client's path (decoded: ``%0A`` is a newline), content type and gRPC
    model name; written as they are, a request could forge whole log lines. Their string
    arguments that are not printable are escaped (:func:`printable`) for text and JSON logs
    alike; ``str.isprintable`` keeps the common case to one C call per argument."""

    def filter(self, record: logging.LogRecord) -> bool:
        rid = REQUEST_ID.get()
        if rid is not None:
            record.servery_request_id = rid
        args = record.args
        if record.name == ACCESS_LOGGER and type(args) is tuple:
            for a in args:
                if type(a) is str and not a.isprintable():
                    record.args = tuple(printable(a) if type(a) is str else a for a in args)
                    break
        return True


def printable(text: str) -> str:
    """``text`` with every character that is not printable written as a Python escape
    (``\\n``, ``\\x1b``, ``\\u2028``); printable text is returned as it is."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


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


def configure(fmt: str, flush_interval_s: float = 0.0) -> None:
    """Add the request-id filter to every handler of the server's loggers and, for ``json``,
    give them the JSON formatter; with ``flush_interval_s`` > 0, their plain stream handlers
    write access-log lines out on that interval (:class:`DeferredFlushHandler`); then stop
    looking up record fields no format shows (idempotent). Called at import of ``services``,
    after BentoML configured the worker's logging."""
    _STRUCTURED[0] = fmt == "json"
    seen: set[int] = set()
    replaced: dict[int, logging.Handler] = {}  # one handler may serve several loggers
    for name in LOGGERS:
        logger = logging.getLogger(name)
        for i, handler in enumerate(logger.handlers):
            if flush_interval_s > 0 and type(handler) is logging.StreamHandler:
                if id(handler) not in replaced:
                    replaced[id(handler)] = _deferred(handler, flush_interval_s)
                handler = logger.handlers[i] = replaced[id(handler)]
            if id(handler) in seen:
                continue
            seen.add(id(handler))
            if not any(isinstance(f, RequestIdFilter) for f in handler.filters):
                handler.addFilter(RequestIdFilter())
            if fmt == "json" and not isinstance(handler.formatter, JsonFormatter):
                handler.setFormatter(JsonFormatter())
            cache_seconds(handler.formatter)
    skip_caller_lookup(
        logging.getLogger(ACCESS_LOGGER),
        [h.formatter for h in _handlers()],
        caller_free=(JsonFormatter,),  # its fields: no caller
    )


def _handlers() -> list[logging.Handler]:
    return [h for name in (*LOGGERS, ACCESS_LOGGER) for h in logging.getLogger(name).handlers]


class DeferredFlushHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stream handler that holds access-log lines (:data:`ACCESS_LOGGER`, below WARNING) and
    writes them out every ``interval_s`` (a background thread); any other line, or
    :data:`MAX_HELD` lines waiting, writes them out at once, followed by that line.

    Lines go out in writes of whole lines of at most :data:`ATOMIC_WRITE` bytes: every worker
    of a server shares one stdout pipe, and Linux keeps a pipe write from mixing with another
    process's only up to ``PIPE_BUF`` (4096) bytes, so a larger write could be cut mid-line by
    another worker's. Written here because the standard library's buffering handler
    (``MemoryHandler``) keeps records, not text: its target still formats and flushes each one."""

    def __init__(self, stream: Any, interval_s: float) -> None:
        super().__init__(stream)
        self.interval_s = interval_s
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.lines.append(self.format(record) + self.terminator)
            if (
                record.name != ACCESS_LOGGER
                or record.levelno >= logging.WARNING
                or len(self.lines) >= MAX_HELD
            ):
                self.flush()
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)

    def flush(self) -> None:
        """Write out every held line (also what ``logging.shutdown`` calls at exit)."""
        with self.lock:  # type: ignore[union-attr]
            lines, self.lines = self.lines, []
            chunk: list[str] = []
            size = 0
            for line in lines:
                n = len(line) if line.isascii() else len(line.encode())
                if chunk and size + n > ATOMIC_WRITE:
                    self._write("".join(chunk))
                    chunk, size = [], 0
                chunk.append(line)
                size += n
            if chunk:
                self._write("".join(chunk))
            elif self.stream and hasattr(self.stream, "flush"):
                self.stream.flush()

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()

    def flush_pending(self) -> None:
        if self.lines:
            self.flush()


ACCESS_LOGGER = "bentoml.access"
"""The one logger whose lines are held: a line per request. Lifecycle and error lines are not
(they are few, and a process that dies should leave its last words)."""

MAX_HELD = 1024
"""Lines held at most: past it the emitting thread writes them out itself (bounded memory, also
if the flusher thread is starved)."""

ATOMIC_WRITE = 4096
"""``PIPE_BUF`` on Linux: the largest pipe write that never interleaves with other writers'."""


_DEFERRED: weakref.WeakSet[DeferredFlushHandler] = weakref.WeakSet()
_FLUSHER: list[threading.Thread] = []


def _deferred(handler: logging.StreamHandler, interval_s: float) -> DeferredFlushHandler:  # type: ignore[type-arg]
    """``handler``'s replacement: same stream, level, formatter and filters."""
    new = DeferredFlushHandler(handler.stream, interval_s)
    new.setLevel(handler.level)
    new.setFormatter(handler.formatter)
    for f in handler.filters:
        new.addFilter(f)
    new.set_name(handler.get_name())  # type: ignore[arg-type]
    _DEFERRED.add(new)
    if not _FLUSHER:
        thread = threading.Thread(target=_flush_forever, name="servery-log-flush", daemon=True)
        _FLUSHER.append(thread)
        thread.start()
        _flush_on_sigterm()
    return new


def flush_all() -> None:
    """Write out the lines every :class:`DeferredFlushHandler` of this process holds."""
    for handler in list(_DEFERRED):
        try:
            handler.flush_pending()
        except Exception:  # a closed stream at exit: nothing left to write
            pass


def _flush_on_sigterm() -> None:
    """Write out held lines before SIGTERM's default action ends the process.

    uvicorn (0.29+) shuts down gracefully on SIGTERM, then restores the handler it found and
    raises the signal again, so a worker dies by SIGTERM's default action: no ``atexit``, no
    ``logging.shutdown``, and held lines would be lost. Installed only where SIGTERM has its
    default action (in the main thread); the process still ends by the signal, as before."""
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return

    def flush_then_die(signum: int, frame: Any) -> None:
        flush_all()
        signal.signal(signum, signal.SIG_DFL)
        signal.raise_signal(signum)

    signal.signal(signal.SIGTERM, flush_then_die)


def access_line(msg: str, args: tuple[Any, ...]) -> bool:
    """Write one text access line (``msg % args`` on :data:`ACCESS_LOGGER`) straight into the
    held text of the deferred handlers, skipping Python logging's per-record work; False when
    this process's logging is not the configuration the line was checked against (the caller
    then logs it the usual way).

    Why by hand: an access line through ``Logger.info`` cost 8.6 us on a router worker (record
    creation 2.2, BentoML's ``TraceRecordFilter`` 1.3, formatting 2.0, the rest in the logger and
    handler calls), about 4 % of a compiled model's request. The text it writes is fixed by
    BentoML's ``TRACED_LOG_FORMAT`` (time stamp, ``[INFO]``, the worker's component, message,
    trace suffix): when :func:`_access_plan` finds exactly that format, those filters and only
    :class:`DeferredFlushHandler` handlers (checked once per process), the same bytes are
    written here (``tests/unit/test_request_bounds.py`` compares them with logging's own), with
    :class:`RequestIdFilter`'s escaping. JSON logs, a trace in progress, another format, a
    handler or filter anyone added: the usual way."""
    plan = _ACCESS_PLAN[0]
    if plan is None:
        plan = _ACCESS_PLAN[0] = _access_plan()
    if plan is False:
        return False
    logger, handlers, component, datefmt = plan
    if not logger.isEnabledFor(logging.INFO) or _tracing():
        return False
    now = time.time()
    stamp = _STAMP
    if int(now) != stamp[0]:
        stamp[1] = time.strftime(datefmt, time.localtime(now))
        stamp[0] = int(now)
    for a in args:
        if type(a) is str and not a.isprintable():
            args = tuple(printable(a) if type(a) is str else a for a in args)
            break
    line = f"{stamp[1]} [INFO] {component} {msg % args}\n"
    for handler in handlers:
        with handler.lock:  # type: ignore[union-attr]
            handler.lines.append(line)
            full = len(handler.lines) >= MAX_HELD
        if full:
            handler.flush()
    return True


_ACCESS_PLAN: list[Any] = [None]  # None: not decided yet; False: the usual way; else the plan
_STAMP: list[Any] = [-1, ""]


def _access_plan() -> Any:
    """``(logger, handlers, component, datefmt)`` when every handler an access record reaches is
    a :class:`DeferredFlushHandler` formatting BentoML's traced format, filtered by exactly
    BentoML's ``TraceRecordFilter`` and :class:`RequestIdFilter`; else False."""
    from bentoml._internal import log as bentoml_log

    if structured():
        return False
    logger = logging.getLogger(ACCESS_LOGGER)
    if logger.filters or logger.disabled:
        return False
    handlers: list[logging.Handler] = []
    node: logging.Logger | None = logger
    while node is not None:
        handlers.extend(node.handlers)
        node = node.parent if node.propagate else None
    datefmt = None
    for h in handlers:
        f = h.formatter
        if (
            type(h) is not DeferredFlushHandler
            or h.level > logging.INFO
            or type(f) is not logging.Formatter
            or type(f._style) is not logging.PercentStyle
            or f._fmt != bentoml_log.TRACED_LOG_FORMAT
            or not f.datefmt
            or f.converter is not time.localtime
            or len(h.filters) != 2
            or {type(x) for x in h.filters} != {RequestIdFilter, bentoml_log.TraceRecordFilter}
        ):
            return False
        if datefmt not in (None, f.datefmt):
            return False
        datefmt = f.datefmt
    if not handlers:
        return False
    component = f"[{bentoml_log._component_name()}]"
    return logger, handlers, component, datefmt


def _tracing() -> bool:
    """Whether BentoML's trace context has a trace (its filter then adds a trace suffix)."""
    from bentoml._internal.context import trace_context

    return trace_context.trace_id not in (0, None)


def _flush_forever() -> None:
    while True:
        time.sleep(min((h.interval_s for h in list(_DEFERRED)), default=1.0))
        flush_all()
