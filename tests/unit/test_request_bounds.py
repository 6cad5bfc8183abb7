"""What one request may cost before it is refused (issue 20, items 1, 8 and 11): validation errors
are capped, admission happens before a body is read (requests and body bytes in flight), and
access lines cannot be forged through the path."""

from __future__ import annotations

import asyncio
import logging
import re
import tracemalloc
from typing import Any

import orjson
import pytest
from starlette.requests import Request
from starlette.responses import Response

from services.gateway.fastpath import FastPath, Route, _drain
from services.ops.logs import RequestIdFilter, printable
from services.protocols.errors import (
    MAX_REPORTED_ERRORS,
    error_response,
    json_response,
    parse_json_model,
)
from services.protocols.native import PredictRequest
from services.protocols.oip.rest import parse_infer_request
from services.runtime.errors import BadRequest, ServeryError
from tests.conftest import Sent

# --- item 1: validation cost ---


def test_a_million_unknown_fields_are_one_error_naming_the_first_and_the_total() -> None:
    body = orjson.dumps(
        {"model": "iris", "inputs": [[1, 2, 3, 4]], **{f"k{i}": 0 for i in range(1_000_000)}}
    )
    tracemalloc.start()
    try:
        with pytest.raises(BadRequest) as caught:
            parse_json_model(body, PredictRequest)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    err = caught.value
    assert err.details["errors"] == 1_000_000
    assert len(err.details["detail"]) == MAX_REPORTED_ERRORS
    assert "'k0'" in err.message and "(and 999980 more)" in err.message
    # 14 MB of body; pydantic's per-key errors made about 1.2 GB (issue 20)
    assert peak < 20 * len(body), f"peak {peak / 2**20:.0f} MiB for {len(body) / 2**20:.0f} MiB"


def test_a_valid_predict_body_parses_as_before() -> None:
    req = parse_json_model(
        b'{"model": "iris", "version": "v1", "inputs": [[1, 2]]}', PredictRequest
    )
    assert (req.model, req.version, req.inputs) == ("iris", "v1", [[1, 2]])
    with pytest.raises(BadRequest, match="not valid JSON"):
        parse_json_model(b'{"model": ', PredictRequest)
    with pytest.raises(BadRequest) as caught:  # a missing field: pydantic's own error
        parse_json_model(b'{"inputs": []}', PredictRequest)
    assert caught.value.details["errors"] == 1 and "model" in caught.value.message
    with pytest.raises(BadRequest):  # not an object
        parse_json_model(b"[1, 2]", PredictRequest)


@pytest.mark.parametrize(
    "body",
    [
        {"inputs": [0] * 500_000},  # each element is not an object
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": ["a"] * 500_000, "data": []}]},
        {"inputs": [], "outputs": [1] * 500_000},
    ],
    ids=["inputs", "shape", "outputs"],
)
def test_oip_lists_fail_fast(body: dict[str, Any]) -> None:
    """One error per bad list, not one per element (8 M elements made 8 M errors, 2.7 GB)."""
    with pytest.raises(ServeryError) as caught:
        parse_infer_request(orjson.dumps(body), None)
    assert caught.value.status_code == 400
    assert caught.value.details["errors"] <= 2
    assert len(caught.value.details["detail"]) <= MAX_REPORTED_ERRORS


# --- item 8: admission before the body is read ---


def make(max_bytes: int, max_in_flight: int = 0, delay: float = 0.05) -> tuple[FastPath, list[int]]:
    sizes: list[int] = []

    async def handler(request: Request, match: re.Match[str]) -> Response:
        sizes.append(len(await request.body()))
        await asyncio.sleep(delay)
        return json_response({"ok": True})

    async def inner(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await json_response({"inner": True})(scope, receive, send)

    app = FastPath(
        inner,
        object(),
        [Route("/predict", r"^/predict$", handler, error_response)],
        timeout_s=5.0,
        access_log=False,
        max_body_bytes=1000,
        max_in_flight=max_in_flight,
        max_bytes_in_flight=max_bytes,
    )
    return app, sizes


def request(path: str, length: int | None, chunked: bool = False) -> dict[str, Any]:
    headers = [(b"content-type", b"application/json")]
    if length is not None:
        headers.append((b"content-length", str(length).encode()))
    if chunked:
        headers.append((b"transfer-encoding", b"chunked"))
    return {
        "type": "http",
        "method": "POST",
        "path": path,
        "raw_path": path.encode(),
        "scheme": "http",
        "client": ("127.0.0.1", 1),
        "headers": headers,
        "query_string": b"",
    }


def body(size: int, reads: list[int] | None = None) -> Any:
    sent = [False]

    async def receive() -> dict[str, Any]:
        if reads is not None:
            reads.append(size)
        if sent[0]:
            return {"type": "http.disconnect"}
        sent[0] = True
        return {"type": "http.request", "body": b"x" * size, "more_body": False}

    return receive


def test_body_bytes_in_flight_are_admitted_before_any_is_read() -> None:
    """Two 600-byte bodies fit 1000 bytes in flight one at a time: the second waits for nothing,
    it is refused 503 unread (drained), and once the first ends the next is admitted."""
    app, sizes = make(max_bytes=1000)
    reads: list[int] = []

    async def scenario() -> list[Sent]:
        sents = [Sent() for _ in range(3)]
        await asyncio.gather(
            app(request("/predict", 600), body(600), sents[0]),
            app(request("/predict", 600), body(600, reads), sents[1]),
            app(request("/predict", 300), body(300), sents[2]),  # fits beside the first
        )
        later = Sent()
        await app(request("/predict", 600), body(600), later)
        return [*sents, later]

    sents = asyncio.run(scenario())
    assert [s.status for s in sents] == [200, 503, 200, 200]
    assert sents[1].body["error"]["type"] == "overloaded" and sents[1].headers["retry-after"]
    assert sizes == [600, 300, 600]  # the refused body never reached a handler
    assert app.bytes_in_flight == 0 and app.in_flight == 0


def test_a_chunked_body_reserves_the_body_limit_and_every_route_is_counted() -> None:
    app, _ = make(max_bytes=1500)

    async def scenario() -> list[int]:
        sents = [Sent() for _ in range(2)]
        await asyncio.gather(
            app(request("/predict", None, chunked=True), body(10), sents[0]),
            # not a prediction route: counted by its bytes all the same
            app(request("/models", 600), body(600), sents[1]),
        )
        return [s.status for s in sents]

    assert asyncio.run(scenario()) == [200, 503]


def test_one_request_larger_than_the_budget_is_admitted_alone_and_no_body_needs_nothing() -> None:
    app, _ = make(max_bytes=100)
    sent = Sent()
    asyncio.run(app(request("/predict", 900), body(900), sent))
    assert sent.status == 200
    get = request("/readyz", None)
    get["method"] = "GET"
    app.bytes_in_flight = 10**9  # a probe without a body is never refused for memory
    sent = Sent()
    asyncio.run(app(get, body(0), sent))
    assert sent.status == 200


def test_openai_requests_count_against_max_in_flight() -> None:
    release = asyncio.Event()

    async def upstream(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await release.wait()
        await json_response({"streamed": True})(scope, receive, send)

    app, _ = make(max_bytes=0, max_in_flight=1)
    app.mounts = [("/v1/", upstream)]

    async def scenario() -> list[int]:
        first, second = Sent(), Sent()
        task = asyncio.ensure_future(app(request("/v1/chat/completions", 10), body(10), first))
        await asyncio.sleep(0.01)
        await app(request("/v1/chat/completions", 10), body(10), second)
        release.set()
        await task
        return [first.status, second.status]

    assert asyncio.run(scenario()) == [200, 503]
    assert app.in_flight == 0


def test_draining_a_refused_endless_body_stops_at_the_limit() -> None:
    reads = [0]

    async def endless() -> dict[str, Any]:
        reads[0] += 1
        return {"type": "http.request", "body": b"x" * 100, "more_body": True}

    asyncio.run(asyncio.wait_for(_drain(endless, 1000), 5))
    assert reads[0] == 11


# --- item 11: access lines cannot be forged ---


def test_control_characters_in_access_line_arguments_are_escaped() -> None:
    record = logging.LogRecord(
        "bentoml.access",
        logging.INFO,
        __file__,
        1,
        "%s (path=%s) (status=%d)",
        ("127.0.0.1:1", "/predict\n127.0.0.1:2 (path=/admin) (status=200)\x1b[2J", 200),
        None,
    )
    RequestIdFilter().filter(record)
    line = record.getMessage()
    assert "\n" not in line and "\x1b" not in line
    assert line == (
        "127.0.0.1:1 (path=/predict\\n127.0.0.1:2 (path=/admin) (status=200)\\x1b[2J) (status=200)"
    )
    assert printable("/v1/models") == "/v1/models"
    other = logging.LogRecord("servery", logging.INFO, __file__, 1, "%s", ("a\nb",), None)
    RequestIdFilter().filter(other)  # only access lines quote clients this way
    assert other.args == ("a\nb",)


# --- access lines written by hand are the lines logging writes ---


@pytest.fixture
def bentoml_text_logging():
    """BentoML's server logging (its ``SERVER_LOGGING_CONFIG`` handler: traced format, its
    filter) into a buffer, configured as a router worker is (``logs.configure``); restored after."""
    import io

    from bentoml._internal import log as bentoml_log

    from services.ops import logs

    stream = io.StringIO()
    bentoml_logger = logging.getLogger("bentoml")
    access = logging.getLogger("bentoml.access")
    saved = (bentoml_logger.handlers[:], bentoml_logger.propagate, bentoml_logger.level)
    was_disabled = access.disabled  # BentoML's CLI logging config disables existing loggers
    access.disabled = False
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter(bentoml_log.TRACED_LOG_FORMAT, bentoml_log.DATE_FORMAT))
    handler.addFilter(bentoml_log.TraceRecordFilter())
    bentoml_logger.handlers[:] = [handler]
    bentoml_logger.propagate = False
    bentoml_logger.setLevel(logging.INFO)
    logs._ACCESS_PLAN[0] = None
    try:
        logs.configure("text", flush_interval_s=0.05)
        yield stream
    finally:
        for h in bentoml_logger.handlers:
            logs._DEFERRED.discard(h)
        bentoml_logger.handlers[:], bentoml_logger.propagate, bentoml_logger.level = saved
        access.disabled = was_disabled
        logs._ACCESS_PLAN[0] = None


def only_servery_handlers() -> None:
    """Take off the capture handlers pytest's logging plugin puts on non-propagating loggers
    for the test's call (it removes its own afterwards): an extra handler, rightly, sends access
    lines the usual way."""
    from services.ops import logs

    bentoml_logger = logging.getLogger("bentoml")
    bentoml_logger.handlers[:] = [
        h for h in bentoml_logger.handlers if isinstance(h, logs.DeferredFlushHandler)
    ]
    logs._ACCESS_PLAN[0] = None


def test_access_lines_written_by_hand_are_byte_for_byte_what_logging_writes(
    bentoml_text_logging,
) -> None:
    import time

    from services.ops import logs

    only_servery_handlers()
    fmt = "%s (scheme=%s,method=%s,path=%s) (status=%d,length=%s) %.3fms"
    args = ("127.0.0.1:5000", "http", "POST", "/predict\n(status=200)", 200, "57", 0.4567)
    access = logging.getLogger("bentoml.access")
    for _ in range(5):  # both in one second of the clock (the time stamp's resolution)
        second = int(time.time())
        access.info(fmt, *args)
        assert logs.access_line(fmt, args)
        if int(time.time()) == second:
            break
    logs.flush_all()
    lines = bentoml_text_logging.getvalue().splitlines()
    assert len(lines) >= 2 and lines[-1] == lines[-2], lines
    tail = "method=POST,path=/predict\\n(status=200)) (status=200,length=57) 0.457ms"
    assert lines[-1].endswith(tail)
    assert " [INFO] [" in lines[-1]


def test_access_lines_take_the_usual_way_for_json_or_another_handler(
    bentoml_text_logging,
) -> None:
    from services.ops import logs

    only_servery_handlers()
    args = ("-", "http", "GET", "/", 200, "-", 1.0)
    extra = logging.StreamHandler(bentoml_text_logging)
    logging.getLogger("bentoml").addHandler(extra)
    logs._ACCESS_PLAN[0] = None
    assert not logs.access_line("%s %s %s %s %d %s %.3f", args)
    logging.getLogger("bentoml").removeHandler(extra)
    logs._ACCESS_PLAN[0] = None
    assert logs.access_line("%s %s %s %s %d %s %.3f", args)
