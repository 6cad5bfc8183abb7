"""Clients users already have, against the session's real ``bentoml serve``: BentoML's own HTTP
clients, gRPC health (what Kubernetes' ``grpc:`` probe and ``grpc_health_probe`` call) and server
reflection (what ``grpcurl`` lists); and the batcher's decision counters on ``/metrics``."""

from __future__ import annotations

import asyncio

import bentoml
import grpc
import numpy as np
import pytest
from bentoml.exceptions import BentoMLException
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from bench.harness.server import Server, metric_samples
from tests.integration.conftest import PLACEMENTS, dataset

SERVING = health_pb2.HealthCheckResponse.SERVING


# --- BentoML's clients ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(server: Server) -> bentoml.SyncHTTPClient:
    with bentoml.SyncHTTPClient(server.url) as c:
        yield c


def test_bentoml_client_finds_the_platform_apis(client: bentoml.SyncHTTPClient) -> None:
    assert {"predict", "models"} <= set(client.endpoints)
    names = {m["name"] for m in client.models()["models"]}
    assert set(PLACEMENTS) <= names


@pytest.mark.parametrize("name", list(PLACEMENTS))
def test_bentoml_client_predicts_with_every_demo_model(
    client: bentoml.SyncHTTPClient, local_predict, name: str
) -> None:
    rows = dataset(PLACEMENTS[name])[:3]
    answer = client.predict(model=name, inputs=rows.tolist())
    want_labels, want_proba = local_predict(name, rows)
    assert answer["model"] == name
    assert answer["predictions"] == want_labels.tolist()
    np.testing.assert_allclose(answer["probabilities"], want_proba, rtol=1e-5, atol=1e-6)
    pinned = client.predict(model=name, inputs=rows[:1].tolist(), version=answer["version"])
    assert (pinned["version"], pinned["routed_by"]) == (answer["version"], "version")


def test_bentoml_client_errors_say_what_was_wrong(client: bentoml.SyncHTTPClient) -> None:
    with pytest.raises(BentoMLException) as e:
        client.predict(model="no-such-model", inputs=[[1.0]])
    assert e.value.error_code == 404 and "no-such-model" in str(e.value)
    with pytest.raises(BentoMLException) as e:
        client.predict(model="iris", inputs=[[1.0, 2.0]])  # iris takes 4 features
    assert e.value.error_code == 422


def test_bentoml_async_client(server: Server) -> None:
    rows = dataset("iris")[:2].tolist()

    async def main() -> list[dict]:
        async with bentoml.AsyncHTTPClient(server.url) as c:
            return await asyncio.gather(*(c.predict(model="iris", inputs=rows) for _ in range(8)))

    answers = asyncio.run(main())
    assert all(a["predictions"] == answers[0]["predictions"] for a in answers)


# --- gRPC health and reflection ---------------------------------------------------------------


@pytest.fixture(scope="module")
def channel(server: Server) -> grpc.Channel:
    with grpc.insecure_channel(server.grpc_url) as ch:
        yield ch


def test_grpc_health_overall_and_per_model(channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    check = health_pb2.HealthCheckRequest
    # "" is what Kubernetes' grpc probe and grpc_health_probe ask by default
    assert health.Check(check(service="")).status == SERVING
    assert health.Check(check(service="inference.GRPCInferenceService")).status == SERVING
    for name in PLACEMENTS:
        assert health.Check(check(service=name)).status == SERVING
    with pytest.raises(grpc.RpcError) as e:
        health.Check(check(service="no-such-model"))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    first = next(health.Watch(check(service="iris"), timeout=10))
    assert first.status == SERVING


def test_grpc_reflection_lists_the_services(channel: grpc.Channel) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    (answer,) = stub.ServerReflectionInfo(iter([request]), timeout=10)
    services = {s.name for s in answer.list_services_response.service}
    assert {
        "inference.GRPCInferenceService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= services
    # the inference service's descriptors come back too (what grpcurl describes)
    request = reflection_pb2.ServerReflectionRequest(
        file_containing_symbol="inference.GRPCInferenceService"
    )
    (answer,) = stub.ServerReflectionInfo(iter([request]), timeout=10)
    assert answer.file_descriptor_response.file_descriptor_proto


# --- the batcher's decisions on /metrics ------------------------------------------------------


def flushes(server: Server, model: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, labels, v in metric_samples(f"{server.url}/metrics"):
        if name == "servery_batch_flushes_total" and labels.get("model") == model:
            out[labels["reason"]] = out.get(labels["reason"], 0.0) + v
    return out


def test_batcher_flushes_are_counted_on_metrics(server: Server, client) -> None:
    """Sequential requests: every answer took one flush; each is counted by its reason (the
    totals over workers and reasons grow by exactly the requests sent)."""
    before = flushes(server, "breast_cancer")
    assert set(before) == {"tick", "full", "hold_ended", "hold_alone"}  # from the load on
    rows = dataset("breast_cancer")[:1].tolist()
    for _ in range(10):
        client.predict(model="breast_cancer", inputs=rows)
    after = flushes(server, "breast_cancer")
    assert sum(after.values()) - sum(before.values()) == 10
    assert after["full"] == before["full"]  # one row at a time never fills a batch
