"""Every endpoint of the router and every client mistake, against a real ``bentoml serve``."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest

from tests.integration.conftest import PLACEMENTS, dataset


def post(server, body, **kw) -> httpx.Response:
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(
        f"{server.url}/predict",
        content=content,
        headers={"content-type": "application/json"},
        timeout=30,
        **kw,
    )


def assert_error(resp: httpx.Response, status: int, type_: str, *words: str) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"}, body
    assert body["error"]["type"] == type_, body
    for w in words:
        assert w in body["error"]["message"], body
    return body


@pytest.mark.parametrize("name", list(PLACEMENTS))
def test_predict_matches_in_process(server, local_predict, name: str) -> None:
    rows = dataset(PLACEMENTS[name])[::7][:20]
    resp = post(server, {"model": name, "inputs": rows.tolist()})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    labels, proba = local_predict(name, rows)
    assert body["model"] == name
    assert body["predictions"] == labels.tolist()
    np.testing.assert_allclose(body["probabilities"], proba, rtol=1e-5, atol=1e-6)
    assert len(body["labels"]) == len(rows)
    models = {m["name"]: m for m in httpx.get(f"{server.url}/models").json()["models"]}
    assert body["version"] == models[name]["version"]
    assert body["labels"] == [models[name]["class_names"][i] for i in body["predictions"]]


def test_predict_with_exact_version(server) -> None:
    model = httpx.get(f"{server.url}/models/iris").json()
    resp = post(
        server, {"model": "iris", "version": model["version"], "inputs": [[5.1, 3.5, 1.4, 0.2]]}
    )
    assert resp.status_code == 200
    assert resp.json()["version"] == model["version"]


def test_models_lists_every_model_with_schema_and_metrics(server) -> None:
    resp = httpx.get(f"{server.url}/models")
    assert resp.status_code == 200
    models = {m["name"]: m for m in resp.json()["models"]}
    assert set(models) == set(PLACEMENTS)
    expected = {
        "iris": ("sklearn", 4, 3),
        "breast_cancer": ("xgboost", 30, 2),
        "digits": ("pytorch", 64, 10),
    }
    for name, m in models.items():
        framework, n_features, n_classes = expected[PLACEMENTS[name]]
        assert m["framework"] == framework
        assert m["placement"] == ("service" if name.endswith("-svc") else "inline")
        assert m["input_schema"]["n_features"] == n_features
        assert len(m["input_schema"]["feature_names"]) == n_features
        assert len(m["class_names"]) == n_classes
        assert m["metrics"]["accuracy"] > 0.8
        assert len(m["version"]) == 16 and m["tag"] == f"{PLACEMENTS[name]}:{m['version']}"
    assert_error(httpx.get(f"{server.url}/models/nope"), 404, "model_not_found", "nope")


def test_health_metrics_and_openapi(server) -> None:
    assert httpx.get(f"{server.url}/livez").status_code == 200
    assert httpx.get(f"{server.url}/readyz").status_code == 200
    post(server, {"model": "iris", "inputs": [[5.1, 3.5, 1.4, 0.2]]})
    metrics = httpx.get(f"{server.url}/metrics").text
    assert "servery_requests_total" in metrics and "servery_batch_size_bucket" in metrics
    spec = httpx.get(f"{server.url}/docs.json").json()
    assert {"/predict", "/models", "/models/{name}"} <= set(spec["paths"])
    body = spec["paths"]["/predict"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body["required"] == ["model", "inputs"]
    assert {"400", "404", "413", "422"} <= set(spec["paths"]["/predict"]["post"]["responses"])


IRIS_ROW = [5.1, 3.5, 1.4, 0.2]

BAD_REQUESTS = [
    # (body, status, type, words in message)
    ({"model": "nope", "inputs": [IRIS_ROW]}, 404, "model_not_found", ["nope"]),
    (
        {"model": "iris", "version": "0000000000000000", "inputs": [IRIS_ROW]},
        404,
        "model_not_found",
        ["0000000000000000"],
    ),
    (
        {"model": "iris", "inputs": [[1.0, 2.0, 3.0]]},
        422,
        "invalid_input",
        ["expects 4 features", "got 3"],
    ),
    ({"model": "iris", "inputs": [[1, 2, 3, "4"]]}, 422, "invalid_input", ["strings"]),
    ({"model": "iris", "inputs": [[1, 2, 3, True]]}, 422, "invalid_input", ["numbers"]),
    ({"model": "iris", "inputs": [[1, 2, 3, None]]}, 422, "invalid_input", ["numbers"]),
    ({"model": "iris", "inputs": [[1, 2, 3, 4], [1, 2]]}, 422, "invalid_input", ["same length"]),
    ({"model": "iris", "inputs": IRIS_ROW}, 422, "invalid_input", ["2-D", "wrap a single row"]),
    ({"model": "iris", "inputs": [[IRIS_ROW]]}, 422, "invalid_input", ["2-D"]),
    ({"model": "iris", "inputs": []}, 422, "invalid_input", ["empty"]),
    ({"model": "iris", "inputs": "5.1,3.5"}, 422, "invalid_input", ["list of rows"]),
    ({"model": "iris", "inputs": [[1, 2, 3, 1e400]]}, 422, "invalid_input", ["finite"]),
    ({"model": "digits", "inputs": [[1e39] * 64]}, 422, "invalid_input", ["float32"]),
    ({"model": "iris", "inputs": [[1, 2, 3, 10**400]]}, 422, "invalid_input", ["numbers"]),
    ({"inputs": [IRIS_ROW]}, 400, "bad_request", ["model"]),
    ({"model": "iris"}, 400, "bad_request", ["inputs"]),
    ({"model": 3, "inputs": [IRIS_ROW]}, 400, "bad_request", ["model"]),
    ({"model": "iris", "input": [IRIS_ROW]}, 400, "bad_request", ["input"]),
    (
        {"model": "iris", "inputs": [IRIS_ROW] * 1025},
        413,
        "payload_too_large",
        ["1025 rows", "1024"],
    ),
]


@pytest.mark.parametrize(("body", "status", "type_", "words"), BAD_REQUESTS)
def test_client_mistakes_get_a_clear_4xx(server, body, status, type_, words) -> None:
    assert_error(post(server, body), status, type_, *words)


@pytest.mark.parametrize(
    ("raw", "status", "type_"),
    [
        (b'{"model": "iris", "inputs": [[1, 2, 3, NaN]]}', 422, "invalid_input"),
        (b'{"model": "iris", "inputs": [[1, 2, 3, Infinity]]}', 422, "invalid_input"),
        (b'{"model": "iris", ', 400, "bad_request"),
        (b"", 400, "bad_request"),
        (b"[1, 2]", 400, "bad_request"),
        ("\udcff".encode("utf-8", "surrogatepass"), 400, "bad_request"),
    ],
)
def test_malformed_bodies(server, raw: bytes, status: int, type_: str) -> None:
    assert_error(post(server, raw), status, type_)


def test_wrong_method_and_unknown_route(server) -> None:
    assert_error(httpx.get(f"{server.url}/predict"), 405, "method_not_allowed")
    assert httpx.post(f"{server.url}/nope", json={}).status_code == 404


def test_service_placement_rejects_bad_rows_before_the_service(server) -> None:
    assert_error(
        post(server, {"model": "digits-svc", "inputs": [[0.0] * 63]}), 422, "invalid_input", "64"
    )
    assert_error(
        post(server, {"model": "iris-svc", "inputs": [[1, 2, 3, None]]}), 422, "invalid_input"
    )


def test_prediction_routes_take_the_fast_path(server) -> None:
    """/predict and /v2 infer skip BentoML's middleware and record servery's own metrics."""
    row = [5.1, 3.5, 1.4, 0.2]
    assert post(server, {"model": "iris", "inputs": [row]}).status_code == 200
    infer = {"inputs": [{"name": "input-0", "shape": [1, 4], "datatype": "FP64", "data": row}]}
    assert httpx.post(f"{server.url}/v2/models/iris/infer", json=infer).status_code == 200
    assert httpx.get(f"{server.url}/models").status_code == 200
    text = httpx.get(f"{server.url}/metrics").text
    for route in ("/predict", "/v2/models/infer"):
        assert f'servery_request_duration_seconds_count{{route="{route}"}}' in text
    # BentoML's traffic middleware still counts the other routes, but never the fast ones.
    bentoml_lines = [
        ln
        for ln in text.splitlines()
        if ln.startswith("bentoml_service_request_total") and 'runner_name="router"' in ln
    ]
    assert any('endpoint="/models"' in ln for ln in bentoml_lines)
    # (other tests send GET /predict and GET .../infer, which BentoML answers 405 and counts)
    # (BentoML declares a zero series for each of the Router's BentoML APIs, predict included:
    # only a count above zero means BentoML answered one)
    answered = [
        ln
        for ln in bentoml_lines
        if 'http_response_code="200"' in ln and float(ln.rsplit(" ", 1)[1]) > 0
    ]
    assert not any('endpoint="/predict"' in ln or "/infer" in ln for ln in answered)
    log = server.log.read_text()
    assert "(scheme=http,method=POST,path=/predict) (status=200" in log


@pytest.mark.parametrize("path", ["/predict", "/v2/models/iris/infer", "/models"])
def test_body_over_the_size_limit_is_413(server, path: str) -> None:
    """A 20 MB body (over SERVERY_MAX_BODY_BYTES, 16 MiB) is refused from its Content-Length,
    on fast-path and BentoML routes alike, and the server keeps answering."""
    body = b"[" + b"1," * (10 * 2**20) + b"1]"
    r = httpx.post(
        f"{server.url}{path}",
        content=body,
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert r.status_code == 413, r.text
    assert "SERVERY_MAX_BODY_BYTES" in r.text
    ok = httpx.post(
        f"{server.url}/predict", json={"model": "iris", "inputs": [[5.1, 3.5, 1.4, 0.2]]}
    )
    assert ok.status_code == 200
