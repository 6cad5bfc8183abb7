"""Open Inference Protocol V2 over REST, with the real ``tritonclient.http`` client and raw httpx.

Runs against the session ``server`` (every demo model inline and as ``<name>-svc``); answers are
compared with in-process predictions of the same models.
"""

from __future__ import annotations

import asyncio
import json
import re

import aiohttp
import httpx
import numpy as np
import pytest
import tritonclient.http as triton_http
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException, triton_to_np_dtype

from tests.integration.conftest import PLACEMENTS, dataset

IRIS_ROW = [5.1, 3.5, 1.4, 0.2]
SHAPES = {"iris": (4, 3), "breast_cancer": (30, 2), "digits": (64, 10)}  # features, classes
OUTPUT_SETS = {
    "default": None,
    "proba": ["predict_proba"],
    "label": ["predict"],
    "both": ["predict", "predict_proba"],
}


@pytest.fixture(scope="module")
def client(server):
    c = triton_http.InferenceServerClient(url=server.url.removeprefix("http://"), concurrency=8)
    yield c
    c.close()


@pytest.fixture(scope="module")
def metadata(server) -> dict[str, dict]:
    """OIP model metadata of every served model, by name."""
    return {n: httpx.get(f"{server.url}/v2/models/{n}").json() for n in PLACEMENTS}


def make_input(
    rows: np.ndarray, datatype: str = "FP64", binary: bool = True, name: str = "input-0"
) -> triton_http.InferInput:
    x = triton_http.InferInput(name, list(rows.shape), datatype)
    x.set_data_from_numpy(rows.astype(triton_to_np_dtype(datatype)), binary_data=binary)
    return x


def raw_infer(
    server, body: dict | bytes, model: str = "iris", headers: dict | None = None
) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(
        f"{server.url}/v2/models/{model}/infer", content=content, headers=headers, timeout=30
    )


def json_body(data: list, shape: list[int], datatype: str = "FP64", **extra) -> dict:
    tensor = {"name": "input-0", "shape": shape, "datatype": datatype, "data": data}
    return {"inputs": [tensor], **extra}


def assert_oip_error(resp: httpx.Response, status: int, *words: str) -> str:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"} and isinstance(body["error"], str), body
    for w in words:
        assert w in body["error"], body
    return body["error"]


def test_server_health_and_metadata(client) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta["name"] == "servery" and meta["version"]
    assert "binary_tensor_data" in meta["extensions"]


@pytest.mark.parametrize("name", list(PLACEMENTS))
def test_model_ready_and_metadata(server, client, name: str) -> None:
    version = httpx.get(f"{server.url}/models/{name}").json()["version"]
    assert client.is_model_ready(name)
    assert client.is_model_ready(name, version)
    meta = client.get_model_metadata(name)
    assert client.get_model_metadata(name, version) == meta
    n_features, n_classes = SHAPES[PLACEMENTS[name]]
    dtype = meta["inputs"][0]["datatype"]
    assert dtype in ("FP32", "FP64")
    assert meta["name"] == name and meta["versions"] == [version]
    assert meta["inputs"] == [{"name": "input-0", "datatype": dtype, "shape": [-1, n_features]}]
    assert meta["outputs"] == [
        {"name": "predict", "datatype": "INT64", "shape": [-1]},
        {"name": "predict_proba", "datatype": dtype, "shape": [-1, n_classes]},
    ]


def test_unknown_model_or_version_is_not_ready(server, client) -> None:
    assert not client.is_model_ready("nope")
    assert not client.is_model_ready("iris", "0000000000000000")
    with pytest.raises(InferenceServerException) as e:
        client.get_model_metadata("nope")
    assert e.value.status() == "404" and "nope" in e.value.message()
    with pytest.raises(InferenceServerException) as e:
        # not "y": a random version id starting with "y" would resolve it as a unique prefix
        client.get_model_metadata("iris", "no-such-version")
    assert e.value.status() == "404"
    assert_oip_error(httpx.get(f"{server.url}/v2/models/x/versions/y/ready"), 404, "'x'")
    assert_oip_error(httpx.get(f"{server.url}/v2/models/iris/versions/y/ready"), 404, "'y'")


@pytest.mark.parametrize("outputs", list(OUTPUT_SETS))
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("name", list(PLACEMENTS))
def test_infer_matches_in_process(
    client, metadata, local_predict, name: str, binary: bool, outputs: str
) -> None:
    rows = dataset(PLACEMENTS[name])[::11][:16]
    dtype = metadata[name]["inputs"][0]["datatype"]
    names = OUTPUT_SETS[outputs]
    requested = names and [triton_http.InferRequestedOutput(n, binary_data=binary) for n in names]
    result = client.infer(
        name, [make_input(rows, dtype, binary)], outputs=requested, request_id=f"r-{name}"
    )
    resp = result.get_response()
    assert resp["model_name"] == name and resp["model_version"] == metadata[name]["versions"][0]
    assert resp["id"] == f"r-{name}"
    # Without `outputs` tritonclient asks for every output in binary (binary_data_output).
    assert [o["name"] for o in resp["outputs"]] == (names or ["predict", "predict_proba"])
    for out in resp["outputs"]:
        assert ("data" not in out) == (binary or names is None), out
    labels, proba = local_predict(name, rows)
    if "predict" in [o["name"] for o in resp["outputs"]]:
        got = result.as_numpy("predict")
        assert got.dtype == np.int64
        np.testing.assert_array_equal(got, labels)
    else:
        assert result.get_output("predict") is None
    if "predict_proba" in [o["name"] for o in resp["outputs"]]:
        got = result.as_numpy("predict_proba")
        assert got.shape == proba.shape and got.dtype == triton_to_np_dtype(dtype)
        np.testing.assert_allclose(got, proba, rtol=1e-5, atol=1e-6)
    else:
        assert result.get_output("predict_proba") is None


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_compressed_requests(client, local_predict, algorithm: str, binary: bool) -> None:
    """tritonclient's request compression (gzip or deflate, as Triton accepts) is decoded."""
    rows = dataset("iris")[::7]
    result = client.infer(
        "iris", [make_input(rows, "FP64", binary)], request_compression_algorithm=algorithm
    )
    labels, proba = local_predict("iris", rows)
    np.testing.assert_array_equal(result.as_numpy("predict"), labels)
    np.testing.assert_allclose(result.as_numpy("predict_proba"), proba, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("datatype", ["FP32", "FP64", "INT32", "INT64"])
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_any_numeric_datatype_is_converted(client, local_predict, datatype, binary) -> None:
    rows = dataset("iris")[::13].astype(triton_to_np_dtype(datatype))
    result = client.infer("iris-svc", [make_input(rows, datatype, binary)])
    labels, proba = local_predict("iris-svc", rows)
    np.testing.assert_array_equal(result.as_numpy("predict"), labels)
    np.testing.assert_allclose(result.as_numpy("predict_proba"), proba, rtol=1e-5, atol=1e-6)


def test_infer_exact_version_and_async(client, metadata, local_predict) -> None:
    names = list(PLACEMENTS)
    batches = [dataset(PLACEMENTS[n])[i::17][:5] for i, n in enumerate(names * 4)]
    pending = [
        client.async_infer(
            n,
            [make_input(x, metadata[n]["inputs"][0]["datatype"])],
            model_version=metadata[n]["versions"][0] if i % 2 else "",
            request_id=str(i),
        )
        for i, (n, x) in enumerate(zip(names * 4, batches, strict=True))
    ]
    for i, (req, n, x) in enumerate(zip(pending, names * 4, batches, strict=True)):
        result = req.get_result()
        assert result.get_response()["id"] == str(i)
        labels, proba = local_predict(n, x)
        np.testing.assert_array_equal(result.as_numpy("predict"), labels)
        np.testing.assert_allclose(result.as_numpy("predict_proba"), proba, rtol=1e-5, atol=1e-6)


def _bytes_input(binary: bool) -> list[triton_http.InferInput]:
    x = triton_http.InferInput("input-0", [1, 4], "BYTES")
    x.set_data_from_numpy(np.array([[b"1", b"2", b"3", b"4"]], dtype=np.object_), binary)
    return [x]


def _bool_input(binary: bool) -> list[triton_http.InferInput]:
    x = triton_http.InferInput("input-0", [1, 4], "BOOL")
    x.set_data_from_numpy(np.ones((1, 4), dtype=bool), binary)
    return [x]


ROW = np.array([IRIS_ROW])
CLIENT_MISTAKES = [
    # (id, model, version, inputs, outputs, status, words in message)
    ("shape", "iris", "", lambda b: [make_input(np.zeros((2, 3)), binary=b)], None, 400, "shape"),
    ("shape-1d", "iris", "", lambda b: [make_input(np.zeros(4), binary=b)], None, 400, "[n, 4]"),
    ("bytes", "iris", "", _bytes_input, None, 400, "datatype 'BYTES'"),
    ("bool", "iris-svc", "", _bool_input, None, 400, "datatype 'BOOL'"),
    ("model", "nope", "", lambda b: [make_input(ROW, binary=b)], None, 404, "'nope'"),
    ("version", "iris", "0" * 16, lambda b: [make_input(ROW, binary=b)], None, 404, "0" * 16),
    ("no-inputs", "iris", "", lambda b: [], None, 400, "missing input 'input-0'"),
    ("input-name", "iris", "", lambda b: [make_input(ROW, name="x", binary=b)], None, 400, "'x'"),
    ("output", "iris", "", lambda b: [make_input(ROW, binary=b)], ["nope"], 400, "unknown output"),
    (
        "nan",
        "iris",
        "",
        lambda b: [make_input(np.array([[1, 2, 3, np.nan]]), binary=b)],
        None,
        400,
        "NaN",
    ),
    (
        "rows",
        "digits-svc",
        "",
        lambda b: [make_input(np.zeros((1025, 64)), binary=b)],
        None,
        413,
        "1025",
    ),
]


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize(
    ("model", "version", "inputs", "outputs", "status", "words"),
    [m[1:] for m in CLIENT_MISTAKES],
    ids=[m[0] for m in CLIENT_MISTAKES],
)
def test_client_mistakes_through_tritonclient(
    client, binary, model, version, inputs, outputs, status, words
) -> None:
    requested = outputs and [triton_http.InferRequestedOutput(n) for n in outputs]
    with pytest.raises(InferenceServerException) as e:
        client.infer(model, inputs(binary), model_version=version, outputs=requested)
    assert e.value.status() == str(status), e.value
    assert words in e.value.message(), e.value.message()


HEADER = "Inference-Header-Content-Length"
RAW_MISTAKES = [
    # (id, body, headers, status, words)
    ("not-json", b'{"inputs": [', None, 400, "not valid JSON"),
    ("empty", b"", None, 400, "JSON"),
    ("no-inputs-field", {}, None, 400, "inputs"),
    ("nan", json_body([1, 2, 3, float("nan")], [1, 4]), None, 400, "NaN"),
    (
        "infinity",
        b'{"inputs":[{"name":"input-0","shape":[1,4],"datatype":"FP64","data":[1,2,3,Infinity]}]}',
        None,
        400,
        "NaN/Infinity",
    ),
    ("bool-data", json_body([1, 2, 3, True], [1, 4]), None, 400, "does not match datatype"),
    ("string-data", json_body([1, 2, 3, "4"], [1, 4]), None, 400, "does not match datatype"),
    ("ragged", json_body([[1, 2, 3, 4], [1]], [2, 4]), None, 400, "regular array"),
    ("size", json_body([1, 2, 3, 4], [2, 4]), None, 400, "4 values but shape [2, 4]"),
    (
        "no-data",
        {"inputs": [{"name": "input-0", "shape": [1, 4], "datatype": "FP64"}]},
        None,
        400,
        "neither 'data' nor binary_data_size",
    ),
    ("rows", json_body([IRIS_ROW] * 1025, [1025, 4]), None, 413, "1025 rows"),
    (
        "classification",
        json_body(
            IRIS_ROW, [1, 4], outputs=[{"name": "predict", "parameters": {"classification": 2}}]
        ),
        None,
        400,
        "classification",
    ),
    (
        "binary-flag",
        json_body(IRIS_ROW, [1, 4], parameters={"binary_data_output": "yes"}),
        None,
        400,
        "true or false",
    ),
    ("header-length", json_body(IRIS_ROW, [1, 4]), {HEADER: "abc"}, 400, HEADER),
    ("header-too-long", json_body(IRIS_ROW, [1, 4]), {HEADER: "100000"}, 400, HEADER),
    ("gzip", json_body(IRIS_ROW, [1, 4]), {"content-encoding": "gzip"}, 400, "not valid gzip"),
    ("brotli", json_body(IRIS_ROW, [1, 4]), {"content-encoding": "br"}, 415, "gzip, deflate"),
    ("text-plain", json_body(IRIS_ROW, [1, 4]), {"content-type": "text/plain"}, 415, "json"),
]


@pytest.mark.parametrize(
    ("body", "headers", "status", "words"),
    [m[1:] for m in RAW_MISTAKES],
    ids=[m[0] for m in RAW_MISTAKES],
)
def test_raw_mistakes_get_the_oip_envelope(server, body, headers, status, words) -> None:
    assert_oip_error(raw_infer(server, body, headers=headers), status, words)


def _binary_request(rows: np.ndarray, extra: bytes = b"", size: int | None = None) -> tuple:
    raw = rows.astype("<f8").tobytes()
    params = {"binary_data_size": len(raw) if size is None else size}
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "input-0",
                    "shape": list(rows.shape),
                    "datatype": "FP64",
                    "parameters": params,
                }
            ]
        }
    ).encode()
    return header + raw + extra, {HEADER: str(len(header))}


def test_binary_framing_mistakes(server) -> None:
    rows = np.array([IRIS_ROW])
    body, headers = _binary_request(rows, extra=b"\0" * 8)
    assert_oip_error(raw_infer(server, body, headers=headers), 400, "8 bytes after")
    body, headers = _binary_request(rows, size=64)
    assert_oip_error(raw_infer(server, body, headers=headers), 400, "needs 64 bytes")
    body, headers = _binary_request(rows, size=31)
    assert_oip_error(raw_infer(server, body, headers=headers), 400, "not a multiple of 8")
    body, headers = _binary_request(rows)
    assert raw_infer(server, body, headers=headers).status_code == 200


def test_raw_json_and_binary_outputs(server, local_predict) -> None:
    rows = dataset("breast_cancer")[:3]
    labels, proba = local_predict("breast_cancer", rows)
    nested = raw_infer(server, json_body(rows.tolist(), [3, 30], id="abc"), "breast_cancer")
    assert nested.status_code == 200 and nested.headers["content-type"] == "application/json"
    body = nested.json()
    assert body["id"] == "abc" and body["model_name"] == "breast_cancer"
    out = {o["name"]: o for o in body["outputs"]}
    assert out["predict"] == {
        "name": "predict",
        "datatype": "INT64",
        "shape": [3],
        "data": labels.tolist(),
    }
    assert out["predict_proba"]["shape"] == [3, 2]
    np.testing.assert_allclose(out["predict_proba"]["data"], proba.ravel(), rtol=1e-5, atol=1e-6)
    flat = raw_infer(server, json_body(rows.ravel().tolist(), [3, 30]), "breast_cancer").json()
    assert "id" not in flat and flat["outputs"] == body["outputs"]
    # binary_data_output makes every output binary unless an output says otherwise
    mixed = raw_infer(
        server,
        json_body(
            rows.tolist(),
            [3, 30],
            parameters={"binary_data_output": True},
            outputs=[
                {"name": "predict", "parameters": {"binary_data": False}},
                {"name": "predict_proba"},
            ],
        ),
        "breast_cancer",
    )
    assert mixed.status_code == 200, mixed.text
    assert mixed.headers["content-type"] == "application/octet-stream"
    n = int(mixed.headers[HEADER])
    header = json.loads(mixed.content[:n])
    proba_out = header["outputs"][1]
    assert header["outputs"][0]["data"] == labels.tolist()
    assert "data" not in proba_out and proba_out["parameters"]["binary_data_size"] == len(
        mixed.content[n:]
    )
    dtype = np.dtype(triton_to_np_dtype(proba_out["datatype"])).newbyteorder("<")
    got = np.frombuffer(mixed.content[n:], dtype=dtype).reshape(proba_out["shape"])
    np.testing.assert_allclose(got, proba, rtol=1e-5, atol=1e-6)


def test_routes_methods_openapi_and_metrics(server) -> None:
    assert httpx.get(f"{server.url}/v2/health/live").json() == {"live": True}
    assert httpx.get(f"{server.url}/v2/health/ready").json() == {"ready": True}
    assert httpx.get(f"{server.url}/v2/models/iris/ready").json() == {"name": "iris", "ready": True}
    assert_oip_error(httpx.get(f"{server.url}/v2/models/iris/infer"), 405)
    assert_oip_error(httpx.get(f"{server.url}/v2/repository/index"), 404, "/v2/repository/index")
    spec = httpx.get(f"{server.url}/docs.json").json()
    for path in ("/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}/infer"):
        op = spec["paths"][path]["post"]
        schema = op["requestBody"]["content"]["application/json"]["schema"]
        assert schema["required"] == ["inputs"]
        assert schema["properties"]["inputs"]["items"]["required"] == ["name", "shape", "datatype"]
        assert {"200", "400", "404", "413", "503"} <= set(op["responses"])
        assert "422" not in op["responses"]
    assert {"/v2", "/v2/health/ready", "/v2/models/{name}", "/v2/models/{name}/ready"} <= set(
        spec["paths"]
    )
    raw_infer(server, json_body([[0.0] * 64] * 1025, [1025, 64]), "digits-svc")
    text = httpx.get(f"{server.url}/metrics").text
    assert re.search(r'servery_requests_total\{[^}]*model="digits-svc"[^}]*status="413"', text)


def _multi_request_batches(server) -> float:
    """Batches of inline iris that merged more than one request, over every router worker."""
    text = httpx.get(f"{server.url}/metrics").text
    total = single = 0.0
    for family in text_string_to_metric_families(text):
        if family.name != "servery_batch_requests":
            continue
        for s in family.samples:
            if s.labels.get("model") != "iris":
                continue
            if s.name.endswith("_count"):
                total += s.value
            elif s.name.endswith("_bucket") and s.labels.get("le") == "1.0":
                single += s.value
    return total - single


def test_oip_and_native_requests_share_batchers(server, local_predict) -> None:
    rows = dataset("iris")
    labels, proba = local_predict("iris", rows)
    before = _multi_request_batches(server)

    async def fire() -> list[tuple[str, int, dict]]:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=128)) as session:

            async def one(i: int) -> tuple[str, int, dict]:
                row = rows[i % len(rows)].tolist()
                if i % 2:
                    url, body = f"{server.url}/predict", {"model": "iris", "inputs": [row]}
                else:
                    url, body = f"{server.url}/v2/models/iris/infer", json_body(row, [1, 4])
                async with session.post(url, json=body) as resp:
                    return url, resp.status, await resp.json()

            return await asyncio.gather(*(one(i) for i in range(400)))

    results = asyncio.run(fire())
    for i, (url, status, body) in enumerate(results):
        assert status == 200, body
        j = i % len(rows)
        if url.endswith("/predict"):
            got_label, got_proba = body["predictions"][0], body["probabilities"][0]
        else:
            out = {o["name"]: o["data"] for o in body["outputs"]}
            got_label, got_proba = out["predict"][0], out["predict_proba"]
        assert got_label == labels[j]
        np.testing.assert_allclose(got_proba, proba[j], rtol=1e-5, atol=1e-6)
    assert _multi_request_batches(server) > before
