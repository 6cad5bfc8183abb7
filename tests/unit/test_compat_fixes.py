"""What the fixes in services/compat/ do, exercised without a server (the registry, the version
guard and the upstream pins: tests/unit/test_compat.py).

The timeout-middleware tests run under a plain asyncio loop so its timer heap (``loop._scheduled``)
can be inspected; a copy of the upstream ``__call__`` is the control that shows the leak.
"""

from __future__ import annotations

import asyncio
import gc
import inspect
import json
import time
from collections.abc import Awaitable, Callable, Coroutine
from types import SimpleNamespace
from typing import Any

import pytest
from _bentoml_impl.server.app import ServiceAppFactory
from bentoml._internal.server.http.traffic import TimeoutMiddleware
from bentoml.exceptions import BentoMLException
from pydantic import BaseModel, ValidationError, field_validator
from pydantic_core import PydanticCustomError
from starlette.responses import JSONResponse, Response

from services import compat
from services.protocols.errors import error_response, from_validation_error
from services.runtime.errors import RequestTimeout

# Upstream's api_endpoint reads ``model_fields`` off an instance (pydantic 2.11 deprecation).
pytestmark = pytest.mark.filterwarnings(
    "ignore:Accessing the 'model_fields' attribute on the instance:DeprecationWarning"
)


@pytest.fixture(autouse=True, scope="module")
def applied() -> None:
    """What services.wire() does first in every served process (idempotent)."""
    compat.apply()
    compat.use_envelope(compat.Envelope(error_response, RequestTimeout, from_validation_error))


@pytest.fixture
def no_envelope(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fixes before the entry handed them the platform's envelope."""
    monkeypatch.setattr(compat, "_ENVELOPE", [])


Message = dict[str, Any]
App = Callable[[Message, Any, Any], Awaitable[None]]

UPSTREAM_TIMER_LINE = "loop.call_later(self.timeout, self._set_timer_out, waiter)"


async def upstream_call(self: Any, scope: Any, receive: Any, send: Any) -> None:
    """BentoML 1.4.40 ``TimeoutMiddleware.__call__``, verbatim but for formatting: the control."""
    if scope["type"] not in ("http", "websocket"):
        return await self.app(scope, receive, send)
    loop = asyncio.get_running_loop()
    waiter = loop.create_future()
    loop.call_later(self.timeout, self._set_timer_out, waiter)

    async def _send(message: Any) -> None:
        if not waiter.done():
            waiter.set_result(None)
        await send(message)

    fut = asyncio.ensure_future(self.app(scope, receive, _send), loop=loop)

    try:
        await waiter
    except TimeoutError:
        if fut.cancel():
            resp = JSONResponse(
                {"error": f"Not able to process the request in {self.timeout} seconds"},
                status_code=504,
            )
            await resp(scope, receive, send)
    else:
        await fut


def run_plain(coro: Coroutine[Any, Any, Any]) -> tuple[Any, int]:
    """Run ``coro`` on a fresh plain asyncio loop; return its result and the live timer count."""
    with asyncio.Runner(loop_factory=asyncio.SelectorEventLoop) as runner:
        result = runner.run(coro)
        loop = runner.get_loop()
        live = [h for h in loop._scheduled if not h.cancelled()]  # type: ignore[attr-defined]
        return result, len(live)


def http_scope() -> Message:
    return {"type": "http", "method": "POST", "path": "/predict", "headers": []}


async def receive() -> Message:
    return {"type": "http.request", "body": b"", "more_body": False}


async def ok_app(scope: Message, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


async def call(middleware: Any, app_call: Any = None) -> list[Message]:
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    await (app_call or type(middleware).__call__)(middleware, http_scope(), receive, send)
    return sent


def test_control_matches_upstream_source() -> None:
    # The control copies upstream; if BentoML ever keeps (and cancels) the handle, this fails and
    # the patch can go.
    source = inspect.getsource(inspect.getmodule(TimeoutMiddleware))  # type: ignore[arg-type]
    (line,) = [ln.strip() for ln in source.splitlines() if "loop.call_later(" in ln]
    assert line == UPSTREAM_TIMER_LINE


# --- TimeoutMiddleware --------------------------------------------------------------------------

N = 25


@pytest.mark.parametrize("concurrent", [False, True])
def test_timer_cancelled_when_request_completes(concurrent: bool) -> None:
    middleware = TimeoutMiddleware(ok_app, timeout=30)

    async def main(app_call: Any) -> list[list[Message]]:
        if concurrent:
            return list(await asyncio.gather(*(call(middleware, app_call) for _ in range(N))))
        return [await call(middleware, app_call) for _ in range(N)]

    results, live = run_plain(main(None))
    assert [r[0]["status"] for r in results] == [200] * N
    assert [r[1]["body"] for r in results] == [b"ok"] * N
    assert live == 0

    # Control: the upstream implementation leaves one live 30 s timer per request.
    results, live = run_plain(main(upstream_call))
    assert [r[0]["status"] for r in results] == [200] * N
    assert live == N


def timed_out() -> list[Message]:
    """What the middleware sends for an app slower than its timeout (0.05 s)."""
    middleware = TimeoutMiddleware(None, timeout=0.05)
    cancelled = asyncio.Event()

    async def slow_app(scope: Message, receive: Any, send: Any) -> None:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        await ok_app(scope, receive, send)

    middleware.app = slow_app

    async def main() -> list[Message]:
        # 5 s: a hang (the app's 10 s sleep) fails the test; the 504 below shows the timer fired
        sent = await asyncio.wait_for(call(middleware), 5)
        await asyncio.wait_for(cancelled.wait(), 5)  # the slow app was cancelled, not orphaned
        return sent

    sent, live = run_plain(main())
    assert live == 0
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    assert sent[0]["status"] == 504
    assert (b"content-type", b"application/json") in sent[0]["headers"]
    return sent


def test_slow_app_gets_504_envelope() -> None:
    body = json.loads(timed_out()[1]["body"])
    assert set(body) == {"error"}
    assert body["error"]["type"] == "timeout"
    assert "0.05" in body["error"]["message"]


@pytest.mark.usefixtures("no_envelope")
def test_without_the_platform_envelope_the_timeout_answers_as_bentoml_does() -> None:
    body = json.loads(timed_out()[1]["body"])
    assert body == {"error": "Not able to process the request in 0.05 seconds"}


def test_app_raising_before_sending_does_not_wait_for_timeout() -> None:
    async def failing_app(scope: Message, receive: Any, send: Any) -> None:
        raise RuntimeError("boom")

    middleware = TimeoutMiddleware(failing_app, timeout=30)
    start = time.monotonic()
    # Upstream sits on the waiter until the timer fires, then swallows the error (the control
    # below): the error itself, before the 30 s timer, shows the middleware did not wait.
    with pytest.raises(RuntimeError, match="boom"):
        run_plain(call(middleware))
    assert time.monotonic() - start < middleware.timeout


def test_upstream_waits_out_the_timeout_when_app_raises() -> None:
    # The control for the test above: upstream sits on the waiter until the timer fires.
    async def failing_app(scope: Message, receive: Any, send: Any) -> None:
        raise RuntimeError("boom")

    middleware = TimeoutMiddleware(failing_app, timeout=0.2)
    start = time.monotonic()
    sent, _ = run_plain(call(middleware, upstream_call))
    assert time.monotonic() - start >= 0.2
    assert sent == []  # and the error is swallowed
    gc.collect()  # let the never-retrieved task exception be reported here, not in a later test


def test_app_finishing_silently_returns_at_once() -> None:
    async def silent_app(scope: Message, receive: Any, send: Any) -> None:
        return None

    middleware = TimeoutMiddleware(silent_app, timeout=30)
    start = time.monotonic()
    sent, live = run_plain(call(middleware))
    assert time.monotonic() - start < middleware.timeout  # returned before the timer, not at it
    assert sent == []
    assert live == 0  # and its timer was cancelled


def test_non_http_scope_passes_through_without_timer() -> None:
    seen: list[str] = []

    async def app(scope: Message, receive: Any, send: Any) -> None:
        seen.append(scope["type"])

    middleware = TimeoutMiddleware(app, timeout=30)

    async def main() -> int:
        await middleware({"type": "lifespan"}, receive, None)
        loop = asyncio.get_running_loop()
        return len(loop._scheduled)  # type: ignore[attr-defined]

    timers, _ = run_plain(main())
    assert seen == ["lifespan"]
    assert timers == 0


# --- api_endpoint: pydantic errors in the platform envelope -------------------------------------


class Body(BaseModel):
    model: str
    inputs: list[list[float]]

    @field_validator("model")
    @classmethod
    def _served(cls, v: str) -> str:
        if v != "iris":
            raise PydanticCustomError(
                "model_not_found", "model '{name}' is not served", {"name": v}
            )
        return v


class InputSpec(Body):
    """Stands in for a BentoML IO model (a pydantic model class that parses the request body)."""

    @classmethod
    async def from_http_request(cls, request: Any, serde: Any) -> Body:
        return cls.model_validate_json(request.raw)


def factory(handler: Callable[..., Awaitable[Any]], *, is_main: bool = False) -> Any:
    """The parts of a ``ServiceAppFactory`` that the upstream ``api_endpoint`` reads."""
    api = SimpleNamespace(input_spec=InputSpec, ctx_param=None, batchable=False)
    return SimpleNamespace(
        is_main=is_main,
        service=SimpleNamespace(apis={"predict": api}, context=None),
        _service_instance=SimpleNamespace(predict=SimpleNamespace(local=handler)),
    )


def request(raw: bytes, content_type: str = "application/json") -> Any:
    return SimpleNamespace(headers={"Content-Type": content_type}, raw=raw)


async def handler(model: str, inputs: list[list[float]]) -> Response:
    return JSONResponse({"model": model, "rows": len(inputs)})


def endpoint(self: Any, raw: bytes, name: str = "predict", **kw: Any) -> Response:
    return asyncio.run(ServiceAppFactory.api_endpoint(self, name, request(raw, **kw)))


def test_valid_request_passes_through() -> None:
    response = endpoint(factory(handler), b'{"model": "iris", "inputs": [[1, 2]]}')
    assert response.status_code == 200
    assert json.loads(bytes(response.body)) == {"model": "iris", "rows": 1}


def test_invalid_json_is_400_envelope() -> None:
    response = endpoint(factory(handler), b'{"model": "iris", ')
    assert response.status_code == 400
    assert response.headers["content-type"] == "application/json"
    assert json.loads(bytes(response.body)) == {
        "error": {"type": "bad_request", "message": "request body is not valid JSON"}
    }


def test_missing_field_is_400_naming_it() -> None:
    response = endpoint(factory(handler), b'{"model": "iris"}')
    assert response.status_code == 400
    error = json.loads(bytes(response.body))["error"]
    assert error["type"] == "bad_request"
    assert "inputs" in error["message"]
    assert error["detail"] == [{"loc": "inputs", "msg": "Field required"}]


def test_unknown_model_is_404_envelope() -> None:
    response = endpoint(factory(handler), b'{"model": "nope", "inputs": [[1]]}')
    assert response.status_code == 404
    assert json.loads(bytes(response.body)) == {
        "error": {"type": "model_not_found", "message": "model 'nope' is not served"}
    }


@pytest.mark.usefixtures("no_envelope")
def test_without_the_platform_envelope_validation_errors_reach_bentoml() -> None:
    with pytest.raises(ValidationError):  # upstream's api_endpoint_wrapper answers it
        endpoint(factory(handler), b'{"model": "nope", "inputs": [[1]]}')


def test_other_errors_still_propagate() -> None:
    # Only ValidationError is mapped; everything else reaches upstream's api_endpoint_wrapper.
    with pytest.raises(KeyError):
        endpoint(factory(handler), b"{}", name="no_such_api")
    with pytest.raises(BentoMLException, match="pickle is not allowed"):
        endpoint(
            factory(handler, is_main=True),
            b"",
            content_type="application/vnd.bentoml+pickle",
        )

    async def crashing(model: str, inputs: list[list[float]]) -> Response:
        raise ZeroDivisionError

    with pytest.raises(ZeroDivisionError):
        endpoint(factory(crashing), b'{"model": "iris", "inputs": [[1]]}')


def test_validation_error_from_service_code_is_not_a_client_error() -> None:
    async def buggy(model: str, inputs: list[list[float]]) -> Response:
        Body.model_validate({"model": "iris"})  # a server bug, not the request's fault
        raise AssertionError("unreachable")

    with pytest.raises(ValidationError):
        endpoint(factory(buggy), b'{"model": "iris", "inputs": [[1, 2]]}')


@pytest.mark.parametrize(
    ("service", "stop_children"), [("llm", False), ("router", True), ("sklearn", True)]
)
def test_only_the_llm_watcher_leaves_its_children_to_the_worker(
    service: str, stop_children: bool
) -> None:
    """circus must not SIGTERM vLLM's engine processes (they would abort streams in flight);
    every other watcher keeps BentoML's stop_children=True."""
    import bentoml.serving

    args = ["-m", "_bentoml_impl.worker.service", "services:Router", "--service-name", service]
    watcher = bentoml.serving.create_watcher(name=f"service_{service}", args=args)
    assert watcher.stop_children is stop_children


# --- uvicorn: a response's head and body in one write -------------------------------------------


class CountingTransport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        assert not self.closed, "written after close"
        self.writes.append(data)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True


def run_response(
    response: Response,
    method: str = "GET",
    keep_alive: bool = True,
    transport: CountingTransport | None = None,
) -> list[bytes]:
    import logging

    from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

    transport = transport or CountingTransport()
    completed: list[bool] = []
    scope = {"type": "http", "method": method, "path": "/", "headers": [], "http_version": "1.1"}

    async def run() -> None:
        cycle = RequestResponseCycle(
            scope=scope,  # type: ignore[arg-type]
            transport=transport,  # type: ignore[arg-type]
            flow=SimpleNamespace(write_paused=False),  # type: ignore[arg-type]
            logger=logging.getLogger("test"),
            access_logger=logging.getLogger("test"),
            access_log=False,
            default_headers=[(b"server", b"uvicorn")],
            message_event=asyncio.Event(),
            expect_100_continue=False,
            keep_alive=keep_alive,
            on_response=lambda: completed.append(True),
        )

        requests = [{"type": "http.request", "body": b"", "more_body": False}]

        async def receive() -> dict[str, Any]:
            if requests:
                return requests.pop()
            await asyncio.Event().wait()  # the client stays connected
            raise AssertionError("unreachable")

        await response(scope, receive, cycle.send)  # type: ignore[arg-type]
        assert cycle.response_complete and completed == [True]

    asyncio.run(run())
    return transport.writes


def test_a_response_of_known_length_is_one_write() -> None:
    writes = run_response(JSONResponse({"ok": True}))
    assert len(writes) == 1
    head, _, body = writes[0].partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and b"content-length: 11" in head
    assert body == b'{"ok":true}'


@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_a_response_that_ends_the_connection_is_written_then_closed(method: str) -> None:
    # Connection: close from the client, or uvicorn shutting down: uvicorn closes the transport
    # after the last chunk. The close went to the stand-in transport, which had no close():
    # every such response logged "Exception in ASGI application" (seen in CI's shutdown test).
    transport = CountingTransport()
    writes = run_response(
        JSONResponse({"ok": True}), method=method, keep_alive=False, transport=transport
    )
    assert transport.closed
    assert len(writes) == 1 and writes[0].startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"connection: close" in writes[0]
    assert writes[0].endswith(b"\r\n\r\n" if method == "HEAD" else b'{"ok":true}')


def test_a_head_request_still_gets_its_head() -> None:
    writes = run_response(Response(b"abc", media_type="text/plain"), method="HEAD")
    assert len(writes) == 1 and writes[0].endswith(b"\r\n\r\n")
    assert b"content-length: 3" in writes[0]


def test_a_stream_gets_its_head_before_the_first_chunk() -> None:
    from starlette.responses import StreamingResponse

    async def chunks() -> Any:
        yield b"data: 1\n\n"
        yield b"data: 2\n\n"

    writes = run_response(StreamingResponse(chunks(), media_type="text/event-stream"))
    assert writes[0].startswith(b"HTTP/1.1 200 OK") and writes[0].endswith(b"\r\n\r\n")
    assert b"transfer-encoding: chunked" in writes[0]
    assert b"".join(writes[1:]) == b"9\r\ndata: 1\n\n\r\n9\r\ndata: 2\n\n\r\n0\r\n\r\n"


# --- Starlette: the request body in one receive() -----------------------------------------------


def test_the_body_read_in_one_receive_is_what_request_body_answers_afterwards() -> None:
    from starlette.requests import Request

    from services.compat.request_body import receive_body

    messages = [{"type": "http.request", "body": b'{"a": 1}', "more_body": False}]

    async def receive_once() -> Message:
        return messages.pop()  # a second receive() would fail: the body was read once

    async def main() -> tuple[bytes, bytes, bytes]:
        request = Request({"type": "http", "method": "POST", "headers": []}, receive_once)
        return await receive_body(request), await request.body(), await receive_body(request)

    assert asyncio.run(main()) == (b'{"a": 1}',) * 3
