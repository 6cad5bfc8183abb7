"""Failure isolation: a framework service worker killed under load (issue 7).

Only the models of that service fail while it is down, the others keep answering, and BentoML's
circus restarts the worker so those models serve again.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections import Counter

import aiohttp
import psutil

from bench.server import start_server
from tests.integration.conftest import MIXED_CONFIG

ROWS = {"iris": [5.1, 3.5, 1.4, 0.2], "iris-svc": [5.1, 3.5, 1.4, 0.2], "digits-svc": [0.0] * 64}


def worker_of(server, service: str) -> psutil.Process | None:
    """The live worker process of ``service`` (None while circus restarts it)."""
    for proc in psutil.Process(server.proc.pid).children(recursive=True):
        try:
            cmd = proc.cmdline()
        except psutil.Error:  # the killed worker, a zombie until circus reaps it
            continue
        if "--service-name" in cmd and cmd[cmd.index("--service-name") + 1] == service:
            return proc
    return None


def test_killed_service_worker_fails_only_its_models_and_comes_back(demo_store, tmp_path) -> None:
    srv = start_server(demo_store, MIXED_CONFIG, tmp_path)
    tallies: dict[tuple[str, str], Counter[str]] = {}
    phase = ["before"]

    async def client(session: aiohttp.ClientSession, model: str, stop: asyncio.Event) -> None:
        body = json.dumps({"model": model, "inputs": [ROWS[model]]}).encode()
        while not stop.is_set():
            started = phase[0]
            try:
                async with session.post(
                    f"{srv.url}/predict", data=body, headers={"content-type": "application/json"}
                ) as r:
                    payload = await r.json(content_type=None)
                    outcome = str(r.status)
                    if r.status >= 500:
                        # a 5xx says what is wrong, never how: no internals
                        assert set(payload["error"]) >= {"type", "message"}
                        assert "Traceback" not in json.dumps(payload)
            except (aiohttp.ClientError, TimeoutError) as e:
                outcome = type(e).__name__
            # a request that spans the kill or the recovery belongs to the outage
            when = started if started == phase[0] else "outage"
            tallies.setdefault((model, when), Counter())[outcome] += 1
            await asyncio.sleep(0.005)

    async def main() -> None:
        stop = asyncio.Event()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
            tasks = [
                asyncio.ensure_future(client(session, model, stop))
                for model in ("iris", "iris-svc", "digits-svc")
                for _ in range(4)
            ]
            await asyncio.sleep(1.5)
            victim = worker_of(srv, "sklearn")
            assert victim is not None, "no sklearn worker"
            phase[0] = "outage"
            os.kill(victim.pid, signal.SIGKILL)
            # circus restarts the worker; wait until iris-svc answers again (at most 60 s)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                await asyncio.sleep(0.5)
                recent = tallies.get(("iris-svc", "outage"), Counter())
                back = worker_of(srv, "sklearn")
                if recent.get("200", 0) and back is not None and back.pid != victim.pid:
                    async with session.post(
                        f"{srv.url}/predict",
                        json={"model": "iris-svc", "inputs": [ROWS["iris-svc"]]},
                    ) as r:
                        if r.status == 200:
                            break
            phase[0] = "after"
            await asyncio.sleep(2)
            stop.set()
            await asyncio.gather(*tasks)

    try:
        asyncio.run(main())
        print({f"{m}/{p}": dict(c) for (m, p), c in tallies.items()})
        # the other models never noticed: the inline one and the torch service's one
        for model in ("iris", "digits-svc"):
            for p in ("before", "outage", "after"):
                assert set(tallies[(model, p)]) == {"200"}, (model, p, tallies[(model, p)])
        # the killed service's model failed with a clear 5xx while down, and serves again
        assert set(tallies[("iris-svc", "before")]) == {"200"}
        outage = tallies[("iris-svc", "outage")]
        assert set(outage) - {"200"} <= {"503", "500"}, outage
        assert set(tallies[("iris-svc", "after")]) == {"200"}, tallies[("iris-svc", "after")]
        back = worker_of(srv, "sklearn")
        assert back is not None and back.is_running()
    finally:
        srv.stop()
