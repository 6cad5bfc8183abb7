"""SIGTERM under load (Kubernetes stopping a pod): admitted requests are answered, none fails.

The signal goes to the ``bentoml serve`` process only, as Kubernetes sends it to the container's
PID 1; circus then stops the router and its dependencies at once, and the dependencies keep
serving ``SERVERY_SHUTDOWN_DRAIN_S`` (services/ops/shutdown.py).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time
from collections import Counter

import aiohttp
import psutil
import pytest

from bench.harness.server import start_server
from tests.conftest import WAIT_S, eventually, eventually_async
from tests.integration.conftest import MIXED_CONFIG

# Connection-level failures of requests the server never read: a new connection after the
# listening socket closed (refused), or a request written onto an idle keep-alive connection
# that uvicorn's shutdown was closing at that moment (reset / disconnected before any response).
JSON = {"content-type": "application/json"}
DRAINING = (
    "SIGTERM: serving 3.0 s more"  # a framework service's log line (services/ops/shutdown.py)
)
NOT_ADMITTED = {"ClientConnectorError", "ServerDisconnectedError", "ClientOSError"}


def service_sockets(pid: int) -> set[str]:
    """The Unix socket paths the ``bentoml serve`` process listens on for the framework services."""
    return {
        c.laddr
        for c in psutil.Process(pid).net_connections(kind="unix")
        if isinstance(c.laddr, str) and "bentoml-uds-" in c.laddr
    }


def all_workers_serving(srv) -> bool:
    """Every router worker has answered a prediction (its access log shows a 200)."""
    log = srv.log.read_text(errors="replace")
    workers = int(srv.env.get("SERVERY_ROUTER_WORKERS", "2"))
    return all(
        re.search(rf"\[entry_service:router:{i}\].*path=/predict\) \(status=200", log)
        for i in range(1, workers + 1)
    )


@pytest.mark.parametrize("model", ["iris", "iris-svc"])
def test_sigterm_under_load_loses_no_admitted_request(demo_store, tmp_path, model: str) -> None:
    srv = start_server(demo_store, MIXED_CONFIG, tmp_path, env={"SERVERY_SHUTDOWN_DRAIN_S": "3"})
    body = json.dumps({"model": model, "inputs": [[5.1, 3.5, 1.4, 0.2]]}).encode()
    before: Counter[str] = Counter()
    after: Counter[str] = Counter()
    signalled = asyncio.Event()
    sockets: set[str] = set()
    kept: set[str] = set()

    async def client(session: aiohttp.ClientSession, stop: asyncio.Event) -> None:
        while not stop.is_set():
            tally = after if signalled.is_set() else before
            try:
                async with session.post(
                    f"{srv.url}/predict", data=body, headers={"content-type": "application/json"}
                ) as r:
                    payload = await r.read()
                    ok = r.status == 200 and json.loads(payload)["predictions"] == [0]
                    tally["200" if ok else f"{r.status}: {payload[:200]!r}"] += 1
            except (aiohttp.ClientError, TimeoutError) as e:
                # counted by when it failed: a request written before the signal onto a
                # keep-alive connection that shutdown then closed unread fails after it
                (after if signalled.is_set() else before)[type(e).__name__] += 1
                await asyncio.sleep(0.05)

    async def main() -> None:
        stop = asyncio.Event()
        timeout = aiohttp.ClientTimeout(total=30)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            clients = [asyncio.ensure_future(client(session, stop)) for _ in range(32)]
            # The clients' keep-alive connections may all sit on the worker that answered
            # /readyz first. Signal once every worker has served, so both workers have requests
            # in flight at the signal.
            deadline = time.monotonic() + WAIT_S
            while time.monotonic() < deadline and not all_workers_serving(srv):
                # new connections, so the kernel hands some to each worker
                async with aiohttp.ClientSession() as fresh:
                    await asyncio.gather(
                        *(
                            fresh.post(f"{srv.url}/predict", data=body, headers=JSON)
                            for _ in range(8)
                        )
                    )
                await asyncio.sleep(0.2)
            assert all_workers_serving(srv), "a router worker never answered"
            sockets.update(service_sockets(srv.proc.pid))
            assert len(sockets) >= 3, sockets  # sklearn, xgboost, torch
            # the load is on (two answers a client so far), rather than a sleep for it to be
            await eventually_async(lambda: before["200"] >= 2 * 32, "answers before the signal")
            signalled.set()
            os.kill(srv.proc.pid, signal.SIGTERM)
            # While the services drain, a new connection to them must still find their sockets:
            # BentoML deleted the directory at once (services/compat/arbiter_stop_order.py),
            # before it signalled the services. Look once a service says it drains: the arbiter
            # is past that point, and the drain (3 s) has just begun.
            await eventually_async(
                lambda: DRAINING in srv.log.read_text(errors="replace"), "a service draining"
            )
            kept.update(s for s in sockets if os.path.exists(s))
            # the deadline only catches a hang: the drain is 3 s (circus would wait a day)
            await eventually_async(lambda: srv.proc.poll() is not None, "the server's exit")
            stop.set()
            await asyncio.gather(*clients)

    def group_gone() -> bool:
        try:
            os.killpg(srv.proc.pid, 0)
        except ProcessLookupError:
            return True
        return False

    try:
        asyncio.run(main())
        assert set(before) == {"200"}, before
        # requests in flight at the signal were answered, and nothing the server read failed
        assert after["200"] > 0, after
        assert set(after) <= {"200"} | NOT_ADMITTED, after
        # graceful: every process of the server finished on its own (nothing here kills one)
        eventually(group_gone, "every process of the server gone")
        log = srv.log.read_text(errors="replace")
        assert "SIGTERM: serving 3.0 s more" in log  # the framework services drained
        assert kept == sockets, f"deleted during the drain: {sorted(sockets - kept)}"
        assert not any(os.path.exists(os.path.dirname(s)) for s in sockets)  # removed at exit
        assert "is not reachable" not in log
        assert "Exception in ASGI application" not in log
    finally:
        srv.stop()
