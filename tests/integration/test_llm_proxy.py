"""services/llm/proxy.py against real servers: incremental streaming, disconnects, errors.

An upstream Starlette app on a Unix socket (as BentoML runs a dependency service) streams
chunks slowly; the proxy runs in uvicorn on a loopback port; clients are httpx.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from bench.harness.server import free_port
from services.llm.proxy import StreamingProxy
from tests.conftest import eventually
from tests.integration.conftest import Background

CHUNKS = 20
STREAM_R = {"test": "stream", "tag": "r"}
STREAM_X = {"test": "stream", "tag": "x"}
GATED = {"test": "gated"}
GAP_S = 0.05
state: dict[str, float | None] = {"cancelled_at": None, "stall_answered_at": None}
done: list[tuple[str, int, float]] = []
release = threading.Event()
"""Set by a test to let ``/v1/gated`` write its second chunk."""


async def stream(request: Request) -> StreamingResponse:
    body = await request.json()

    async def gen():
        try:
            for i in range(body.get("chunks", CHUNKS)):
                yield f"data: {body['tag']}-{i}\n\n".encode()
                await asyncio.sleep(GAP_S)
            yield b"data: [DONE]\n\n"
        except asyncio.CancelledError:
            state["cancelled_at"] = time.monotonic()
            raise

    return StreamingResponse(gen(), media_type="text/event-stream")


async def models(request: Request) -> JSONResponse:
    return JSONResponse({"object": "list", "q": request.url.query}, status_code=200)


async def stall(request: Request) -> StreamingResponse:
    """Answers after ``first_s``, then writes one chunk and goes quiet for ``gap_s``."""
    body = await request.json()
    await asyncio.sleep(body["first_s"])
    state["stall_answered_at"] = time.monotonic()

    async def gen():
        try:
            yield b"data: first\n\n"
            await asyncio.sleep(body["gap_s"])
            yield b"data: late\n\n"
        except asyncio.CancelledError:
            state["cancelled_at"] = time.monotonic()
            raise

    return StreamingResponse(gen(), media_type="text/event-stream")


async def gated(request: Request) -> StreamingResponse:
    """Writes one chunk, then the next only once a test sets ``release`` (at most 30 s on)."""

    async def gen():
        yield b"data: before\n\n"
        deadline = time.monotonic() + 30
        while not release.is_set() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        yield b"data: after\n\n" if release.is_set() else b"data: never released\n\n"

    return StreamingResponse(gen(), media_type="text/event-stream")


async def bad(request: Request) -> JSONResponse:
    return JSONResponse({"error": {"message": "nope", "code": 400}}, status_code=400)


async def completions(request: Request) -> Any:
    """The proxy forwards only the OpenAI routes: ``/v1/completions`` acts as the body's
    ``test`` says."""
    handler = {"stream": stream, "bad": bad, "stall": stall, "gated": gated}
    return await handler[(await request.json())["test"]](request)


async def anything(request: Request) -> JSONResponse:
    reached.append(request.url.path)
    return JSONResponse({"reached": request.url.path})


reached: list[str] = []
"""Paths of the upstream's other routes that a request reached (the proxy must never forward)."""

UPSTREAM = Starlette(
    routes=[
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/models", models),
        Route("/metrics", anything),
        Route("/v1/other", anything, methods=["GET", "POST"]),
    ]
)


@pytest.fixture(scope="module")
def upstream_sock(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    sock = Path(tmp_path_factory.mktemp("sock")) / "llm.sock"
    upstream = Background(UPSTREAM, uds=str(sock))
    try:
        yield sock
    finally:
        upstream.stop()


def start_proxy(sock: Path, **kwargs) -> tuple[Background, str]:
    port = free_port()
    proxy = Background(
        StreamingProxy(lambda: f"unix://{sock}", **kwargs), host="127.0.0.1", port=port
    )
    return proxy, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def proxy_url(upstream_sock: Path) -> Iterator[str]:
    proxy, url = start_proxy(upstream_sock, on_done=lambda *a: done.append(a))
    try:
        yield url
    finally:
        proxy.stop()


@pytest.fixture(scope="module")
def short_read_url(upstream_sock: Path) -> Iterator[str]:
    """A proxy that gives up on a service silent for 0.5 s."""
    proxy, url = start_proxy(upstream_sock, read_timeout_s=0.5)
    try:
        yield url
    finally:
        proxy.stop()


def test_silent_service_is_504_json(short_read_url: str) -> None:
    """Nothing from the service within the read timeout: 504 in the OpenAI envelope."""
    state["stall_answered_at"] = None
    r = httpx.post(
        f"{short_read_url}/v1/completions",
        json={"test": "stall", "first_s": 5, "gap_s": 0},
        timeout=20,
    )
    assert r.status_code == 504
    assert r.json()["error"]["code"] == 504
    assert "sent nothing for 0.5 s" in r.json()["error"]["message"]
    # answered by the read timeout, while the service was still silent
    assert state["stall_answered_at"] is None


def test_stream_that_goes_silent_is_ended_and_cancelled(short_read_url: str) -> None:
    """A stream silent past the read timeout ends for the client and upstream is cancelled."""
    state["cancelled_at"] = None
    with httpx.stream(
        "POST",
        f"{short_read_url}/v1/completions",
        json={"test": "stall", "first_s": 0, "gap_s": 60},
        timeout=30,
    ) as r:
        assert r.status_code == 200
        text = b"".join(r.iter_raw())
    assert text == b"data: first\n\n"  # ended by the read timeout, not by the service's 60 s
    eventually(lambda: state["cancelled_at"], "upstream cancelled after the read timeout")


def test_fast_answers_are_not_cut_by_the_read_timeout(short_read_url: str) -> None:
    """Chunks 50 ms apart over ~1 s: each read is within 0.5 s, the whole stream passes."""
    with httpx.stream("POST", f"{short_read_url}/v1/completions", json=STREAM_R, timeout=30) as r:
        text = b"".join(r.iter_raw()).decode()
    assert text.endswith("data: [DONE]\n\n") and text.count("data: r-") == CHUNKS


def test_chunks_arrive_as_they_are_written(proxy_url: str) -> None:
    with httpx.stream("POST", f"{proxy_url}/v1/completions", json=STREAM_X, timeout=30) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        text = b"".join(r.iter_raw()).decode()
    assert text.startswith("data: x-0\n\n") and text.endswith("data: [DONE]\n\n")
    # A chunk reaches the client while the service holds the rest back: the service writes its
    # second chunk only after the client has the first, so a proxy that buffered the answer
    # would deliver both at once, 30 s later ("never released").
    release.clear()
    with httpx.stream("POST", f"{proxy_url}/v1/completions", json=GATED, timeout=60) as r:
        assert r.status_code == 200
        chunks = r.iter_raw()
        assert next(chunks) == b"data: before\n\n"
        release.set()
        assert b"".join(chunks) == b"data: after\n\n"


def test_client_disconnect_cancels_upstream(proxy_url: str) -> None:
    state["cancelled_at"] = None
    # a stream of ~50 s upstream: only a cancel ends it within the wait below
    body = {"test": "stream", "tag": "y", "chunks": 1000}
    with httpx.stream("POST", f"{proxy_url}/v1/completions", json=body, timeout=30) as r:
        for n, _ in enumerate(r.iter_raw()):
            if n == 2:
                break
    eventually(lambda: state["cancelled_at"], "upstream stopped generating after the client left")


def test_status_body_and_query_pass_through(proxy_url: str) -> None:
    r = httpx.get(f"{proxy_url}/v1/models?a=1", timeout=10)
    assert r.status_code == 200 and r.json() == {"object": "list", "q": "a=1"}
    r = httpx.post(f"{proxy_url}/v1/completions", json={"test": "bad", "model": "m1"}, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["message"] == "nope"
    # on_done(model as sent, status, seconds) runs once the exchange is over, just after the
    # client has its answer
    eventually(lambda: ("m1", 400) in [(m, s) for m, s, _ in done], "on_done for the 400")
    assert ("-", 200) in [(m, s) for m, s, _ in done]  # the GET above had no JSON body


@pytest.mark.parametrize(
    ("method", "target"),
    [
        ("GET", "/v1/../metrics"),
        ("GET", "/v1/%2E%2E/metrics"),
        ("GET", "/v1/other"),
        ("POST", "/v1/completions%3F"),
        ("GET", "/v1/models%3F"),
        ("GET", "/v1//models"),
    ],
)
def test_only_allow_listed_paths_are_forwarded(proxy_url: str, method: str, target: str) -> None:
    """Matched on the raw path; 404 in the OpenAI envelope, nothing reaches the service."""
    import http.client
    import json

    conn = http.client.HTTPConnection(proxy_url.removeprefix("http://"), timeout=10)
    conn.request(method, target, body=b'{"test": "stream", "tag": "z"}')
    r = conn.getresponse()
    assert r.status == 404 and json.loads(r.read())["error"]["code"] == 404
    conn.close()
    assert reached == []
    r = httpx.put(f"{proxy_url}/v1/models", timeout=10)  # a listed path, another method
    assert r.status_code == 405 and r.json()["error"]["code"] == 405


def test_bodies_are_read_up_to_the_limit(upstream_sock: Path) -> None:
    proxy, url = start_proxy(upstream_sock, max_body_bytes=1024)
    try:
        r = httpx.post(f"{url}/v1/completions", content=b"x" * 2000, timeout=10)
        assert r.status_code == 413 and r.json()["error"]["code"] == 413
        chunks = iter([b'{"test": "bad", "pad": "', b"y" * 2000, b'"}'])  # chunked
        r = httpx.post(f"{url}/v1/completions", content=chunks, timeout=10)
        assert r.status_code == 413
    finally:
        proxy.stop()


def test_unreachable_service_is_503_json(tmp_path: Path) -> None:
    port = free_port()
    proxy = Background(
        StreamingProxy(lambda: f"unix://{tmp_path}/missing.sock"), host="127.0.0.1", port=port
    )
    try:
        r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json={}, timeout=10)
        assert r.status_code == 503
        assert "not reachable" in r.json()["error"]["message"]
    finally:
        proxy.stop()
