"""What the studies send: a stored model loaded in this process, its rows, and request bodies.

A :class:`Subject` is one stored model with rows from the dataset it was trained on and the labels
it predicts for them in this process, so a study can check a server's answer before it loads it.
The bodies here are single-row: native ``/predict``, OIP V2 REST JSON and OIP V2 gRPC messages.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from bench.harness.server import Server

N_BODIES = 64
"""Distinct rows each load run sends round-robin."""
OIP_DATATYPES = {"float32": "FP32", "float64": "FP64"}
"""OIP V2 datatype of a row's numpy dtype."""
JSON = {"content-type": "application/json"}


@dataclass
class Subject:
    """One benchmarked model: its runtime (for in-process runs and expected answers) and rows."""

    name: str
    framework: str
    runtime: Any
    rows: np.ndarray
    expected: list[int]


def dataset_rows(name: str, n_features: int, seed: int = 0) -> np.ndarray:
    """Feature rows of the dataset ``name`` was trained on; random rows if it is not a demo."""
    from sklearn import datasets

    loaders = {"iris": datasets.load_iris, "digits": datasets.load_digits}
    loaders["breast_cancer"] = datasets.load_breast_cancer
    x: np.ndarray | None = None
    if name == "breast_cancer_large":  # synthetic: training.breast_cancer.LARGE_DATA
        from training.breast_cancer import LARGE_DATA

        x = datasets.make_classification(**LARGE_DATA, random_state=seed)[0]
    elif name.removesuffix("_large") in loaders:
        x = loaders[name.removesuffix("_large")]().data
    rng = np.random.default_rng(seed)
    if x is None or x.shape[1] != n_features:
        return rng.normal(size=(1024, n_features))
    return x[rng.permutation(len(x))]


def load_subject(name: str) -> Subject:
    """Load ``name``'s runtime from the store, as a server process would (one thread)."""
    from models.config import ModelEntry
    from services.runtime.predictors import load_runtime

    runtime = load_runtime(ModelEntry(name=name), threads=1)
    info = runtime.info
    seed = int(info.metadata.get("params", {}).get("seed", 0))
    rows = dataset_rows(info.store_name, info.n_features, seed).astype(info.dtype)
    labels = runtime.predict(rows[:N_BODIES])["predict"]
    return Subject(name, str(info.framework), runtime, rows, labels.tolist())


def predict_bodies(subject: Subject, model: str | None = None) -> list[str]:
    """Native ``POST /predict`` bodies, one row each, for ``model`` (default: the subject)."""
    served = subject.name if model is None else model
    return [json.dumps({"model": served, "inputs": [r]}) for r in subject.rows[:N_BODIES].tolist()]


def oip_body(row: np.ndarray, outputs: Sequence[str] = ()) -> dict[str, Any]:
    """One-row OIP V2 JSON infer body (``input-0``, the row's own FP32/FP64 datatype)."""
    body: dict[str, Any] = {
        "inputs": [
            {
                "name": "input-0",
                "shape": [1, len(row)],
                "datatype": OIP_DATATYPES[row.dtype.name],
                "data": row.tolist(),
            }
        ]
    }
    if outputs:
        body["outputs"] = [{"name": o} for o in outputs]
    return body


def oip_bodies(subject: Subject) -> list[str]:
    """OIP V2 REST bodies, one row each, default outputs."""
    return [json.dumps(oip_body(row)) for row in subject.rows[:N_BODIES]]


def grpc_messages(name: str, rows: np.ndarray) -> list[Any]:
    """One OIP V2 gRPC ``ModelInferRequest`` per row of ``rows``, asking for ``predict`` only."""
    from bench.grpc_load import infer_request

    datatype = OIP_DATATYPES[rows.dtype.name]
    messages = []
    for i in range(len(rows)):
        message = infer_request(name, rows[i : i + 1], datatype)
        message.outputs.add(name="predict")
        messages.append(message)
    return messages


def verify_predict(
    server: Server, body: str, subject: Subject, what: str, *, service: bool = False
) -> None:
    """One ``POST /predict`` must answer 200 with the in-process prediction, or the run is void.

    ``service``: the server is a framework service called directly (its own answer format).
    ``what`` names the configuration in the error.
    """
    import httpx

    resp = httpx.post(f"{server.url}/predict", content=body, headers=JSON)
    for _ in range(30):  # a dependency still loading answers 503 "not ready"
        if resp.status_code != 503:
            break
        time.sleep(0.5)
        resp = httpx.post(f"{server.url}/predict", content=body, headers=JSON)
    want = subject.expected[0]
    try:
        data = resp.json()
        if service:
            ok = data[0]["prediction"] == want and data[0]["model"] == f"{subject.name}-svc"
        else:
            ok = data["predictions"] == [want] and len(data["probabilities"]) == 1
    except (ValueError, KeyError, IndexError, TypeError):
        ok = False
    if resp.status_code != 200 or not ok:
        raise RuntimeError(
            f"{what} for {subject.name}: expected 200 with prediction {want}, got "
            f"{resp.status_code}: {resp.text[:500]}\nserver log:\n{server.log_tail()}"
        )
