"""Per-model metrics on the router's /metrics with 2 router workers, on a real ``bentoml serve``.

Each worker writes its own prometheus_client multiprocess files; /metrics must merge them so the
counts equal what was sent, whichever worker answered. Label values never come from unknown model
names or URL paths.
"""

from __future__ import annotations

import json
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as tg
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from bench.harness.server import Server, start_server
from bench.harness.store import bentoml_store, save_iris
from tests.conftest import eventually

INLINE, SERVICE = "iris", "iris-svc"
CONFIG = (
    f"models:\n  - name: {INLINE}\n  - name: {SERVICE}\n    tag: iris\n    placement: service\n"
)
ROW = [5.1, 3.5, 1.4, 0.2]

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    home = tmp_path_factory.mktemp("metrics-store") / "bentoml"
    with bentoml_store(home):
        save_iris()
    srv = start_server(
        home,
        CONFIG,
        tmp_path_factory.mktemp("metrics-serve"),
        env={"SERVERY_ROUTER_WORKERS": "2"},
    )
    try:
        yield srv
    finally:
        srv.stop()


def scrape(server: Server) -> Samples:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def total(samples: Samples, name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def delta(after: Samples, before: Samples, name: str, **labels: str) -> float:
    return total(after, name, **labels) - total(before, name, **labels)


def workers_that_counted(server: Server) -> int:
    """Processes whose own multiprocess file holds servery_requests_total > 0 (router workers)."""
    folder = Path(server.env["BENTOML_HOME"]) / "prometheus_multiproc_dir"
    n = 0
    for db in folder.glob("counter_*.db"):
        metrics = MultiProcessCollector.merge([str(db)], accumulate=False)
        if any(s.value > 0 for m in metrics if m.name == "servery_requests" for s in m.samples):
            n += 1
    return n


def predict(url: str, model: str, inputs: list) -> int:
    # a new connection per request, so both workers get some
    with httpx.Client(timeout=30) as client:
        body = {"model": model, "inputs": inputs}
        return client.post(f"{url}/predict", json=body).status_code


def oip_rest(url: str, model: str) -> int:
    body = {"inputs": [{"name": "input-0", "shape": [1, 4], "datatype": "FP64", "data": ROW}]}
    with httpx.Client(timeout=30) as client:
        return client.post(f"{url}/v2/models/{model}/infer", json=body).status_code


def oip_grpc(address: str, model: str) -> int:
    client = tg.InferenceServerClient(address)  # a channel (connection) of its own
    try:
        x = tg.InferInput("input-0", [1, 4], "FP64")
        x.set_data_from_numpy(np.array([ROW]))
        try:
            client.infer(model, [x])
        except InferenceServerException as e:
            return 404 if "StatusCode.NOT_FOUND" in str(e.status()) else 500
        return 200
    finally:
        client.close()


def one_round(server: Server) -> Counter[tuple[str, str]]:
    """Send a fixed mix concurrently; returns (model, status) -> requests answered that way."""
    calls = []
    for model in (INLINE, SERVICE):
        calls += [(model, predict, (server.url, model, [ROW]))] * 12
        calls += [(model, predict, (server.url, model, [ROW, ROW]))] * 4
        calls += [(model, oip_rest, (server.url, model))] * 8
        calls += [(model, oip_grpc, (server.grpc_url, model))] * 6
    calls += [(INLINE, predict, (server.url, INLINE, [[1.0, 2.0]]))] * 3  # 422: 2 features
    calls += [("_unknown", predict, (server.url, "nope", [ROW]))] * 3
    calls += [("_unknown", oip_rest, (server.url, "nope"))] * 2
    calls += [("_unknown", oip_grpc, (server.grpc_url, "nope"))] * 2
    with ThreadPoolExecutor(16) as pool:
        futures = [(model, pool.submit(fn, *args)) for model, fn, args in calls]
        return Counter((model, str(f.result())) for model, f in futures)


def test_counts_and_histograms_sum_over_both_workers(server: Server) -> None:
    models = {m["name"]: m for m in httpx.get(f"{server.url}/models").json()["models"]}
    version = {name: models[name]["version"] for name in (INLINE, SERVICE)}
    version["_unknown"] = ""
    before = scrape(server)
    sent: Counter[tuple[str, str]] = Counter()
    for _ in range(6):  # until both workers answered some (the kernel picks per connection)
        sent += one_round(server)
        if workers_that_counted(server) >= 2:
            break
    assert workers_that_counted(server) == 2
    assert sent[(INLINE, "422")] > 0 and sent[("_unknown", "404")] > 0
    assert {status for _, status in sent} <= {"200", "404", "422"}, sent
    after = scrape(server)

    for (model, status), n in sent.items():
        labels = {"model": model, "version": version[model], "status": status}
        assert delta(after, before, "servery_requests_total", **labels) == n, (model, status)
    for model in (INLINE, SERVICE, "_unknown"):
        answered = sum(n for (m, _), n in sent.items() if m == model)
        labels = {"model": model, "version": version[model]}
        assert (
            delta(after, before, "servery_model_request_duration_seconds_count", **labels)
            == answered
        ), model
        # the +Inf bucket of a histogram equals its count
        inf = {**labels, "le": "+Inf"}
        assert (
            delta(after, before, "servery_model_request_duration_seconds_bucket", **inf) == answered
        )

    for model, placement in ((INLINE, "inline"), (SERVICE, "service")):
        ok = sent[(model, "200")]
        labels = {"model": model, "version": version[model], "placement": placement}
        # every answered request waited in the batcher once; invalid ones never got there
        assert delta(after, before, "servery_queue_wait_seconds_count", **labels) == ok
        assert delta(after, before, "servery_batch_requests_sum", **labels) == ok
        calls = delta(after, before, "servery_model_compute_seconds_count", **labels)
        assert 1 <= calls <= ok
        assert calls == delta(after, before, "servery_batch_size_count", **labels)
        assert delta(after, before, "servery_model_compute_seconds_sum", **labels) > 0
        assert total(after, "servery_model_ready", model=model) == 1

    # gauges are sampled every 0.5 s per worker; both workers are idle now
    def idle() -> Samples:
        now = scrape(server)
        busy = total(now, "servery_in_flight_requests") + total(now, "servery_queue_depth")
        assert busy == 0, f"{busy} requests in flight or queued"
        return now

    now = eventually(idle, "both workers' gauges back to 0", every=0.2)
    for model in (INLINE, SERVICE):
        gauge = {"model": model, "version": version[model]}
        assert ("servery_in_flight_requests", frozenset(gauge.items())) in now
        assert ("servery_queue_depth", frozenset(gauge.items())) in now


def unknown_requests(server: Server) -> None:
    """One of each kind of request whose model name or path nobody configured."""
    rnd = uuid.uuid4().hex[:12]
    with httpx.Client(timeout=30) as client:
        client.get(f"{server.url}/no/such/path/{rnd}")
        client.post(f"{server.url}/no/such/{rnd}", content=b"{}")
        client.get(f"{server.url}/models/{rnd}")
        client.post(f"{server.url}/predict", json={"model": rnd, "inputs": [ROW]})
        client.post(
            f"{server.url}/predict", json={"model": INLINE, "version": rnd, "inputs": [ROW]}
        )
        client.post(f"{server.url}/v2/models/{rnd}/infer", content=json.dumps({"inputs": []}))
        client.get(f"{server.url}/v2/models/{rnd}/ready")
        client.get(f"{server.url}/v2/{rnd}")
    oip_grpc(server.grpc_url, rnd)


def series(server: Server, prefix: str) -> set[tuple[str, frozenset[tuple[str, str]]]]:
    """Series named ``prefix...``, less per-process ones (a ``pid`` label: one per worker, such as
    bentoml_service_last_request_timestamp_seconds, which appears when a worker first serves)."""
    return {
        key
        for key in scrape(server)
        if key[0].startswith(prefix) and not any(k == "pid" for k, _ in key[1])
    }


def test_unknown_models_and_paths_create_no_servery_series(server: Server) -> None:
    unknown_requests(server)  # the first ones may add an _unknown series (a fixed label value)
    known = series(server, "servery_")
    for _ in range(10):
        unknown_requests(server)
    assert series(server, "servery_") - known == set()


def test_unknown_paths_create_no_bentoml_series(server: Server) -> None:
    """BentoML 1.4.40 labelled its traffic metrics with the raw request path (one series per
    path a client sends); services/compat/traffic_metrics_labels.py labels them by route
    template."""
    unknown_requests(server)
    known = series(server, "bentoml_")
    for _ in range(10):
        unknown_requests(server)
    new = series(server, "bentoml_") - known
    assert new == set(), sorted({dict(labels).get("endpoint", "") for _, labels in new})[:10]
