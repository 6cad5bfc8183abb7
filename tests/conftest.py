"""Shared test set-up: folder-based markers, a temporary model store, and a real server.

Nothing here reads the developer's own model store: every model is trained (tiny, seconds) into a
temporary ``BENTOML_HOME``, and every server binds 127.0.0.1 on a free port and is stopped by PID.
"""

from __future__ import annotations

import asyncio
import json
import os
import selectors
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import pytest

from bench.harness.server import ROOT
from bench.harness.store import bentoml_store

if TYPE_CHECKING:
    import httpx

    from bench.harness.server import Server

T = TypeVar("T")

# LLMs come from the store, never from the Hugging Face hub (no network in CI).
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark each test by its folder (tests/unit, tests/integration, tests/e2e)."""
    for item in items:
        parts = Path(str(item.fspath)).relative_to(ROOT / "tests").parts
        if parts and parts[0] in ("unit", "integration", "e2e"):
            item.add_marker(getattr(pytest.mark, parts[0]))


@pytest.fixture(scope="session")
def demo_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A temporary store holding the three small demo models (trained once per session)."""
    from training.ensure import ensure

    home = tmp_path_factory.mktemp("store") / "bentoml"
    with bentoml_store(home):
        ensure("small", progress=False)
        yield home


class Sent:
    """An ASGI ``send`` that records the messages: status, headers and JSON body of a response."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []

    async def __call__(self, message: dict[str, Any]) -> None:
        self.messages.append(message)

    @property
    def status(self) -> int:
        return self.messages[0]["status"]

    @property
    def headers(self) -> dict[str, str]:
        return {k.decode(): v.decode() for k, v in self.messages[0]["headers"]}

    @property
    def body(self) -> Any:
        return json.loads(b"".join(m.get("body", b"") for m in self.messages[1:]))


def engine_samples(url: str, name: str, model: str) -> list[tuple[dict[str, str], float]]:
    """The (labels, value) samples of vLLM engine metric ``name`` of served LLM ``model`` (its
    ``model_name`` label) on the ``/metrics`` at server ``url``."""
    from bench.harness.server import metric_samples

    return [
        (labels, v)
        for n, labels, v in metric_samples(f"{url}/metrics")
        if n == name and labels.get("model_name") == model
    ]


def engine_metric(url: str, name: str, model: str) -> float:
    """vLLM engine metric ``name`` of served LLM ``model``, summed over its series, from the
    ``/metrics`` at server ``url``; fails when it is missing."""
    values = [v for _, v in engine_samples(url, name, model)]
    assert values, f"{name} missing from /metrics"
    return sum(values)


def finished_requests(url: str, model: str) -> dict[str, float]:
    """How many requests LLM ``model`` at server ``url`` has finished, by reason (vLLM's
    ``vllm:request_success_total{finished_reason=...}``: ``length`` at max_tokens, ``stop`` at a
    stop token or string). vLLM 0.32 counts no reason for a request its client abandoned (the
    engine drops it, ``AsyncLLM.abort``): one that leaves the engine (``vllm:num_requests_running``
    back to 0) with these counts unchanged was aborted."""
    out: dict[str, float] = {}
    for labels, v in engine_samples(url, "vllm:request_success_total", model):
        out[labels["finished_reason"]] = out.get(labels["finished_reason"], 0.0) + v
    return out


# --- waiting without assuming the machine's speed (CONVENTIONS.md 16) --------------------------

WAIT_S = 60.0
"""How long :func:`eventually` and its kin wait by default. Something that happens at all happens
far sooner, even on a slow, busy 2-core CI machine: this deadline only ends a wait for something
that never comes. No test asserts how quickly a condition came true."""


def _poll(check: Callable[[], T], what: str, timeout: float, deadline: float) -> tuple[bool, T]:
    """One poll of :func:`eventually`: ``(True, result)`` when ``check()`` gave something truthy,
    ``(False, result)`` when not yet; past ``deadline`` a "not yet" fails, naming ``what``."""
    try:
        result = check()
    except AssertionError as e:
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what}: not within {timeout} s: {e}") from e
        return False, None  # type: ignore[return-value]
    if not result and time.monotonic() >= deadline:
        raise AssertionError(f"{what}: not within {timeout} s (last: {result!r})")
    return bool(result), result


def eventually(
    check: Callable[[], T], what: str, timeout: float = WAIT_S, every: float = 0.05
) -> T:
    """Poll ``check()`` every ``every`` s until it returns something truthy, and return that.

    An ``AssertionError`` from ``check`` counts as "not yet" too, so a check may assert with a
    message. Past ``timeout`` the wait fails, naming ``what`` (and the last assertion's message).
    """
    deadline = time.monotonic() + timeout
    while True:
        done, result = _poll(check, what, timeout, deadline)
        if done:
            return result
        time.sleep(every)


def settled(read: Callable[[], T], what: str, quiet_s: float = 1.5) -> T:
    """``read()`` once two reads ``quiet_s`` apart agree: for counts written out on a timer
    (usage per key: each router worker writes its counts up to a second after a request), so a
    baseline taken right after earlier requests does not miss some of theirs."""
    last = [read()]

    def steady() -> tuple[T] | None:
        time.sleep(quiet_s)
        now = read()
        agree, last[0] = now == last[0], now
        return (now,) if agree else None

    return eventually(steady, what)[0]


async def eventually_async(
    check: Callable[[], T], what: str, timeout: float = WAIT_S, every: float = 0.05
) -> T:
    """:func:`eventually` inside an event loop: the loop keeps running between polls."""
    deadline = time.monotonic() + timeout
    while True:
        done, result = _poll(check, what, timeout, deadline)
        if done:
            return result
        await asyncio.sleep(every)


def on_every_router_worker(
    server: Server, check: Callable[[httpx.Client], Any], what: str, timeout: float = WAIT_S
) -> None:
    """Wait until ``check(client)`` has held on a connection to each router worker of ``server``.

    A keep-alive client talks to one router worker for as long as its connection lives (the
    kernel hands each new connection to one of the workers sharing the port), and every worker
    reloads models, aliases and keys on its own poll: what one worker answers says nothing of
    the other. Here every attempt opens a new connection and the worker at its far end is found
    by PID (psutil), so the wait ends when each worker has answered as ``check`` wants, instead
    of after a sleep long enough for "the other one". A reload is never undone, so once per
    worker is enough; requests on any connection afterwards see the new state.
    """
    import httpx
    import psutil

    workers = int(server.env.get("SERVERY_ROUTER_WORKERS", "2"))
    port = int(server.url.rsplit(":", 1)[1])
    seen: set[int] = set()

    def attempt() -> bool:
        local_ports: list[int] = []

        def note(response: httpx.Response) -> None:
            stream = response.extensions["network_stream"]
            local_ports.append(stream.get_extra_info("client_addr")[1])

        hooks = {"response": [note]}
        with httpx.Client(base_url=server.url, timeout=30, event_hooks=hooks) as client:
            if check(client) and local_ports:
                # the server's end of this (still open) connection, and the worker holding it
                seen.update(
                    c.pid
                    for c in psutil.net_connections("tcp")
                    if c.pid
                    and c.status == psutil.CONN_ESTABLISHED
                    and c.laddr.port == port
                    and c.raddr
                    and c.raddr.port == local_ports[-1]
                )
        return len(seen) >= workers

    eventually(attempt, f"{what}, on each of the {workers} router workers", timeout)


class _JumpingSelector(selectors.DefaultSelector):  # type: ignore[misc,valid-type]
    """Never waits for a timer: moves the loop's clock to it instead (see VirtualClockLoop)."""

    def __init__(self, loop: VirtualClockLoop) -> None:
        super().__init__()
        self._loop = loop

    def select(self, timeout: float | None = None) -> Any:
        if timeout is not None and timeout > 0:
            self._loop.now += timeout
            timeout = 0
        return super().select(timeout)


class VirtualClockLoop(asyncio.SelectorEventLoop):
    """An asyncio loop whose clock only moves when it has nothing to run: where it would wait for
    its next timer, it jumps there instead.

    Timer-driven code (a batcher's hold, request deadlines, ``asyncio.sleep`` arrivals a few ms
    apart) then sees the events of a test in the order of their loop times, however slow or busy
    the machine: a stall of the process cannot let a later timer fire before the work an earlier
    one started, and a test of seconds of loop time takes none. For coroutines only: a loop
    waiting on a thread would not wait for it while a timer is pending."""

    def __init__(self) -> None:
        self.now = 0.0
        super().__init__(_JumpingSelector(self))

    def time(self) -> float:
        return self.now


def run_on_virtual_clock(coro: Any) -> Any:
    """``asyncio.run(coro)`` on a :class:`VirtualClockLoop`."""
    with asyncio.Runner(loop_factory=VirtualClockLoop) as runner:
        return runner.run(coro)
