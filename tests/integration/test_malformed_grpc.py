"""The corpus of malformed requests, OIP gRPC half (``ModelInfer`` and friends), and the check
that the server is still healthy afterwards. See test_malformed.py for the HTTP half and the
conventions (strict-xfail :func:`~tests.integration.test_malformed.bug` marks, limits in force).

Every case must end INVALID_ARGUMENT or NOT_FOUND with a short message, within a client timeout;
messages over grpc's 4 MiB receive limit end RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import math
import struct
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from tests.integration.conftest import PLACEMENTS, dataset
from tests.integration.test_malformed import (
    IRIS,
    IRIS_RAW,
    TEN_MB,
    TIMEOUT_S,
    _t,
    cases,
)

INVALID, NOT_FOUND = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND


@pytest.fixture(scope="module")
def stub(server):
    options = [("grpc.max_send_message_length", 64 * 1024 * 1024)]
    with grpc.insecure_channel(server.grpc_url, options=options) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def _req(
    model: str = "iris",
    *,
    version: str = "",
    name: str = "input-0",
    datatype: str = "FP64",
    shape: tuple[int, ...] = (1, 4),
    contents: dict[str, list[Any]] | None = None,
    raw: list[bytes] | None = None,
    outputs: tuple[str, ...] = (),
    n_inputs: int = 1,
) -> pb.ModelInferRequest:
    """ModelInfer request: typed ``contents`` (default iris's row in fp64) and/or ``raw``."""
    req = pb.ModelInferRequest(model_name=model, model_version=version, id="fuzz")
    if contents is None and raw is None:
        contents = {"fp64_contents": IRIS}
    for _ in range(n_inputs):
        tensor = req.inputs.add(name=name, datatype=datatype, shape=list(shape))
        for key, values in (contents or {}).items():
            getattr(tensor.contents, key).extend(values)
    req.raw_input_contents.extend(raw or [])
    for out in outputs:
        req.outputs.add(name=out)
    return req


GRPC = [
    ("unknown-model", _req("nope"), NOT_FOUND),
    ("traversal-model", _req("../../etc/passwd"), NOT_FOUND),
    ("control-chars-model", _req("\x00\x1b[31m\u202e"), NOT_FOUND),
    ("1k-model-name", _req("n" * 1_000), NOT_FOUND),
    ("20k-model-name", _req("n" * 20_000), NOT_FOUND),
    ("1M-model-name", _req("n" * 1_000_000), NOT_FOUND),
    ("unknown-version", _req(version="../0000"), NOT_FOUND),
    ("empty-request", pb.ModelInferRequest(), NOT_FOUND),
    ("no-inputs", pb.ModelInferRequest(model_name="iris"), INVALID),
    ("two-inputs", _req(n_inputs=2), INVALID),
    ("wrong-input-name", _req(name="x"), INVALID),
    ("unknown-output", _req(outputs=("nope",)), INVALID),
    ("unknown-datatype", _req(datatype="FP128"), INVALID),
    ("bytes-datatype", _req(datatype="BYTES", contents={"bytes_contents": [b"5.1"] * 4}), INVALID),
    ("bool-datatype", _req(datatype="BOOL", contents={"bool_contents": [True] * 4}), INVALID),
    ("wrong-contents-field", _req(contents={"fp32_contents": IRIS}), INVALID),
    ("two-contents-fields", _req(contents={"fp64_contents": IRIS, "int64_contents": [1]}), INVALID),
    ("no-data", _req(contents={}), INVALID),
    (
        "int8-out-of-range",
        _req(datatype="INT8", contents={"int_contents": [1, 2, 3, 999]}),
        INVALID,
    ),
    ("NaN", _req(contents={"fp64_contents": [math.nan, 1, 2, 3]}), INVALID),
    ("Infinity", _req(contents={"fp64_contents": [math.inf, 1, 2, 3]}), INVALID),
    (
        "iris-1e308-scores-overflow",
        _req(contents={"fp64_contents": [1e308] * 4}),
        INVALID,
    ),
    ("shape-more-than-data", _req(shape=(2, 4)), INVALID),
    ("shape-wrong-width", _req(shape=(2, 2)), INVALID),
    ("shape-3-d", _req(shape=(1, 4, 1)), INVALID),
    ("shape-empty", _req(shape=()), INVALID),
    ("shape-negative", _req(shape=(-1, 4)), INVALID),
    ("shape-int64-min", _req(shape=(-(2**63), 4)), INVALID),
    ("shape-1e9-rows", _req(shape=(10**9, 4)), INVALID),
    ("shape-int64-max-rows", _req(shape=(2**63 - 1, 4)), INVALID),
    ("shape-1025-rows", _req(shape=(1025, 4), contents={"fp64_contents": IRIS * 1025}), INVALID),
    ("raw-short", _req(raw=[IRIS_RAW[:-3]]), INVALID),
    ("raw-short-a-value", _req(raw=[IRIS_RAW[:-8]]), INVALID),
    ("raw-extra-value", _req(raw=[IRIS_RAW + IRIS_RAW[:8]]), INVALID),
    ("raw-two-buffers-one-input", _req(raw=[IRIS_RAW, IRIS_RAW]), INVALID),
    ("raw-and-contents", _req(contents={"fp64_contents": IRIS}, raw=[IRIS_RAW]), INVALID),
    ("raw-huge-shape", _req(shape=(10**9, 4), raw=[IRIS_RAW]), INVALID),
    ("raw-bytes-datatype", _req(datatype="BYTES", raw=[b"\x03\x00\x00\x005.1" * 4]), INVALID),
    ("raw-nan", _req(raw=[struct.pack("<4d", math.nan, 1, 2, 3)]), INVALID),
]


@pytest.mark.parametrize(("request_", "code"), cases(GRPC))
def test_grpc_infer(stub, request_: pb.ModelInferRequest, code: grpc.StatusCode) -> None:
    try:
        reply = stub.ModelInfer(request_, timeout=TIMEOUT_S)
    except grpc.RpcError as e:
        assert e.code() == code, (e.code(), e.details())
        details = e.details() or ""
        assert details.strip() and "internal" not in details.lower(), details
        assert len(details) < 16 * 1024, len(details)
    else:
        outputs = [np.frombuffer(b, dtype="<f8") for b in reply.raw_output_contents[1:]]
        raise AssertionError(f"answered OK instead of {code.name}: {outputs}")


@pytest.mark.parametrize(
    "raw",
    cases(
        [
            ("garbage", b"\xff\xfe\x00garbage"),
            ("truncated", _req().SerializeToString()[:-3]),
        ]
    ),
)
def test_grpc_undecodable_message(server, raw: bytes) -> None:
    with grpc.insecure_channel(server.grpc_url) as channel:
        call = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        with pytest.raises(grpc.RpcError) as info:
            call(raw, timeout=TIMEOUT_S)
    assert info.value.code() == INVALID, (info.value.code(), info.value.details())
    assert "not a valid ModelInferRequest message" in info.value.details()


def test_grpc_message_over_4_mib(stub) -> None:
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(_req(shape=(TEN_MB // 32, 4), raw=[bytes(TEN_MB)]), timeout=TIMEOUT_S)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, info.value.details()


@pytest.mark.parametrize(
    "name",
    cases(
        [
            ("traversal", "../../etc/passwd"),
            ("control-chars", "\x00\x1b\u202e"),
            ("1k", "n" * 1_000),
            ("20k", "n" * 20_000),
        ]
    ),
)
def test_grpc_metadata_and_ready_with_hostile_names(stub, name: str) -> None:
    assert stub.ModelReady(pb.ModelReadyRequest(name=name), timeout=TIMEOUT_S).ready is False
    version = pb.ModelReadyRequest(name="iris", version=name)
    assert stub.ModelReady(version, timeout=TIMEOUT_S).ready is False
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelMetadata(pb.ModelMetadataRequest(name=name), timeout=TIMEOUT_S)
    assert info.value.code() == NOT_FOUND, info.value.details()


@pytest.mark.parametrize("name", sorted(PLACEMENTS))
def test_still_ready_and_exact_afterwards(server, stub, local_predict, name: str) -> None:
    """After everything above (and test_fuzz.py when run with it): ready, and every model still
    gives its in-process answers over /predict, OIP REST and OIP gRPC."""
    assert httpx.get(f"{server.url}/readyz", timeout=TIMEOUT_S).status_code == 200
    rows = dataset(PLACEMENTS[name])[:5]
    want_labels, want_proba = local_predict(name, rows)
    answer = httpx.post(
        f"{server.url}/predict", json={"model": name, "inputs": rows.tolist()}, timeout=TIMEOUT_S
    ).json()
    assert answer["predictions"] == want_labels.tolist(), answer
    np.testing.assert_allclose(answer["probabilities"], want_proba, rtol=1e-5, atol=1e-6)
    flat = rows.ravel().tolist()
    tensor = _t(shape=list(rows.shape), data=flat)
    answer = httpx.post(
        f"{server.url}/v2/models/{name}/infer", json={"inputs": [tensor]}, timeout=TIMEOUT_S
    ).json()
    assert answer["outputs"][0]["data"] == want_labels.tolist(), answer
    np.testing.assert_allclose(
        answer["outputs"][1]["data"], want_proba.ravel(), rtol=1e-5, atol=1e-6
    )
    reply = stub.ModelInfer(
        _req(name, shape=rows.shape, contents={"fp64_contents": flat}), timeout=TIMEOUT_S
    )
    assert np.frombuffer(reply.raw_output_contents[0], dtype="<i8").tolist() == want_labels.tolist()
