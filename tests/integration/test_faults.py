"""Failure isolation: a framework service worker killed under load (issue 7), or stopped with
requests in it (the request timeout answers them 504).

Only the models of that service fail while it is down, the others keep answering, and BentoML's
circus restarts the worker so those models serve again. Meanwhile the router says so: the model
is not ready on every view (``GET /models``, ``/models/{name}``, OIP REST model ready, gRPC
``ModelReady``) with the reason, while ``/readyz`` stays 200 (docs/operations.md, "Readiness and
failures").
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections import Counter
from typing import Any

import aiohttp
import grpc
import psutil
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from bench.harness.server import start_server
from tests.conftest import WAIT_S, eventually_async
from tests.integration.conftest import MIXED_CONFIG

ROWS = {"iris": [5.1, 3.5, 1.4, 0.2], "iris-svc": [5.1, 3.5, 1.4, 0.2], "digits-svc": [0.0] * 64}
VIEWS = ("models", "model", "oip", "grpc")


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


async def readiness(session: aiohttp.ClientSession, url: str, stub: Any) -> dict[str, Any]:
    """What each view says of the models now: ``readyz`` (status), and per view whether
    ``iris-svc`` is ready (with the reason given), and whether the others are."""
    seen: dict[str, Any] = {}
    async with session.get(f"{url}/readyz") as r:
        seen["readyz"] = r.status
    async with session.get(f"{url}/models") as r:
        models = {m["name"]: m for m in (await r.json())["models"]}
    seen["models"] = (models["iris-svc"]["ready"], models["iris-svc"].get("error"))
    seen["others"] = [models[m]["ready"] for m in ("iris", "digits-svc")]
    async with session.get(f"{url}/models/iris-svc") as r:
        one = await r.json()
    seen["model"] = (one["ready"], one.get("error"))
    async with session.get(f"{url}/v2/models/iris-svc/ready") as r:
        body = await r.json()
        seen["oip"] = (r.status == 200, body.get("error"))
    async with session.get(f"{url}/v2/models/digits-svc/ready") as r:
        seen["others"].append(r.status == 200)
    ready = await stub.ModelReady(pb.ModelReadyRequest(name="iris-svc"), timeout=5)
    seen["grpc"] = (ready.ready, None)
    return seen


def test_killed_service_worker_fails_only_its_models_and_comes_back(demo_store, tmp_path) -> None:
    srv = start_server(demo_store, MIXED_CONFIG, tmp_path)
    tallies: dict[tuple[str, str], Counter[str]] = {}
    phase = ["before"]
    views: dict[str, list[dict[str, Any]]] = {"before": [], "outage": [], "after": []}

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
                        outcome += f" {payload['error']['type']}"
            except (aiohttp.ClientError, TimeoutError) as e:
                outcome = type(e).__name__
            # a request that spans the kill or the recovery belongs to the outage
            when = started if started == phase[0] else "outage"
            tallies.setdefault((model, when), Counter())[outcome] += 1
            await asyncio.sleep(0.005)

    async def poll_until(session, stub, phase_: str, done, bound_s: float = WAIT_S) -> None:
        """Poll every view until ``done(seen so far)`` or ``bound_s`` (a hang) passes."""
        deadline = time.monotonic() + bound_s
        while time.monotonic() < deadline:
            views[phase_].append(await readiness(session, srv.url, stub))
            if done(views[phase_]):
                return
            await asyncio.sleep(0.1)

    def answered(phase_: str, n: int) -> bool:
        """Every client's model has ``n`` answers in ``phase_``: the load ran through it."""
        return all(
            sum(tallies.get((m, phase_), Counter()).values()) >= n
            for m in ("iris", "iris-svc", "digits-svc")
        )

    def each_view_said(ready: bool):
        return lambda seen: all(any(s[v][0] is ready for s in seen) for v in VIEWS)

    async def main() -> None:
        stop = asyncio.Event()
        channel = grpc.aio.insecure_channel(srv.grpc_url)
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
            tasks = [
                asyncio.ensure_future(client(session, model, stop))
                for model in ("iris", "iris-svc", "digits-svc")
                for _ in range(4)
            ]
            await eventually_async(lambda: answered("before", 20), "answers before the kill")
            views["before"].append(await readiness(session, srv.url, stub))
            victim = worker_of(srv, "sklearn")
            assert victim is not None, "no sklearn worker"
            phase[0] = "outage"
            killed = time.monotonic()
            os.kill(victim.pid, signal.SIGKILL)
            # every view reports iris-svc not ready while the worker is down
            await poll_until(session, stub, "outage", each_view_said(False))
            print(f"every view said not ready within {time.monotonic() - killed:.1f} s")
            # circus restarts the worker; wait until iris-svc answers again
            deadline = time.monotonic() + WAIT_S
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
            print(f"iris-svc answered again after {time.monotonic() - killed:.1f} s")
            # every view says ready again: each router worker on its own, at its next probe
            # (every 0.5 s while a service is down); until then that worker still answers the
            # model 503 at once (it knows the service as down), so these requests are counted
            # apart ("recovering")
            phase[0] = "recovering"
            await poll_until(
                session,
                stub,
                "after",
                lambda seen: len(seen) >= 6 and all(all_ready(s) for s in seen[-6:]),
            )
            phase[0] = "after"
            # requests started after the recovery, for every model, all answered (checked below)
            await eventually_async(lambda: answered("after", 20), "answers after the recovery")
            stop.set()
            await asyncio.gather(*tasks)
        await channel.close()

    def all_ready(seen: dict[str, Any]) -> bool:
        return all(seen[v][0] for v in VIEWS)

    try:
        asyncio.run(main())
        print({f"{m}/{p}": dict(c) for (m, p), c in tallies.items()})
        # the other models never noticed: the inline one and the torch service's one
        for model in ("iris", "digits-svc"):
            for p in ("before", "outage", "after"):
                assert set(tallies[(model, p)]) == {"200"}, (model, p, tallies[(model, p)])
            assert set(tallies.get((model, "recovering"), Counter())) <= {"200"}
        # the killed service's model failed with a clear 503 while down, and serves again
        assert set(tallies[("iris-svc", "before")]) == {"200"}
        outage = tallies[("iris-svc", "outage")]
        assert set(outage) - {"200"} <= {"503 model_not_ready", "503 overloaded"}, outage
        recovering = tallies.get(("iris-svc", "recovering"), Counter())
        assert set(recovering) <= {"200", "503 model_not_ready"}, recovering
        assert set(tallies[("iris-svc", "after")]) == {"200"}, tallies[("iris-svc", "after")]
        back = worker_of(srv, "sklearn")
        assert back is not None and back.is_running()

        # readiness: the router stays in rotation throughout, the other models stay ready
        for p, seen in views.items():
            for s in seen:
                assert s["readyz"] == 200 and all(s["others"]), (p, s)
        assert all_ready(views["before"][0]), views["before"]
        outage_views = views["outage"]
        assert each_view_said(False)(outage_views), outage_views
        reasons = {s[v][1] for s in outage_views for v in ("models", "model", "oip") if not s[v][0]}
        assert reasons and all("sklearn service" in r for r in reasons), reasons
        assert all(all_ready(s) for s in views["after"][-6:]), views["after"]
    finally:
        srv.stop()


HUNG_CONFIG = """models:
  - {name: iris, tag: iris, placement: inline}
  - {name: iris-svc, tag: iris, placement: service}
  - {name: iris-svc2, tag: iris, placement: service}
"""
"""Two models in the sklearn service: each has its own micro-batcher, so one router worker has
two calls in the service at once (one batcher sends one batch at a time)."""


def test_a_hung_service_call_ends_in_a_504_timeout_and_the_service_recovers(
    demo_store, tmp_path
) -> None:
    """SIGSTOP the sklearn worker. A request whose call is in the service when its deadline
    passes is answered 504 ``timeout`` at the request timeout, not 503 by BentoML's client giving
    up on the call 1 % later. The router's deadlines share one timer: the second model's request,
    whose deadline falls 15 ms after the first's, must still be cancelled inside that margin.
    Requests queued behind those calls (a batcher sends one batch at a time) end with the same 504
    or, once the timed-out call has marked the service down, a 503 ``model_not_ready`` that says
    so. The inline model keeps answering meanwhile, and the service serves again after SIGCONT."""
    timeout_s = 2.0
    env = {"SERVERY_REQUEST_TIMEOUT_S": str(timeout_s), "SERVERY_ROUTER_WORKERS": "1"}
    srv = start_server(demo_store, HUNG_CONFIG, tmp_path, env=env)
    rows = {**ROWS, "iris-svc2": ROWS["iris-svc"]}

    async def post(session: aiohttp.ClientSession, model: str) -> tuple[int, Any, float]:
        body = {"model": model, "inputs": [rows[model]]}
        start = time.monotonic()
        async with session.post(f"{srv.url}/predict", json=body) as r:
            return r.status, await r.json(content_type=None), time.monotonic() - start

    async def main() -> tuple[list[Any], Any, Any]:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
            for model in ("iris-svc", "iris-svc2"):
                assert (await post(session, model))[0] == 200
            victim = worker_of(srv, "sklearn")
            assert victim is not None, "no sklearn worker"
            os.kill(victim.pid, signal.SIGSTOP)
            try:
                # routed while the service still counts as up (its probe needs 1 s to fail),
                # the two models in turn, 15 ms apart
                hung = []
                for i in range(6):
                    model = ("iris-svc", "iris-svc2")[i % 2]
                    hung.append(asyncio.ensure_future(post(session, model)))
                    await asyncio.sleep(0.015)
                inline = await post(session, "iris")
                answers = await asyncio.gather(*hung)
            finally:
                os.kill(victim.pid, signal.SIGCONT)
            # the service answers again once it runs (the probe marks it up)
            deadline = time.monotonic() + WAIT_S
            while True:
                again = await post(session, "iris-svc")
                if again[0] == 200 or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.5)
            return answers, inline, again

    try:
        answers, inline, again = asyncio.run(main())
        # In a service call at their deadline: a 504 ``timeout`` is the router's deadline (BentoML's
        # client giving up would be a 503), and not before the timeout. No upper bound on the time:
        # the answer's type says which path answered, and a hang ends in the client's 30 s.
        for status, body, seconds in answers[:2]:
            assert (status, body["error"]["type"]) == (504, "timeout"), (status, body, seconds)
            assert seconds >= timeout_s, seconds
        for status, body, _ in answers[2:]:  # queued behind those calls
            assert (status, body["error"]["type"]) in {(504, "timeout"), (503, "model_not_ready")}
            if status == 503:
                assert "sklearn service is not reachable" in body["error"]["message"], body
        assert inline[0] == 200, inline  # the inline model never waited on the stopped service
        assert again[0] == 200, again
    finally:
        srv.stop()
