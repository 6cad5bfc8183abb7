"""Per-model metrics: request/latency series in the handlers, batch series in the micro-batcher,
in-flight/queue-depth gauges, model readiness, and bounded label cardinality."""

from __future__ import annotations

import asyncio
import gc
import json
import math
import random
import string
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import REGISTRY, CollectorRegistry, Histogram

from bench.harness.store import bentoml_store, save_iris
from services.ops import metrics
from services.runtime.batcher import MicroBatcher, Result
from services.runtime.errors import ModelNotReady
from tests.conftest import eventually, run_on_virtual_clock


def value(metric: Any, suffix: str = "", **labels: str) -> float:
    """The sample ``<name><suffix>`` of ``metric`` whose labels include ``labels`` (0 if none)."""
    family = metric.collect()[0]
    name = family.name + suffix
    total = 0.0
    for s in family.samples:
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
            if suffix == "_bucket" and s.labels.get("le") != "+Inf":
                continue
            total += s.value
    return total


def count(metric: Any, **labels: str) -> float:
    return value(metric, "_count", **labels)


def series() -> set[tuple[str, tuple[tuple[str, str], ...]]]:
    """Every servery_* sample (name + labels) in this process's default registry."""
    out = set()
    for family in REGISTRY.collect():
        for s in family.samples:
            if s.name.startswith("servery_"):
                out.add((s.name, tuple(sorted(s.labels.items()))))
    return out


def rows(*values: float) -> np.ndarray:
    return np.array([[v] for v in values], dtype=np.float64)


class RowSums:
    """A model: class = 0, probabilities = the row's value; records its batches."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def __call__(self, x: np.ndarray) -> Result:
        self.calls.append(len(x))
        return np.zeros(len(x), dtype=np.int64), x


def tag() -> str:
    return "t" + "".join(random.choices(string.ascii_lowercase, k=10))


# --- observe_many -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "values",
    [[0.0003], [0.0001, 0.0001, 0.0002, 0.004, 0.004, 99.0, 0.0], [0.001] * 40, [10.0, 10.0001]],
)
def test_observe_many_equals_one_observe_per_value(values: list[float]) -> None:
    registry = CollectorRegistry()
    buckets = metrics.SECONDS_BUCKETS
    one = Histogram("one", "one", ["k"], buckets=buckets, registry=registry).labels("a")
    many = Histogram("many", "many", ["k"], buckets=buckets, registry=registry).labels("a")
    for v in values:
        one.observe(v)
    metrics.observe_many(many, values)
    assert [b.get() for b in many._buckets] == [b.get() for b in one._buckets]
    assert many._sum.get() == pytest.approx(one._sum.get())


# --- the batcher's series ---------------------------------------------------------------------


def test_one_batch_records_compute_once_and_every_request_wait() -> None:
    name = tag()
    bm = metrics.BatchMetrics(name, "v1", "inline")
    predict = RowSums()
    batcher = MicroBatcher(predict, max_batch_size=64, metrics=bm)

    async def main() -> None:
        await asyncio.gather(*(batcher.submit(rows(i, i)) for i in range(5)))

    asyncio.run(main())
    assert predict.calls == [10]
    labels = {"model": name, "version": "v1", "placement": "inline"}
    assert count(metrics.MODEL_COMPUTE_SECONDS, **labels) == 1
    assert count(metrics.QUEUE_WAIT_SECONDS, **labels) == 5
    assert value(metrics.QUEUE_WAIT_SECONDS, "_sum", **labels) > 0
    assert count(metrics.BATCH_SIZE, **labels) == 1
    assert value(metrics.BATCH_SIZE, "_sum", **labels) == 10
    assert value(metrics.BATCH_REQUESTS, "_sum", **labels) == 5
    gauges = {"model": name, "version": "v1"}
    assert value(metrics.IN_FLIGHT, **gauges) == 0
    assert value(metrics.QUEUE_DEPTH, **gauges) == 0


def test_batcher_decisions_are_counted_per_reason_with_hold_times_and_shed() -> None:
    """A scripted load on loop time: each flush is counted once, by why it happened."""
    name = tag()
    labels = {"model": name, "version": "v1", "placement": "inline"}
    predict = RowSums()
    batcher = MicroBatcher(
        predict, max_batch_size=4, hold_s=0.05, metrics=metrics.BatchMetrics(name, "v1", "inline")
    )

    async def late(i: int) -> Result:
        await asyncio.sleep(0.005 * i)
        return await batcher.submit(rows(i))

    async def main() -> None:
        await batcher.submit(rows(0))  # alone and held: nobody comes (back-off: skip 1)
        await asyncio.gather(*(late(i) for i in range(3)))  # skipped: tick; then 2 held together
        await asyncio.gather(*(late(i) for i in range(5)))  # held until 4 rows wait; 1 alone

    run_on_virtual_clock(asyncio.wait_for(main(), 5))
    assert predict.calls == [1, 1, 2, 4, 1]
    flushes = {
        r: value(metrics.BATCH_FLUSHES, "_total", reason=r, **labels) for r in metrics.FLUSH_REASONS
    }
    assert flushes == {"tick": 1, "full": 1, "hold_ended": 1, "hold_alone": 2}
    assert count(metrics.BATCH_HOLD_SECONDS, **labels) == batcher.holds == 4
    # three holds ran their whole 50 ms (loop time); the one cut short by a full batch did not
    assert value(metrics.BATCH_HOLD_SECONDS, "_sum", **labels) == pytest.approx(0.165, abs=0.002)

    shedding = MicroBatcher(
        predict, max_batch_size=64, max_queue=1, metrics=metrics.BatchMetrics(name, "v2", "x")
    )

    async def burst() -> list[Any]:
        return await asyncio.gather(
            *(shedding.submit(rows(i)) for i in range(3)), return_exceptions=True
        )

    answers = asyncio.run(burst())
    assert sum(isinstance(a, Exception) for a in answers) == 2
    assert value(metrics.BATCH_SHED, "_total", model=name, version="v2") == shedding.shed == 2


def test_a_failed_call_is_timed_but_not_counted_as_a_batch() -> None:
    name = tag()
    bm = metrics.BatchMetrics(name, "v1", "inline")

    def broken(x: np.ndarray) -> Result:
        raise RuntimeError("model exploded")

    batcher = MicroBatcher(broken, max_batch_size=64, metrics=bm)

    async def main() -> None:
        results = await asyncio.gather(
            *(batcher.submit(rows(1.0)) for _ in range(3)), return_exceptions=True
        )
        assert all(isinstance(r, RuntimeError) for r in results)

    asyncio.run(main())
    labels = {"model": name, "version": "v1", "placement": "inline"}
    assert count(metrics.MODEL_COMPUTE_SECONDS, **labels) == 1
    assert count(metrics.QUEUE_WAIT_SECONDS, **labels) == 3
    assert count(metrics.BATCH_SIZE, **labels) == 0
    assert value(metrics.IN_FLIGHT, model=name) == 0


def test_gauges_show_requests_in_flight_and_waiting_then_zero() -> None:
    """A remote model call in flight holds 2 requests; 3 more wait behind it (max_in_flight 1)."""
    name = tag()
    bm = metrics.BatchMetrics(name, "v1", "service")
    seen: list[tuple[float, float]] = []

    async def main() -> None:
        gate = asyncio.Event()
        calls = []

        async def remote(x: np.ndarray) -> Result:
            calls.append(len(x))
            await gate.wait()
            return np.zeros(len(x), dtype=np.int64), x

        batcher = MicroBatcher(remote, max_batch_size=64, is_async=True, metrics=bm)
        first = [asyncio.ensure_future(batcher.submit(rows(1.0))) for _ in range(2)]
        for _ in range(100):  # a few loop turns: submit, flush, the model call's task
            if calls:
                break
            await asyncio.sleep(0)
        assert calls == [2]  # the first batch (2 requests) is in the model call
        later = [asyncio.ensure_future(batcher.submit(rows(2.0))) for _ in range(3)]
        # their flush finds the call in flight: they wait; the call is held open 10 ms more, so
        # their queue wait is measurable (the sum asserted below)
        await asyncio.sleep(0.01)
        metrics.sample_gauges()  # what the sampler thread does every GAUGE_INTERVAL_S
        seen.append((value(metrics.IN_FLIGHT, model=name), value(metrics.QUEUE_DEPTH, model=name)))
        gate.set()
        await asyncio.gather(*first, *later)
        assert calls == [2, 3]

    asyncio.run(main())
    assert seen == [(5, 3)]
    metrics.sample_gauges()
    assert value(metrics.IN_FLIGHT, model=name) == 0
    assert value(metrics.QUEUE_DEPTH, model=name) == 0
    labels = {"model": name, "version": "v1", "placement": "service"}
    assert count(metrics.MODEL_COMPUTE_SECONDS, **labels) == 2
    assert count(metrics.QUEUE_WAIT_SECONDS, **labels) == 5
    # the 3 late requests waited for the first call to return (>= the 10 ms sleep)
    assert value(metrics.QUEUE_WAIT_SECONDS, "_sum", **labels) >= 0.02


def test_the_sampler_thread_updates_gauges_and_zeroes_unloaded_versions() -> None:
    name = tag()
    batcher = MicroBatcher(
        RowSums(), max_batch_size=64, metrics=metrics.BatchMetrics(name, "v", "x")
    )
    batcher.queued = 7  # as if 7 requests were unanswered
    eventually(
        lambda: value(metrics.IN_FLIGHT, model=name) == 7, "the sampler thread's next sample"
    )
    del batcher
    gc.collect()
    metrics.sample_gauges()
    assert value(metrics.IN_FLIGHT, model=name) == 0


def test_gauges_write_only_what_changed(monkeypatch: pytest.MonkeyPatch) -> None:
    bm = metrics.BatchMetrics(tag(), "v1", "inline")
    writes: list[tuple[str, float]] = []
    monkeypatch.setattr(bm._in_flight, "set", lambda v: writes.append(("in_flight", v)))
    monkeypatch.setattr(bm._depth, "set", lambda v: writes.append(("depth", v)))
    bm.gauges(0, 0)
    bm.gauges(4, 4)
    bm.gauges(4, 4)
    bm.gauges(6, 4)
    bm.gauges(0, 0)
    assert writes == [
        ("in_flight", 4),
        ("depth", 4),
        ("in_flight", 6),
        ("in_flight", 0),
        ("depth", 0),
    ]


# --- request series -----------------------------------------------------------------------------


def test_answered_counts_status_and_observes_latency() -> None:
    name = tag()
    rm = metrics.RequestMetrics(name, "v1")
    assert value(metrics.REQUESTS, "_total", model=name, status="200") == 0  # exists at 0
    rm.answered(200, 0.002)
    rm.answered(200, 0.004)
    rm.answered(422, 0.0005)
    assert value(metrics.REQUESTS, "_total", model=name, status="200") == 2
    assert value(metrics.REQUESTS, "_total", model=name, status="422") == 1
    assert count(metrics.MODEL_REQUEST_SECONDS, model=name, version="v1") == 3
    assert value(metrics.MODEL_REQUEST_SECONDS, "_sum", model=name) == pytest.approx(0.0065)


def test_unknown_requests_create_their_series_only_when_used() -> None:
    before = count(metrics.MODEL_REQUEST_SECONDS, model=metrics.UNKNOWN_MODEL, version="")
    metrics.UNKNOWN_REQUESTS.answered(404, 0.0001)
    after = count(metrics.MODEL_REQUEST_SECONDS, model=metrics.UNKNOWN_MODEL, version="")
    assert after == before + 1
    assert value(metrics.REQUESTS, "_total", model=metrics.UNKNOWN_MODEL, status="200") == 0


# --- handlers, registry and readiness (in-process, a real iris model) --------------------------


@pytest.fixture(scope="module")
def iris_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    home = tmp_path_factory.mktemp("metrics-store") / "bentoml"
    with bentoml_store(home):
        save_iris()
        yield home


def build(tmp_path: Path, config: str, remote: dict | None = None):
    from models.config import Settings
    from services.runtime.loader import Loader

    models_file = tmp_path / "models.yaml"
    models_file.write_text(config)
    loader = Loader(Settings(), remote or {}, models_file=models_file)
    return loader.initial()


def request(body: bytes, app: Any) -> Any:
    from starlette.requests import Request

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/predict",
        "query_string": b"",
        "headers": [(b"content-type", b"application/json")],
        "app": app,
    }
    return Request(scope, receive)


def test_predict_handler_counts_and_times_per_version(iris_store: Path, tmp_path: Path) -> None:
    from services.gateway import router
    from services.protocols import native

    with bentoml_store(iris_store):
        registry = build(tmp_path, "models:\n  - name: iris\n")
    version = registry.get("iris").info.version
    router.app.state.registry = registry
    ok = {"model": "iris", "version": version}
    before = count(metrics.MODEL_REQUEST_SECONDS, **ok), count(metrics.QUEUE_WAIT_SECONDS, **ok)
    unknown = count(metrics.MODEL_REQUEST_SECONDS, model=metrics.UNKNOWN_MODEL)
    body = json.dumps({"model": "iris", "inputs": [[5.1, 3.5, 1.4, 0.2]]}).encode()
    bad = json.dumps({"model": "iris", "inputs": [[1.0]]}).encode()

    async def main() -> list[int]:
        calls = [native.predict(request(body, router.app)) for _ in range(4)]
        calls.append(native.predict(request(bad, router.app)))
        calls.append(native.predict(request(b'{"model": "nope", "inputs": [[1]]}', router.app)))
        return [r.status_code for r in await asyncio.gather(*calls)]

    try:
        assert asyncio.run(main()) == [200, 200, 200, 200, 422, 404]
    finally:
        router.app.state.registry = None
    assert count(metrics.MODEL_REQUEST_SECONDS, **ok) == before[0] + 5  # 4 answered, 1 invalid
    assert count(metrics.QUEUE_WAIT_SECONDS, **ok) == before[1] + 4  # the invalid one never queued
    assert count(metrics.MODEL_REQUEST_SECONDS, model=metrics.UNKNOWN_MODEL) == unknown + 1
    assert value(metrics.REQUESTS, "_total", status="422", **ok) >= 1
    assert value(metrics.IN_FLIGHT, **ok) == 0
    assert value(metrics.MODEL_READY, model="iris") == 1


def test_unknown_model_names_create_no_new_series(iris_store: Path, tmp_path: Path) -> None:
    from services.gateway import router
    from services.protocols import native

    with bentoml_store(iris_store):
        router.app.state.registry = build(tmp_path, "models:\n  - name: iris\n")

    async def send(name: str, version: str | None) -> int:
        body = {"model": name, "inputs": [[5.1, 3.5, 1.4, 0.2]]}
        if version is not None:
            body["version"] = version
        return (await native.predict(request(json.dumps(body).encode(), router.app))).status_code

    try:
        assert asyncio.run(send(tag(), None)) == 404  # the _unknown series exist from here on
        assert asyncio.run(send("iris", tag())) == 404
        known = series()
        for _ in range(50):
            assert asyncio.run(send(tag(), None)) == 404
            assert asyncio.run(send("iris", tag())) == 404
    finally:
        router.app.state.registry = None
    assert series() == known


def test_model_ready_follows_the_registry_and_the_service(iris_store: Path, tmp_path: Path) -> None:
    """Service placement: 0 until the service first answers, 0 once a model call finds it
    unreachable, 1 again when a call succeeds; 0 when nothing is loaded; NaN once the name leaves
    the config. The remote call reports to the worker's ServiceHealth as the router's does."""
    from models.config import Framework
    from services.ops.health import ServiceHealth

    reachable = [True]
    health = ServiceHealth({})

    async def remote(name: str, version: str, x: np.ndarray) -> Result:
        if not reachable[0]:
            health.mark_down("sklearn", "a call failed: ConnectError")
            raise ModelNotReady(f"model '{name}' is not reachable")
        health.mark_up("sklearn")
        return np.zeros(len(x), dtype=np.int64), np.ones((len(x), 3))

    name = "iris_" + tag()
    config = f"models:\n  - name: {name}\n    tag: iris\n    placement: service\n"
    with bentoml_store(iris_store):
        registry = build(tmp_path, config, {Framework.SKLEARN: remote})
    registry.health = health
    assert value(metrics.MODEL_READY, model=name) == 0  # the service has not answered yet
    served = registry.get(name)

    async def call() -> None:
        await served.batcher.submit(np.ones((1, 4)))

    asyncio.run(call())
    assert value(metrics.MODEL_READY, model=name) == 1
    reachable[0] = False
    with pytest.raises(ModelNotReady):
        asyncio.run(call())
    assert value(metrics.MODEL_READY, model=name) == 0
    reachable[0] = True
    asyncio.run(call())
    assert value(metrics.MODEL_READY, model=name) == 1
    registry._swap({}, {name: "default version did not load"})
    assert value(metrics.MODEL_READY, model=name) == 0
    registry._swap({}, {})
    assert math.isnan(value(metrics.MODEL_READY, model=name))
