"""Request ids and JSON logs (services/ops/logs.py) and how the fast path uses them."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
from collections.abc import Iterator
from typing import Any

import pytest

from services.compat.log_caller_lookup import skip_caller_lookup
from services.compat.log_time_stamps import cache_seconds
from services.gateway.fastpath import FastPath, Route
from services.ops import logs
from services.protocols.errors import json_response
from tests.conftest import Sent, eventually


@pytest.mark.parametrize("value", [b"abc-123", b"0f3e:req/7+x=y@z.q_", b"a" * 128])
def test_a_well_formed_client_id_is_kept(value: bytes) -> None:
    assert logs.request_id([(b"host", b"x"), (b"x-request-id", value)]) == value.decode()


@pytest.mark.parametrize(
    "value", [b"", b"a" * 129, b"has space", b"new\nline", b"\xff\xfe", b'quote"', b"<script>"]
)
def test_a_malformed_client_id_is_replaced(value: bytes) -> None:
    rid = logs.request_id([(b"x-request-id", value)])
    assert rid != value.decode(errors="replace") and re.fullmatch(r"[0-9a-f]{18,}", rid)


def test_new_ids_are_unique() -> None:
    ids = {logs.request_id([]) for _ in range(10_000)}
    assert len(ids) == 10_000


def record(msg: str = "hello %s", *args: Any, **extra: Any) -> logging.LogRecord:
    rec = logging.LogRecord("servery", logging.WARNING, __file__, 1, msg, args or ("x",), None)
    for k, v in extra.items():
        setattr(rec, k, v)
    return rec


def test_json_lines_carry_the_request_id_and_access_fields() -> None:
    fmt = logs.JsonFormatter()
    token = logs.REQUEST_ID.set("rid-1")
    try:
        rec = record(
            component="[service:Router:1]",
            **{logs.ACCESS_FIELDS: {"status": 200, "model": "iris", "latency_ms": 1.5}},
        )
        assert logs.RequestIdFilter().filter(rec)
    finally:
        logs.REQUEST_ID.reset(token)
    line = json.loads(fmt.format(rec))
    assert line["message"] == "hello x" and line["level"] == "WARNING"
    assert line["logger"] == "servery" and line["component"] == "service:Router:1"
    assert line["request_id"] == "rid-1"
    assert line["status"] == 200 and line["model"] == "iris" and line["latency_ms"] == 1.5
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", line["time"])
    assert "trace_id" not in line  # no span


def test_json_lines_keep_tracebacks_and_drop_bentoml_text_helpers() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        rec = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    rec.trace_msg = ""
    rec.levelname_bracketed = "[ERROR]"
    line = json.loads(logs.JsonFormatter().format(rec))
    assert "ValueError: boom" in line["exc_info"]
    assert "trace_msg" not in line and "levelname_bracketed" not in line
    assert "request_id" not in line  # none set outside a request


def test_json_lines_name_the_sampled_span() -> None:
    from opentelemetry.sdk.trace import TracerProvider

    tracer = TracerProvider().get_tracer("t")
    with tracer.start_as_current_span("s") as span:
        line = json.loads(logs.JsonFormatter().format(record()))
        ctx = span.get_span_context()
    assert line["trace_id"] == format(ctx.trace_id, "032x")
    assert line["span_id"] == format(ctx.span_id, "016x")


def test_configure_adds_the_filter_once_and_json_on_request() -> None:
    logger = logging.getLogger("servery")
    handler = logging.StreamHandler()
    logger.addHandler(handler)
    try:
        logs.configure("text")
        logs.configure("text")
        assert sum(isinstance(f, logs.RequestIdFilter) for f in handler.filters) == 1
        assert not isinstance(handler.formatter, logs.JsonFormatter)
        logs.configure("json")
        assert isinstance(handler.formatter, logs.JsonFormatter)
    finally:
        logger.removeHandler(handler)


# the fast path: every response names its request id; the access line has the fields


def scope(path: str = "/predict", rid: bytes | None = None) -> dict[str, Any]:
    headers = [(b"content-type", b"application/json")]
    if rid is not None:
        headers.append((b"x-request-id", rid))
    return {
        "type": "http",
        "method": "POST",
        "path": path,
        "scheme": "http",
        "client": ("127.0.0.1", 5000),
        "headers": headers,
        "query_string": b"",
    }


async def receive() -> dict[str, Any]:
    return {"type": "http.request", "body": b"{}", "more_body": False}


def make() -> FastPath:
    async def handler(request: Any, _: re.Match[str]) -> Any:
        request.scope[logs.MODEL_KEY] = ("iris", "v1")
        logging.getLogger("servery").warning("inside the handler")
        return json_response({"ok": True})

    async def inner(sc: dict[str, Any], rcv: Any, send: Any) -> None:
        await json_response({"inner": True}, headers={"x-request-id": "stale"})(sc, rcv, send)

    async def mounted(sc: dict[str, Any], rcv: Any, send: Any) -> None:
        await json_response({"mounted": True})(sc, rcv, send)

    routes = [Route("/predict", r"^/predict$", handler, lambda e: json_response({}, 500))]
    return FastPath(
        inner, object(), routes, timeout_s=5, access_log=True, mounts=[("/v1/", mounted)]
    )


def call(app: FastPath, sc: dict[str, Any]) -> Sent:
    sent = Sent()
    asyncio.run(app(sc, receive, sent))
    return sent


@pytest.mark.parametrize("path", ["/predict", "/models", "/v1/models"])
def test_every_response_carries_the_request_id(path: str) -> None:
    app = make()
    given = call(app, scope(path, rid=b"client-7"))
    assert [v for k, v in given.messages[0]["headers"] if k == b"x-request-id"] == [b"client-7"]
    made = call(app, scope(path))
    assert re.fullmatch(r"[0-9a-f]{18,}", made.headers["x-request-id"])


class Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.addFilter(logs.RequestIdFilter())
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_access_line_and_handler_lines_share_the_request_id() -> None:
    capture = Capture()
    loggers = [logging.getLogger("servery"), logging.getLogger("bentoml.access")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(capture)
        lg.setLevel(logging.INFO)
    logs._STRUCTURED[0] = True  # as after configure("json")
    try:
        call(make(), scope(rid=b"r-42"))
    finally:
        logs._STRUCTURED[0] = False
        for lg, level in zip(loggers, levels, strict=True):
            lg.removeHandler(capture)
            lg.setLevel(level)
    by_name = {r.name: r for r in capture.records}
    assert set(by_name) == {"servery", "bentoml.access"}
    assert {r.servery_request_id for r in capture.records} == {"r-42"}
    fields = getattr(by_name["bentoml.access"], logs.ACCESS_FIELDS)
    assert fields["model"] == "iris" and fields["version"] == "v1" and fields["status"] == 200
    assert fields["method"] == "POST" and fields["path"] == "/predict" and fields["latency_ms"] >= 0


# --- the cost per line: deferred flushes, cached time stamps, fields no format shows ------------


class CountingStream:
    """A stream that records what reached it at each flush (what a reader of the pipe sees)."""

    def __init__(self) -> None:
        self.buffer: list[str] = []
        self.flushed: list[str] = []

    def write(self, text: str) -> None:
        self.buffer.append(text)

    def flush(self) -> None:
        self.flushed.extend(self.buffer)
        self.buffer.clear()


def test_info_lines_wait_for_the_interval_and_warnings_flush_at_once() -> None:
    stream = CountingStream()
    handler = logs._deferred(logging.StreamHandler(stream), 0.05)  # type: ignore[arg-type]
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    handler.handle(record_at(logging.INFO, "first"))
    handler.handle(record_at(logging.INFO, "second"))
    assert stream.flushed == [] and stream.buffer == []  # held
    handler.handle(record_at(logging.WARNING, "third"))
    assert stream.flushed == ["INFO first\nINFO second\nWARNING third\n"]  # in order, one write
    handler.handle(record_at(logging.INFO, "fourth"))
    eventually(lambda: stream.flushed[1:], "the flusher thread's next write", every=0.01)
    assert stream.flushed[1:] == ["INFO fourth\n"]  # the flusher thread wrote it out


@pytest.mark.parametrize("text", ["x" * 100, "é" * 100, "y" * 5000])
def test_held_lines_go_out_in_whole_lines_within_a_pipes_atomic_write(text: str) -> None:
    stream = CountingStream()
    handler = logs.DeferredFlushHandler(stream, 60)
    handler.setFormatter(logging.Formatter("%(message)s"))
    lines = [f"{i} {text}\n" for i in range(200)]
    for line in lines:
        handler.handle(record_at(logging.INFO, line[:-1]))
    handler.flush()  # what logging.shutdown does at exit
    assert "".join(stream.flushed) == "".join(lines)
    for write in stream.flushed:
        assert write.endswith("\n")
        if len(write.encode()) > logs.ATOMIC_WRITE:  # only a single line longer than that
            assert write.count("\n") == 1
    if len(text) < 1000:
        assert len(stream.flushed) < 50  # many lines per write


def test_held_lines_are_bounded() -> None:
    stream = CountingStream()
    handler = logs.DeferredFlushHandler(stream, 3600)  # the flusher would wait an hour
    handler.setFormatter(logging.Formatter("%(message)s"))
    for i in range(logs.MAX_HELD * 3):
        handler.handle(record_at(logging.INFO, str(i)))
    assert len(handler.lines) < logs.MAX_HELD
    assert "".join(stream.flushed).count("\n") + len(handler.lines) == logs.MAX_HELD * 3


def record_at(level: int, msg: str, name: str = logs.ACCESS_LOGGER) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, msg, None, None)


def test_any_other_line_writes_the_held_access_lines_first() -> None:
    stream = CountingStream()
    handler = logs.DeferredFlushHandler(stream, 3600)
    handler.setFormatter(logging.Formatter("%(name)s %(message)s"))
    handler.handle(record_at(logging.INFO, "GET /a"))
    assert stream.flushed == []
    handler.handle(record_at(logging.INFO, "Completed async cleanup hook", name="bentoml"))
    assert stream.flushed == ["bentoml.access GET /a\nbentoml Completed async cleanup hook\n"]


SIGTERM_CHILD = """
import logging, os, signal, sys
from services.ops import logs
logger = logging.getLogger(logs.ACCESS_LOGGER)
logger.addHandler(logging.StreamHandler(sys.stdout))
logger.setLevel(logging.INFO)
logger.propagate = False
logs.LOGGERS = (logs.ACCESS_LOGGER,)
logs.configure("text", 3600)  # held for an hour unless something writes them out
logger.info("held line")
os.kill(os.getpid(), signal.SIGTERM)
"""


def test_sigterm_writes_held_lines_then_ends_the_process_by_the_signal() -> None:
    import os
    import signal
    import subprocess
    import sys

    from bench.harness.server import ROOT

    env = {**os.environ, "SERVERY_LOG_FLUSH_MS": "0"}  # only the child's own configure holds
    proc = subprocess.run(
        [sys.executable, "-c", SIGTERM_CHILD],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.stdout == "held line\n", proc.stderr
    assert proc.returncode == -signal.SIGTERM  # still the signal's default action


def test_configure_defers_plain_stream_handlers_once_and_keeps_their_setup(
    access_logger: logging.Logger,
) -> None:
    shared = logging.StreamHandler(CountingStream())  # type: ignore[arg-type]
    shared.setLevel(logging.INFO)
    fmt = logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%dT%H:%M:%S%z")
    shared.setFormatter(fmt)
    file_handler = logging.FileHandler("/dev/null")
    a, b = logging.getLogger("servery"), logging.getLogger("circus")
    for logger in (a, b):
        logger.addHandler(shared)
    a.addHandler(file_handler)
    try:
        logs.configure("text", 0.1)
        logs.configure("text", 0.1)
        new = [h for h in a.handlers if isinstance(h, logs.DeferredFlushHandler)]
        assert len(new) == 1 and new[0] in b.handlers  # one replacement for the shared handler
        assert shared not in a.handlers and shared not in b.handlers
        assert new[0].formatter is fmt and new[0].level == logging.INFO
        assert sum(isinstance(f, logs.RequestIdFilter) for f in new[0].filters) == 1
        assert file_handler in a.handlers  # files and other handler classes are left alone
    finally:
        for logger in (a, b):
            for h in list(logger.handlers):
                if h is shared or h is file_handler or isinstance(h, logs.DeferredFlushHandler):
                    logger.removeHandler(h)
        file_handler.close()


def test_time_stamps_render_once_per_second_and_read_the_same() -> None:
    cached = logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%dT%H:%M:%S%z")
    plain = logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%dT%H:%M:%S%z")
    cache_seconds(cached)
    cache_seconds(cached)  # idempotent
    rec = record_at(logging.INFO, "m")
    for created in (1_700_000_000.1, 1_700_000_000.9, 1_700_000_001.2, 1_700_000_000.5):
        rec.created = created
        assert cached.format(rec) == plain.format(rec)
    no_datefmt = logging.Formatter("%(asctime)s")  # milliseconds: never cached
    cache_seconds(no_datefmt)
    assert "formatTime" not in vars(no_datefmt)


FLAGS = ("logThreads", "logProcesses", "logMultiprocessing", "_srcfile")


@pytest.fixture
def access_logger() -> Iterator[logging.Logger]:
    """The access logger, its caller look-up restored afterwards; logging's switches checked."""
    before = {flag: getattr(logging, flag) for flag in FLAGS}
    access = logging.getLogger(logs.ACCESS_LOGGER)
    try:
        yield access
    finally:
        access.__dict__.pop("findCaller", None)
        # process-wide switches are never touched: libraries (vLLM) format with them
        assert {flag: getattr(logging, flag) for flag in FLAGS} == before


def skip_access_lookup(formatters: list[logging.Formatter | None]) -> None:
    """What logs.configure does with the formatters of the access log's handlers."""
    access = logging.getLogger(logs.ACCESS_LOGGER)
    skip_caller_lookup(access, formatters, caller_free=(logs.JsonFormatter,))


def access_record(access: logging.Logger) -> logging.LogRecord:
    seen: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    handler = Keep()
    access.addHandler(handler)
    level, access.level = access.level, logging.INFO
    try:
        access.info("line")
    finally:
        access.removeHandler(handler)
        access.level = level
    return seen[0]


def test_access_lines_skip_the_caller_look_up_no_format_shows(
    access_logger: logging.Logger,
) -> None:
    skip_access_lookup([logging.Formatter("%(asctime)s %(process)d %(message)s"), None])
    rec = access_record(access_logger)
    assert rec.lineno == 0 and rec.funcName == "(unknown function)"
    assert isinstance(rec.process, int) and isinstance(rec.thread, int)  # still filled in
    # other loggers keep their caller
    other = logging.getLogger("servery").makeRecord("servery", logging.INFO, "f", 7, "m", (), None)
    assert other.lineno == 7


def test_a_format_with_the_caller_or_an_unknown_formatter_keeps_the_look_up(
    access_logger: logging.Logger,
) -> None:
    class Custom(logging.Formatter):
        pass

    skip_access_lookup([logging.Formatter("%(message)s")])
    assert access_record(access_logger).lineno == 0
    skip_access_lookup([logging.Formatter("%(message)s"), Custom("%(message)s")])
    rec = access_record(access_logger)
    assert rec.lineno > 0 and rec.funcName == "access_record"
    skip_access_lookup([logging.Formatter("%(funcName)s:%(lineno)d %(message)s")])
    assert access_record(access_logger).funcName == "access_record"


def test_a_library_format_with_the_pid_still_formats_after_configure(
    access_logger: logging.Logger, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the server's own formats show no pid (here: one handler, pytest's own left out); vLLM sets
    # up its format (vllm/logger.py) afterwards
    monkeypatch.setattr(logs, "LOGGERS", ("servery",))
    logger = logging.getLogger("servery")
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    try:
        logs.configure("text")
    finally:
        logger.removeHandler(handler)
    vllm_like = logging.Formatter(
        "(pid=%(process)d) %(levelname)s [%(filename)s:%(lineno)d] %(message)s"
    )
    record = logging.getLogger("vllm").makeRecord("vllm", logging.INFO, "x.py", 3, "m", (), None)
    assert vllm_like.format(record) == f"(pid={os.getpid()}) INFO [x.py:3] m"
