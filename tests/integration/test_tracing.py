"""OpenTelemetry tracing through BentoML's own tracing settings (issue 8), as docs/configuration.md
documents it: a ``services.<name>.tracing`` block in a BentoML configuration file
(``BENTOML_CONFIG``) and ``SERVERY_TRACE_PREDICTIONS=true``. A real OTLP/HTTP receiver (a small
Starlette app decoding OpenTelemetry's own protobuf messages) collects what the server exports.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from bench.harness.server import Server, start_server
from tests.conftest import eventually
from tests.integration.conftest import OtlpCollector as Collector

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
TRACEPARENT = f"00-{TRACE_ID}-b7ad6b7169203331-01"


@pytest.fixture(scope="module")
def traced(
    demo_store: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Server, Collector]]:
    collector = Collector()
    tmp = tmp_path_factory.mktemp("tracing")
    tracing = (
        "    tracing:\n      exporter_type: otlp\n      sample_rate: 1.0\n      otlp:\n"
        f"        protocol: http\n        endpoint: http://127.0.0.1:{collector.port}/v1/traces\n"
    )
    config = tmp / "bentoml_configuration.yaml"
    config.write_text(f"services:\n  router:\n{tracing}  sklearn:\n{tracing}")
    models = "models:\n  - name: iris\n  - name: iris-svc\n    tag: iris\n    placement: service\n"
    env = {
        "BENTOML_CONFIG": str(config),
        "SERVERY_TRACE_PREDICTIONS": "true",
        "SERVERY_LOG_FORMAT": "json",
    }
    srv = start_server(demo_store, models, tmp, env=env)
    try:
        yield srv, collector
    finally:
        srv.stop()
        collector.server.stop()


def test_prediction_spans_join_the_callers_trace(traced: tuple[Server, Collector]) -> None:
    srv, collector = traced
    for model in ("iris", "iris-svc"):
        r = httpx.post(
            f"{srv.url}/predict",
            json={"model": model, "inputs": [[5.1, 3.5, 1.4, 0.2]]},
            headers={"traceparent": TRACEPARENT},
            timeout=30,
        )
        assert r.status_code == 200, r.text

    def joined(spans: list) -> list:
        return [s for s in spans if s[2] == TRACE_ID]

    def both_services() -> list:
        mine = joined(collector.spans())
        return mine if {x[0] for x in mine} >= {"router", "sklearn"} else []

    # spans are exported in batches, every few seconds
    mine = eventually(both_services, "the router's and the sklearn service's spans", every=0.5)
    assert ("router", "POST /predict") in {(svc, name) for svc, name, _ in mine}, mine[:20]
    # the service-placed model's call to the sklearn service is a child in the same trace
    assert any(svc == "sklearn" for svc, _, _ in mine), mine


def test_json_log_lines_name_the_trace(traced: tuple[Server, Collector]) -> None:
    srv, _ = traced
    r = httpx.post(
        f"{srv.url}/predict",
        json={"model": "iris", "inputs": [[5.1, 3.5, 1.4, 0.2]]},
        headers={"traceparent": TRACEPARENT, "x-request-id": "traced-1"},
        timeout=30,
    )
    assert r.status_code == 200 and r.headers["x-request-id"] == "traced-1"

    def access_lines() -> list[dict[str, Any]]:
        lines = [
            json.loads(ln)
            for ln in srv.log.read_text().splitlines()
            if ln.startswith("{") and '"traced-1"' in ln
        ]
        return [d for d in lines if d["logger"] == "bentoml.access"]

    access = eventually(access_lines, "the access line of request traced-1", every=0.2)
    assert access[0]["trace_id"] == TRACE_ID, access
