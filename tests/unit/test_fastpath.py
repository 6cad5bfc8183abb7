"""services.gateway.fastpath: which requests skip BentoML's middleware, timeouts, logging,
metrics."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from typing import Any

import pytest
from prometheus_client import REGISTRY
from starlette.requests import Request
from starlette.responses import Response

from services.gateway.deadlines import Deadlines
from services.gateway.fastpath import FastPath, Route, prediction_routes
from services.protocols.errors import error_response, json_response
from tests.conftest import Sent, eventually_async, run_on_virtual_clock


def scope(method: str = "POST", path: str = "/predict", type_: str = "http") -> dict[str, Any]:
    return {
        "type": type_,
        "method": method,
        "path": path,
        "scheme": "http",
        "client": ("127.0.0.1", 5000),
        "headers": [(b"content-type", b"application/json")],
        "query_string": b"",
    }


async def receive() -> dict[str, Any]:
    return {"type": "http.request", "body": b'{"x": 1}', "more_body": False}


class Inner:
    """The BentoML app stand-in: records what reached it."""

    def __init__(self) -> None:
        self.scopes: list[dict[str, Any]] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        self.scopes.append(scope)
        await json_response({"inner": True})(scope, receive, send)


def make(handler_delay: float = 0.0, timeout_s: float = 5.0, access_log: bool = False):
    seen: list[tuple[Any, dict[str, Any], bytes]] = []

    async def handler(request: Request, match: re.Match[str]) -> Response:
        seen.append((request.app, match.groupdict(), await request.body()))
        await asyncio.sleep(handler_delay)
        return json_response({"handled": match.groupdict()})

    routes = [
        Route("/predict", r"^/predict$", handler, error_response),
        Route("t/infer", r"^/v2/models/(?P<name>[^/]+)/infer$", handler, error_response),
    ]
    inner = Inner()
    api = object()
    app = FastPath(inner, api, routes, timeout_s=timeout_s, access_log=access_log)
    return app, inner, api, seen


def call(app: FastPath, sc: dict[str, Any]) -> Sent:
    sent = Sent()
    asyncio.run(app(sc, receive, sent))
    return sent


def test_prediction_posts_skip_the_inner_app() -> None:
    app, inner, api, seen = make()
    sent = call(app, scope(path="/v2/models/iris/infer"))
    assert sent.status == 200 and sent.body == {"handled": {"name": "iris"}}
    assert inner.scopes == []
    assert seen == [(api, {"name": "iris"}, b'{"x": 1}')]  # request.app is the FastAPI app


@pytest.mark.parametrize(
    "sc",
    [
        scope(method="GET"),
        scope(path="/predict/extra"),
        scope(path="/models"),
        scope(path="/v2/models/iris/ready", method="GET"),
        scope(type_="lifespan"),
    ],
)
def test_everything_else_goes_through_bentoml(sc: dict[str, Any]) -> None:
    app, inner, _, seen = make()
    if sc["type"] == "lifespan":
        asyncio.run(app(sc, receive, Sent()))
    else:
        assert call(app, sc).body == {"inner": True}
    assert inner.scopes == [sc] and seen == []


def test_slow_request_is_cancelled_and_answered_504() -> None:
    app, *_ = make(handler_delay=5.0, timeout_s=0.05)
    sent = call(app, scope())
    assert sent.status == 504
    assert sent.body["error"]["type"] == "timeout"


def test_access_log_line_and_latency_metric(caplog: pytest.LogCaptureFixture) -> None:
    app, *_ = make(access_log=True)
    labels = {"route": "/predict"}
    before = REGISTRY.get_sample_value("servery_request_duration_seconds_count", labels) or 0.0
    with caplog.at_level(logging.INFO, logger="bentoml.access"):
        call(app, scope())
    after = REGISTRY.get_sample_value("servery_request_duration_seconds_count", labels)
    assert after == before + 1
    (record,) = [r for r in caplog.records if r.name == "bentoml.access"]
    line = record.getMessage()
    assert "127.0.0.1:5000" in line and "path=/predict" in line and "status=200" in line


def test_no_access_log_when_bentoml_access_log_is_off(caplog: pytest.LogCaptureFixture) -> None:
    app, *_ = make(access_log=False)
    with caplog.at_level(logging.INFO, logger="bentoml.access"):
        call(app, scope())
    assert not [r for r in caplog.records if r.name == "bentoml.access"]


def test_prediction_routes_patterns() -> None:
    predict, infer = prediction_routes()
    assert predict.pattern.match("/predict") and not predict.pattern.match("/predicts")
    m = infer.pattern.match("/v2/models/iris/versions/abc/infer")
    assert m is not None and m["name"] == "iris" and m["version"] == "abc"
    m = infer.pattern.match("/v2/models/iris/infer")
    assert m is not None and m["version"] is None
    assert not infer.pattern.match("/v2/models/iris/ready")
    assert not infer.pattern.match("/v2/models/a/b/infer")


class Mounted:
    """A mounted ASGI app (the LLM proxy's place): streams two chunks with a 418."""

    def __init__(self) -> None:
        self.paths: list[tuple[str, str]] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        self.paths.append((scope["method"], scope["path"]))
        await send({"type": "http.response.start", "status": 418, "headers": []})
        await send({"type": "http.response.body", "body": b"a", "more_body": True})
        await send({"type": "http.response.body", "body": b"b", "more_body": False})


@pytest.mark.parametrize("access_log", [False, True])
def test_mounted_prefix_skips_the_inner_app_for_any_method(
    access_log: bool, caplog: pytest.LogCaptureFixture
) -> None:
    mounted = Mounted()
    inner = Inner()
    app = FastPath(
        inner, object(), [], timeout_s=5, access_log=access_log, mounts=[("/v1/", mounted)]
    )
    with caplog.at_level(logging.INFO, logger="bentoml.access"):
        get = call(app, scope(method="GET", path="/v1/models"))
        post = call(app, scope(path="/v1/chat/completions"))
        other = call(app, scope(method="GET", path="/v1"))  # not under the prefix
    assert mounted.paths == [("GET", "/v1/models"), ("POST", "/v1/chat/completions")]
    for sent in (get, post):  # every message reaches the client as the app sent it
        assert [m.get("body") for m in sent.messages] == [None, b"a", b"b"]
        assert sent.status == 418
    assert other.body == {"inner": True} and len(inner.scopes) == 1
    lines = [r.getMessage() for r in caplog.records if r.name == "bentoml.access"]
    if access_log:
        assert len(lines) == 2
        assert "method=GET,path=/v1/models" in lines[0] and "status=418" in lines[0]
    else:
        assert lines == []


def body_receive(chunks: list[bytes]):
    """An ASGI receive that sends ``chunks`` as one request body."""
    messages = [
        {"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
        for i, c in enumerate(chunks)
    ]

    async def receive() -> dict[str, Any]:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    return receive


def sized(path: str, length: int | None, method: str = "POST") -> dict[str, Any]:
    """A request with ``Content-Length: length``, or a chunked one (``None``)."""
    sc = scope(path=path)
    sc["method"] = method
    if length is not None:
        sc["headers"] = [*sc["headers"], (b"content-length", str(length).encode())]
    else:
        sc["headers"] = [*sc["headers"], (b"transfer-encoding", b"chunked")]
    return sc


@pytest.mark.parametrize(
    ("path", "envelope"),
    [("/predict", "platform"), ("/v2/models/iris/infer", "oip"), ("/v1/completions", "openai")],
)
def test_declared_body_over_the_limit_is_413_before_reading(path: str, envelope: str) -> None:
    inner = Inner()
    app = FastPath(inner, object(), [], timeout_s=5, access_log=False, max_body_bytes=2048)
    read: list[bool] = []

    async def untouched() -> dict[str, Any]:
        read.append(True)
        return {"type": "http.request", "body": b"", "more_body": False}

    sent = Sent()
    asyncio.run(app(sized(path, 4096), untouched, sent))
    assert sent.status == 413 and not read and not inner.scopes
    error = sent.body["error"]
    message = {
        "platform": lambda: error["message"],
        "oip": lambda: error,
        "openai": lambda: error["message"],
    }[envelope]()
    assert "larger than 2048 bytes" in message
    if envelope == "openai":
        assert error["code"] == 413


def test_chunked_body_is_read_up_to_the_limit() -> None:
    inner = Inner()
    seen: list[bytes] = []

    class Reader(Inner):
        async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
            seen.append((await receive())["body"])
            await super().__call__(scope, receive, send)

    app = FastPath(Reader(), object(), [], timeout_s=5, access_log=False, max_body_bytes=2048)
    small = Sent()
    asyncio.run(app(sized("/models", None), body_receive([b"a" * 1000, b"b" * 1000]), small))
    assert small.body == {"inner": True} and seen == [b"a" * 1000 + b"b" * 1000]
    big = Sent()
    asyncio.run(app(sized("/models", None), body_receive([b"a" * 1500, b"b" * 1500]), big))
    assert big.status == 413 and len(seen) == 1
    fits = Sent()  # a declared length within the limit passes without being read here
    asyncio.run(app(sized("/models", 2000), body_receive([b"c" * 2000]), fits))
    assert fits.body == {"inner": True} and seen[-1] == b"c" * 2000
    assert inner.scopes == []
    for method in ("GET", "DELETE", "OPTIONS"):  # every method: a GET's body is bounded too
        refused = Sent()
        chunks = [b"x" * 1000] * 3
        asyncio.run(app(sized("/v1/models", None, method), body_receive(chunks), refused))
        assert refused.status == 413 and refused.body["error"]["code"] == 413
    assert len(seen) == 2


def test_in_flight_cap_sheds_before_reading_the_body() -> None:
    """With ``max_in_flight`` requests unanswered, the next is 503 + Retry-After at once, its body
    drained unparsed (the connection stays usable); once they are answered, requests are
    admitted again."""
    app, _, _, seen = make(handler_delay=0.2)
    app.max_in_flight = 2
    reads: list[str] = []

    def counting_receive(tag: str) -> Any:
        async def rcv() -> dict[str, Any]:
            reads.append(tag)
            return await receive()

        return rcv

    async def scenario() -> tuple[list[Sent], Sent]:
        sents = [Sent() for _ in range(3)]
        calls = [app(scope(), counting_receive(str(i)), s) for i, s in enumerate(sents)]
        await asyncio.gather(*calls)
        after = Sent()
        await app(scope(), counting_receive("after"), after)
        return sents, after

    sents, after = asyncio.run(scenario())
    assert [s.status for s in sents] == [200, 200, 503]
    assert sents[2].headers.get("retry-after") == "1"
    assert sents[2].body["error"]["type"] == "overloaded"
    assert reads.count("2") == 1  # the refused request's body was drained, not handled
    assert after.status == 200 and app.in_flight == 0
    assert len(seen) == 3


def test_in_flight_is_released_on_timeout_and_zero_means_off() -> None:
    app, _, _, _ = make(handler_delay=1.0, timeout_s=0.05)
    app.max_in_flight = 1
    assert call(app, scope()).status == 504 and app.in_flight == 0
    assert call(app, scope()).status == 504  # admitted again: the slot was given back
    off, _, _, _ = make(handler_delay=0.05)  # max_in_flight defaults to 0: no cap

    async def many() -> list[int]:
        sents = [Sent() for _ in range(20)]
        await asyncio.gather(*(off(scope(), receive, s) for s in sents))
        return [s.status for s in sents]

    assert asyncio.run(many()) == [200] * 20


# --- the shared request timeout (Deadlines) -----------------------------------------------------


def test_only_the_slow_requests_of_many_time_out_each_near_its_own_deadline() -> None:
    delays = {"/v2/models/fast/infer": 0.0, "/v2/models/slow/infer": 5.0}
    timeout_s = 0.2
    ended: dict[int, float] = {}

    async def handler(request: Request, match: re.Match[str]) -> Response:
        await asyncio.sleep(delays[request.url.path])
        return json_response({"ok": True})

    routes = [Route("t/infer", r"^/v2/models/(?P<name>[^/]+)/infer$", handler, error_response)]
    app = FastPath(Inner(), object(), routes, timeout_s=timeout_s, access_log=False)
    assert app.deadlines.tick_s == 0.001  # 0.5 % of 0.2 s, at least uvloop's 1 ms

    async def one(i: int, path: str, start_after: float) -> Sent:
        loop = asyncio.get_running_loop()
        await asyncio.sleep(start_after)
        sent = Sent()
        begun = loop.time()
        await app(scope(path=path), receive, sent)
        ended[i] = loop.time() - begun
        return sent

    async def scenario() -> list[Sent]:
        # slow requests start at 0, 50 and 100 ms: each must get its own full timeout
        jobs = [one(i, "/v2/models/slow/infer", 0.05 * i) for i in range(3)]
        jobs += [one(10 + i, "/v2/models/fast/infer", 0.02 * i) for i in range(5)]
        return await asyncio.gather(*jobs)

    # On loop time (the clock Deadlines reads), which a busy machine cannot stretch: the bound
    # below is the mechanism's own (cancelled between timeout_s and timeout_s + tick_s after it
    # started), not a guess at how fast this machine runs.
    sents = run_on_virtual_clock(scenario())
    assert [s.status for s in sents] == [504] * 3 + [200] * 5
    for i in range(3):
        assert timeout_s <= ended[i] <= timeout_s + app.deadlines.tick_s + 1e-9, ended
    assert len(app.deadlines) == 0 and not app.deadlines._expired
    assert app.deadlines._timer is None  # nothing in flight: no timer left behind


def test_a_shutdown_cancel_is_not_turned_into_a_504() -> None:
    app, *_ = make(handler_delay=5.0, timeout_s=5.0)

    async def scenario() -> None:
        task = asyncio.ensure_future(app(scope(), receive, Sent()))
        # the request is running, its deadline armed
        await eventually_async(lambda: len(app.deadlines) == 1, "the request's deadline armed")
        task.cancel()  # what the server does to requests still running when it stops
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    assert len(app.deadlines) == 0 and not app.deadlines._expired


@pytest.mark.parametrize("shutdown", [True, False])
def test_a_shutdown_cancel_on_top_of_the_timeout_still_propagates(shutdown: bool) -> None:
    deadlines = Deadlines(0.05, tick_s=0.01)
    outcome: list[str] = []

    async def request() -> None:
        task = deadlines.arm()
        try:
            await asyncio.sleep(5)
        except asyncio.CancelledError:
            outcome.append("timeout" if deadlines.end(task, cancelled=True) else "re-raised")
            raise

    async def scenario() -> None:
        task = asyncio.ensure_future(request())
        await asyncio.sleep(0)  # the request runs: its deadline is armed, it sleeps
        # The deadline passes while the loop is held here, so the request cannot run before the
        # two cancels: the loop's next turn runs this task (the shutdown's cancel), then the
        # deadline's timer (its cancel); the request sees both on the turn after. Ordered by
        # loop turns: a stall anywhere only moves the deadline further into the past.
        time.sleep(0.06)
        await asyncio.sleep(0)
        if shutdown:
            task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    assert outcome == ["re-raised" if shutdown else "timeout"]


def test_a_handler_that_swallows_the_cancel_is_answered_and_its_task_uncancelled() -> None:
    deadlines = Deadlines(0.02, tick_s=0.01)

    async def request() -> tuple[str, int]:
        task = deadlines.arm()
        try:
            await asyncio.sleep(5)
            result = "slept"
        except asyncio.CancelledError:
            result = "swallowed"  # a handler that ignores cancellation
        assert deadlines.end(task, cancelled=False) is False  # not reported as a timeout
        return result, task.cancelling()

    assert asyncio.run(request()) == ("swallowed", 0)
    assert len(deadlines) == 0 and not deadlines._expired


def test_a_handler_that_raises_leaves_no_deadline_behind() -> None:
    async def boom(request: Request, match: re.Match[str]) -> Response:
        raise RuntimeError("handler bug")

    routes = [Route("/predict", r"^/predict$", boom, error_response)]
    app = FastPath(Inner(), object(), routes, timeout_s=5, access_log=False)
    with pytest.raises(RuntimeError, match="handler bug"):
        call(app, scope())
    assert len(app.deadlines) == 0 and app.deadlines._timer is None and app.in_flight == 0


def test_one_timer_serves_every_request_in_flight() -> None:
    deadlines = Deadlines(30.0)
    timers: list[Any] = []

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        real_call_at = loop.call_at

        def counting_call_at(*args: Any, **kwargs: Any) -> Any:
            timers.append(args)
            return real_call_at(*args, **kwargs)

        loop.call_at = counting_call_at  # type: ignore[method-assign]

        async def request() -> None:
            task = deadlines.arm()
            await asyncio.sleep(0.01)
            deadlines.end(task, cancelled=False)

        await asyncio.gather(*(request() for _ in range(100)))

    asyncio.run(scenario())
    assert len([t for t in timers if getattr(t[1], "__self__", None) is deadlines]) == 1
