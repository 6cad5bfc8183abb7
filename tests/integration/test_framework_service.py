"""A framework service served on its own: BentoML adaptive batching for direct callers."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from bench.harness.server import Server, start_server
from tests.integration.conftest import MIXED_CONFIG, dataset


@pytest.fixture(scope="module")
def xgb_service(demo_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start_server(
        demo_store,
        MIXED_CONFIG,
        tmp_path_factory.mktemp("xgb"),
        target="services:XGBoostService",
        env={"SERVERY_SERVICE_MAX_LATENCY_MS": "1000"},
    )
    try:
        yield srv
    finally:
        srv.stop()


def adaptive_batches(server: Server) -> tuple[float, float]:
    """(batches, requests) seen by BentoML's adaptive batcher on ``predict``."""
    text = httpx.get(f"{server.url}/metrics").text
    found = {}
    for suffix in ("count", "sum"):
        labels = r'{[^}]*method_name="predict"[^}]*}'
        pattern = rf"^bentoml_service_adaptive_batch_size_{suffix}{labels} (\S+)$"
        found[suffix] = sum(float(v) for v in re.findall(pattern, text, re.M))
    return found["count"], found["sum"]


def test_direct_calls_are_batched_and_exact(xgb_service: Server, local_predict) -> None:
    rows = dataset("breast_cancer")[:96]
    labels, proba = local_predict("breast_cancer-svc", rows)
    before = adaptive_batches(xgb_service)

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=xgb_service.url, timeout=30) as client:
            return await asyncio.gather(
                *(
                    client.post(
                        "/predict", json={"rows": [{"model": "breast_cancer-svc", "inputs": r}]}
                    )
                    for r in rows.tolist()
                )
            )

    responses = asyncio.run(burst())
    for i, resp in enumerate(responses):
        assert resp.status_code == 200, resp.text
        (result,) = resp.json()
        assert result["prediction"] == labels[i]
        np.testing.assert_allclose(result["probabilities"], proba[i], rtol=1e-5, atol=1e-6)
        assert result["model"] == "breast_cancer-svc" and len(result["version"]) == 16
    batches, requests = (a - b for a, b in zip(adaptive_batches(xgb_service), before, strict=True))
    assert requests == len(rows)
    assert batches < len(rows), "BentoML adaptive batching never merged two requests"


@pytest.mark.parametrize(
    ("row", "status", "type_"),
    [
        ({"model": "nope", "inputs": [1.0] * 30}, 404, "model_not_found"),
        ({"model": "breast_cancer", "inputs": [1.0] * 30}, 404, "model_not_found"),  # inline-only
        ({"model": "breast_cancer-svc", "inputs": [1.0] * 29}, 400, "bad_request"),
        ({"model": "breast_cancer-svc", "inputs": [1.0] * 29 + ["x"]}, 400, "bad_request"),
        ({"model": "breast_cancer-svc", "inputs": [1.0] * 29 + [True]}, 400, "bad_request"),
        ({"model": "breast_cancer-svc", "inputs": [1.0] * 29 + [1e39]}, 400, "bad_request"),
    ],
)
def test_bad_direct_requests_fail_alone(xgb_service: Server, row, status: int, type_: str) -> None:
    good = {"model": "breast_cancer-svc", "inputs": dataset("breast_cancer")[0].tolist()}

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=xgb_service.url, timeout=30) as client:
            bodies = [{"rows": [good]}] * 8 + [{"rows": [row]}] + [{"rows": [good]}] * 8
            return await asyncio.gather(
                *(client.post("/predict", content=json.dumps(b)) for b in bodies)
            )

    responses = asyncio.run(burst())
    bad = responses.pop(8)
    assert bad.status_code == status, bad.text
    assert bad.json()["error"]["type"] == type_
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
