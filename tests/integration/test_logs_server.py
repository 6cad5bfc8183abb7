"""JSON logs and request ids on a real ``bentoml serve`` (issue 8: structured logs).

With ``SERVERY_LOG_FORMAT=json`` every line the server writes is one JSON object; a prediction's
access line carries the request id (the client's ``X-Request-ID`` or one the router made, and
returned in the response either way), the model and exact version that answered, the status and
the latency.
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


@pytest.fixture(scope="module")
def json_server(demo_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    config = "models:\n  - name: iris\n  - name: digits\n    placement: service\n"
    srv = start_server(
        demo_store,
        config,
        tmp_path_factory.mktemp("json-logs"),
        env={"SERVERY_LOG_FORMAT": "json"},
    )
    try:
        yield srv
    finally:
        srv.stop()


def log_lines(srv: Server) -> list[dict[str, Any]]:
    lines = [ln for ln in srv.log.read_text(errors="replace").splitlines() if ln.strip()]
    bad = [ln for ln in lines if not ln.startswith("{")]
    assert not bad, f"{len(bad)} non-JSON log lines, e.g. {bad[:3]}"
    return [json.loads(ln) for ln in lines]


def access_line(srv: Server, rid: str) -> dict[str, Any]:
    """The one access log line of request ``rid`` (a worker writes it just after the answer)."""

    def found() -> list[dict[str, Any]]:
        return [
            d
            for d in log_lines(srv)
            if d.get("request_id") == rid and d["logger"] == "bentoml.access"
        ]

    lines = eventually(found, f"the access line of {rid}", every=0.2)
    assert len(lines) == 1, (rid, lines)
    return lines[0]


@pytest.mark.parametrize("model", ["iris", "digits"])
def test_prediction_lines_name_request_model_version_status_latency(
    json_server: Server, model: str
) -> None:
    width = {"iris": 4, "digits": 64}[model]
    rid = f"client-{model}-1"
    r = httpx.post(
        f"{json_server.url}/predict",
        json={"model": model, "inputs": [[1.0] * width]},
        headers={"X-Request-ID": rid},
        timeout=30,
    )
    assert r.status_code == 200 and r.headers["x-request-id"] == rid
    line = access_line(json_server, rid)
    assert line["model"] == model and line["version"] == r.json()["version"]
    assert line["status"] == 200 and line["method"] == "POST" and line["path"] == "/predict"
    assert 0 < line["latency_ms"] < 30_000
    assert line["level"] == "INFO" and line["component"].startswith("entry_service:")


def test_oip_and_errors_are_logged_with_ids_the_router_made(json_server: Server) -> None:
    r = httpx.post(
        f"{json_server.url}/v2/models/iris/infer",
        json={
            "inputs": [
                {"name": "input-0", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}
            ]
        },
        timeout=30,
    )
    assert r.status_code == 200
    rid = r.headers["x-request-id"]  # made by the router: none was sent
    line = access_line(json_server, rid)
    assert line["path"] == "/v2/models/iris/infer" and line["model"] == "iris"
    assert line["version"] == r.json()["model_version"]
    bad = httpx.post(
        f"{json_server.url}/predict", json={"model": "nope", "inputs": [[1]]}, timeout=30
    )
    assert bad.status_code == 404
    line = access_line(json_server, bad.headers["x-request-id"])
    assert line["status"] == 404 and "model" not in line


def test_a_hostile_request_id_is_replaced_not_echoed(json_server: Server) -> None:
    r = httpx.get(f"{json_server.url}/models", headers={"X-Request-ID": "x" * 200}, timeout=30)
    assert r.status_code == 200
    rid = r.headers["x-request-id"]
    assert rid != "x" * 200 and len(rid) < 64
    assert access_line(json_server, rid)["logger"] == "bentoml.access"
