"""OIP V2 over gRPC against a real ``bentoml serve``, with tritonclient's real gRPC clients."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from pathlib import Path

import grpc
import httpx
import numpy as np
import psutil
import pytest
import tritonclient.grpc as tg
import tritonclient.grpc.aio as tga
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc
from tritonclient.utils import InferenceServerException

from bench.harness.server import free_port, start_server
from tests.conftest import eventually
from tests.integration.conftest import PLACEMENTS, dataset
from tests.integration.test_load import batch_histogram

EXPECTED = {  # store name -> (framework, n_features, n_classes)
    "iris": ("sklearn", 4, 3),
    "breast_cancer": ("xgboost", 30, 2),
    "digits": ("pytorch", 64, 10),
}


@pytest.fixture(scope="module")
def client(server) -> tg.InferenceServerClient:
    return tg.InferenceServerClient(server.grpc_url)


@pytest.fixture(scope="module")
def meta(client) -> dict[str, dict]:
    """Model metadata per served name, as the server reports it."""
    return {n: client.get_model_metadata(n, as_json=True) for n in PLACEMENTS}


def infer_input(rows: np.ndarray, datatype: str, name: str = "input-0") -> tg.InferInput:
    inp = tg.InferInput(name, list(rows.shape), datatype)
    inp.set_data_from_numpy(rows)
    return inp


def np_dtype(datatype: str) -> type:
    return {"FP32": np.float32, "FP64": np.float64}[datatype]


def assert_matches(local_predict, name: str, rows: np.ndarray, labels, proba) -> None:
    want_labels, want_proba = local_predict(name, rows)
    assert np.asarray(labels).tolist() == want_labels.tolist()
    np.testing.assert_allclose(proba, want_proba, rtol=1e-5, atol=1e-6)


# --- health and metadata ------------------------------------------------------------------------


def test_health(client, meta) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    for name in PLACEMENTS:
        assert client.is_model_ready(name)
        assert client.is_model_ready(name, meta[name]["versions"][0])
    assert not client.is_model_ready("nope")
    assert not client.is_model_ready("iris", "0000000000000000")


def test_server_metadata(client) -> None:
    md = client.get_server_metadata(as_json=True)
    assert md["name"] == "servery"
    assert md["version"]


@pytest.mark.parametrize("name", list(PLACEMENTS))
def test_model_metadata(server, meta, name: str) -> None:
    framework, n_features, n_classes = EXPECTED[PLACEMENTS[name]]
    md = meta[name]
    rest = httpx.get(f"{server.url}/models/{name}").json()
    assert md["name"] == name
    assert md["versions"] == [rest["version"]]
    assert md["platform"] == framework
    dtype = {"float32": "FP32", "float64": "FP64"}[rest["input_schema"]["dtype"]]
    # as_json renders int64 shapes as strings (protobuf's JSON mapping)
    assert [(t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in md["inputs"]] == [
        ("input-0", dtype, [-1, n_features])
    ]
    assert [(t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in md["outputs"]] == [
        ("predict", "INT64", [-1]),
        ("predict_proba", dtype, [-1, n_classes]),
    ]


def test_triton_only_rpcs_are_unimplemented(client) -> None:
    with pytest.raises(InferenceServerException) as e:
        client.get_model_config("iris")
    assert e.value.status() == "StatusCode.UNIMPLEMENTED"


# --- inference ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(PLACEMENTS))
def test_infer_raw_matches_in_process(client, meta, local_predict, name: str) -> None:
    """tritonclient sends raw_input_contents; the reply's raw outputs equal in-process results."""
    datatype = meta[name]["inputs"][0]["datatype"]
    rows = dataset(PLACEMENTS[name])[::7][:20].astype(np_dtype(datatype))
    outputs = [tg.InferRequestedOutput("predict"), tg.InferRequestedOutput("predict_proba")]
    result = client.infer(name, [infer_input(rows, datatype)], outputs=outputs, request_id="r-1")
    response = result.get_response()
    assert response.id == "r-1"
    assert response.model_name == name
    assert response.model_version == meta[name]["versions"][0]
    labels, proba = result.as_numpy("predict"), result.as_numpy("predict_proba")
    assert labels.dtype == np.int64 and labels.shape == (20,)
    assert proba.dtype == np_dtype(datatype) and proba.shape[0] == 20
    assert_matches(local_predict, name, rows, labels, proba)


@pytest.mark.parametrize("name", list(PLACEMENTS))
def test_infer_typed_contents(server, meta, local_predict, name: str) -> None:
    """A hand-built ModelInferRequest with typed fp32/fp64 contents, sent through the raw stub."""
    datatype = meta[name]["inputs"][0]["datatype"]
    rows = dataset(PLACEMENTS[name])[3:8].astype(np_dtype(datatype))
    field = {"FP32": "fp32_contents", "FP64": "fp64_contents"}[datatype]
    tensor = pb.ModelInferRequest.InferInputTensor(
        name="input-0", datatype=datatype, shape=list(rows.shape)
    )
    getattr(tensor.contents, field).extend(rows.ravel().tolist())
    request = pb.ModelInferRequest(model_name=name, id="typed", inputs=[tensor])
    with grpc.insecure_channel(server.grpc_url) as channel:
        response = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
    assert response.id == "typed"
    assert [o.name for o in response.outputs] == ["predict", "predict_proba"]
    assert len(response.raw_output_contents) == 2
    labels = np.frombuffer(response.raw_output_contents[0], dtype="<i8")
    proba = np.frombuffer(response.raw_output_contents[1], dtype=np_dtype(datatype))
    proba = proba.reshape(list(response.outputs[1].shape))
    assert_matches(local_predict, name, rows, labels, proba)


def test_infer_converts_other_numeric_datatypes(server, client, local_predict) -> None:
    """The digits pixels are small integers: INT64 (raw) and INT32 (typed) give exact answers."""
    rows = dataset("digits")[:10].astype(np.int64)
    result = client.infer("digits", [infer_input(rows, "INT64")])
    assert_matches(
        local_predict, "digits", rows, result.as_numpy("predict"), result.as_numpy("predict_proba")
    )
    tensor = pb.ModelInferRequest.InferInputTensor(
        name="input-0", datatype="INT32", shape=list(rows.shape)
    )
    tensor.contents.int_contents.extend(rows.ravel().tolist())
    request = pb.ModelInferRequest(
        model_name="digits-svc",
        inputs=[tensor],
        outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name="predict")],
    )
    with grpc.insecure_channel(server.grpc_url) as channel:
        response = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
    assert [o.name for o in response.outputs] == ["predict"]
    labels = np.frombuffer(response.raw_output_contents[0], dtype="<i8")
    assert labels.tolist() == local_predict("digits-svc", rows)[0].tolist()


def test_output_selection_and_explicit_version(client, meta, local_predict) -> None:
    rows = dataset("iris")[:5]
    version = meta["iris"]["versions"][0]
    result = client.infer(
        "iris",
        [infer_input(rows, "FP64")],
        model_version=version,
        outputs=[tg.InferRequestedOutput("predict_proba")],
    )
    response = result.get_response()
    assert [o.name for o in response.outputs] == ["predict_proba"]
    assert response.model_version == version
    assert result.as_numpy("predict") is None
    np.testing.assert_allclose(
        result.as_numpy("predict_proba"), local_predict("iris", rows)[1], rtol=1e-5, atol=1e-6
    )


def test_async_client_many_concurrent_infers(server, local_predict) -> None:
    """200 concurrent calls from the grpc.aio client: all answered exactly, and batched."""
    rows = dataset("breast_cancer")[:200].astype(np.float32)
    want_labels, want_proba = local_predict("breast_cancer", rows)

    async def run() -> list:
        async with tga.InferenceServerClient(server.grpc_url) as aio_client:

            async def one(i: int):
                inp = tga.InferInput("input-0", [1, rows.shape[1]], "FP32")
                inp.set_data_from_numpy(rows[i : i + 1])
                return await aio_client.infer("breast_cancer", [inp], request_id=str(i))

            return await asyncio.gather(*(one(i) for i in range(len(rows))))

    before = batch_histogram(server, "breast_cancer")
    results = asyncio.run(run())
    after = batch_histogram(server, "breast_cancer")
    for i, result in enumerate(results):
        assert result.get_response().id == str(i)
        assert result.as_numpy("predict").tolist() == [want_labels[i]]
        np.testing.assert_allclose(
            result.as_numpy("predict_proba")[0], want_proba[i], rtol=1e-5, atol=1e-6
        )
    batches, rows_seen, _ = (a - b for a, b in zip(after, before, strict=True))
    assert rows_seen == len(rows)
    assert batches < len(rows), "no two gRPC calls shared a batch"


def grpc_timed_calls(server) -> float:
    """``servery_request_duration_seconds_count{route="grpc:ModelInfer"}`` on /metrics."""
    text = httpx.get(f"{server.url}/metrics").text
    total = 0.0
    for line in text.splitlines():
        if line.startswith("servery_request_duration_seconds_count{") and (
            'route="grpc:ModelInfer"' in line
        ):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_infer_calls_are_timed_and_access_logged(server, client) -> None:
    """Each ModelInfer, answered or refused, lands in the latency histogram and the access log."""
    rows = dataset("iris")[:1]
    marker = f"test-{time.time_ns()}"  # a model name no other test uses
    before_timed = grpc_timed_calls(server)
    before_log = server.log.read_text(errors="replace").count("scheme=grpc,method=ModelInfer")
    for _ in range(5):
        client.infer("iris", [infer_input(rows, "FP64")])
    with pytest.raises(InferenceServerException):
        client.infer(marker, [infer_input(rows, "FP64")])
    assert grpc_timed_calls(server) - before_timed == 6

    def logged() -> list[str]:  # the log file is written by the worker processes
        log = server.log.read_text(errors="replace")
        lines = [x for x in log.splitlines() if "scheme=grpc,method=ModelInfer" in x]
        return lines[before_log:] if len(lines) - before_log >= 6 else []

    new = eventually(logged, "6 gRPC access lines", every=0.2)
    assert sum("model=iris," in x and "(status=200)" in x for x in new) >= 5
    # an unknown model is logged under the bounded placeholder, never the client's string
    assert any("model=_unknown," in x and "(status=404)" in x for x in new)
    assert not any(marker in x for x in new)


def test_grpc_and_rest_requests_share_the_batchers(server, meta, local_predict) -> None:
    """~200 gRPC and ~200 REST /predict requests for one model at once: all exact, batched."""
    name = "iris"
    rows = dataset(name)[:200]
    want_labels, want_proba = local_predict(name, rows)

    async def run() -> tuple[list, list]:
        async with (
            tga.InferenceServerClient(server.grpc_url) as aio_client,
            httpx.AsyncClient(base_url=server.url, timeout=60) as http,
        ):

            async def via_grpc(i: int):
                inp = tga.InferInput("input-0", [1, rows.shape[1]], "FP64")
                inp.set_data_from_numpy(rows[i : i + 1])
                return await aio_client.infer(name, [inp])

            async def via_rest(i: int) -> httpx.Response:
                body = json.dumps({"model": name, "inputs": [rows[i].tolist()]})
                return await http.post(
                    "/predict", content=body, headers={"content-type": "application/json"}
                )

            n = len(rows)
            return await asyncio.gather(
                asyncio.gather(*(via_grpc(i) for i in range(n))),
                asyncio.gather(*(via_rest(i) for i in range(n))),
            )

    before = batch_histogram(server, name)
    grpc_results, rest_results = asyncio.run(run())
    after = batch_histogram(server, name)
    for i, (g, r) in enumerate(zip(grpc_results, rest_results, strict=True)):
        assert g.as_numpy("predict").tolist() == [want_labels[i]]
        np.testing.assert_allclose(
            g.as_numpy("predict_proba")[0], want_proba[i], rtol=1e-5, atol=1e-6
        )
        assert r.status_code == 200, r.text
        assert r.json()["predictions"] == [want_labels[i]]
        np.testing.assert_allclose(
            r.json()["probabilities"][0], want_proba[i], rtol=1e-5, atol=1e-6
        )
    batches, rows_seen, _ = (a - b for a, b in zip(after, before, strict=True))
    assert rows_seen == 2 * len(rows)
    assert batches < 2 * len(rows), "no two requests shared a batch"


# --- client mistakes ----------------------------------------------------------------------------

IRIS = dataset("iris")[:1]  # one real row, FP64
INVALID, NOT_FOUND = "StatusCode.INVALID_ARGUMENT", "StatusCode.NOT_FOUND"


# id -> (model, rows, datatype, options, status, words in the message); options: "name" of the
# input, "shape" to declare instead of the rows' own (the raw buffer keeps the rows' size),
# "outputs" to request, "model_version".
CLIENT_MISTAKES: dict[str, tuple] = {
    "wrong-shape": ("iris", IRIS[:, :3], "FP64", {}, INVALID, "[1, 3]", "[n, 4]"),
    "bytes": ("iris", np.array([[b"1"] * 4], dtype=object), "BYTES", {}, INVALID, "BYTES"),
    "bool": ("iris", np.ones((1, 4), dtype=bool), "BOOL", {}, INVALID, "BOOL", "numeric"),
    "unknown-model": ("nope", IRIS, "FP64", {}, NOT_FOUND, "nope", "iris"),
    "unknown-model-bad-rows": ("nope", IRIS[:, :3], "FP64", {}, NOT_FOUND, "nope"),
    "unknown-version": ("iris", IRIS, "FP64", {"model_version": "0" * 16}, NOT_FOUND, "0" * 16),
    "no-input": ("iris", None, "FP64", {}, INVALID, "missing input", "input-0"),
    "wrong-input-name": ("iris", IRIS, "FP64", {"name": "x"}, INVALID, "unexpected input 'x'"),
    "unknown-output": ("iris", IRIS, "FP64", {"outputs": ["nope"]}, INVALID, "unknown output"),
    "raw-too-small": ("iris", IRIS, "FP64", {"shape": [2, 4]}, INVALID, "4 values", "[2, 4]"),
    "too-many-rows": ("iris", np.tile(IRIS, (1025, 1)), "FP64", {}, INVALID, "1025 rows", "1024"),
    "nan": ("iris", np.full((1, 4), np.nan), "FP64", {}, INVALID, "NaN"),
    "out-of-float32-range": ("digits", np.full((1, 64), 1e39), "FP64", {}, INVALID, "float32"),
}


@pytest.mark.parametrize("case", CLIENT_MISTAKES.values(), ids=CLIENT_MISTAKES.keys())
def test_client_mistakes_get_the_right_status(client, case: tuple) -> None:
    model, rows, datatype, options, status, *words = case
    inputs = []
    if rows is not None:
        inp = infer_input(rows, datatype, options.get("name", "input-0"))
        inputs.append(inp.set_shape(options["shape"]) if "shape" in options else inp)
    outputs = [tg.InferRequestedOutput(n) for n in options.get("outputs", [])] or None
    with pytest.raises(InferenceServerException) as e:
        client.infer(model, inputs, outputs=outputs, model_version=options.get("model_version", ""))
    assert e.value.status() == status, e.value
    for w in words:
        assert w in e.value.message(), e.value.message()


def _tensor(datatype: str = "FP64", **contents: list) -> pb.ModelInferRequest.InferInputTensor:
    tensor = pb.ModelInferRequest.InferInputTensor(name="input-0", datatype=datatype, shape=[1, 4])
    for field, values in contents.items():
        getattr(tensor.contents, field).extend(values)
    return tensor


F64 = [1.0] * 4
# id -> (input tensors, raw_input_contents, words in the message), all for model iris
RAW_MISTAKES: dict[str, tuple] = {
    "raw-not-whole-values": ([_tensor()], [b"\0" * 7], "7 bytes", "FP64"),
    "raw-count": ([_tensor()], [IRIS.tobytes()] * 2, "1 input", "2 raw"),
    "raw-and-typed": ([_tensor(fp64_contents=F64)], [IRIS.tobytes()], "typed contents", "raw"),
    "typed-field-mismatch": ([_tensor(fp32_contents=F64)], [], "fp64_contents, not fp32"),
    "no-data": ([_tensor()], [], "no data"),
    "fp16-typed": ([_tensor("FP16", fp32_contents=F64)], [], "FP16", "raw_input_contents"),
    "int8-overflow": ([_tensor("INT8", int_contents=[1, 2, 3, 300])], [], "INT8 range"),
}


@pytest.mark.parametrize("case", RAW_MISTAKES.values(), ids=RAW_MISTAKES.keys())
def test_malformed_tensors_through_the_stub(server, case: tuple) -> None:
    inputs, raw, *words = case
    request = pb.ModelInferRequest(model_name="iris", inputs=inputs, raw_input_contents=raw)
    with grpc.insecure_channel(server.grpc_url) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as e:
            stub.ModelInfer(request, timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value
    for w in words:
        assert w in e.value.details(), e.value.details()


# --- lifecycle ----------------------------------------------------------------------------------


def grpc_listeners(port: int) -> set[int]:
    """PIDs with a listening TCP socket on ``port``."""
    return {
        c.pid
        for c in psutil.net_connections("tcp")
        if c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN and c.pid
    }


def test_every_router_worker_serves_grpc_and_connections_spread(server) -> None:
    """Both workers bind the port (SO_REUSEPORT) and the kernel spreads new connections."""
    workers = int(server.env.get("SERVERY_ROUTER_WORKERS", "2"))
    if workers < 2:
        pytest.skip("one router worker")

    def listening() -> set[int]:  # /readyz answers once the first worker is up
        pids = grpc_listeners(server.grpc_port)
        return pids if len(pids) >= workers else set()

    pids = eventually(listening, "a gRPC listener in each router worker", every=0.5)
    assert len(pids) == workers
    # One channel is one HTTP/2 connection; a local subchannel pool stops channels sharing one.
    channels = [
        grpc.insecure_channel(server.grpc_url, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(24)
    ]
    try:
        for channel in channels:
            pb_grpc.GRPCInferenceServiceStub(channel).ServerLive(pb.ServerLiveRequest(), timeout=10)
        serving = {
            c.pid
            for c in psutil.net_connections("tcp")
            if c.laddr and c.laddr.port == server.grpc_port and c.status == psutil.CONN_ESTABLISHED
        }
        assert serving & pids == pids, (serving, pids)
    finally:
        for channel in channels:
            channel.close()


def test_grpc_server_stops_with_bentoml_serve(demo_store: Path, tmp_path: Path) -> None:
    port = free_port()
    srv = start_server(
        demo_store, "models:\n  - name: iris\n", tmp_path, env={"SERVERY_GRPC_PORT": str(port)}
    )
    try:
        assert srv.grpc_port == port
        assert tg.InferenceServerClient(srv.grpc_url).is_server_live()
    finally:
        srv.stop()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    with pytest.raises(InferenceServerException) as e:
        tg.InferenceServerClient(srv.grpc_url).is_server_live(client_timeout=5)
    assert e.value.status() == "StatusCode.UNAVAILABLE"
    assert "Completed async cleanup hook: _stop_grpc" in srv.log.read_text()
    assert not grpc_listeners(port)
