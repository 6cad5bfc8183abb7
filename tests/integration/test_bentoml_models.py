"""Models saved with BentoML's own framework APIs, served by one real ``bentoml serve``.

Every kind servery serves is saved for real into one temporary store (``bentoml.sklearn``,
``bentoml.xgboost``, ``bentoml.torchscript``, ``bentoml.onnx``): an iris pipeline with
probabilities, regressors with one and two targets, a classifier without probabilities and with
string classes, an XGBoost classifier, a TorchScript CNN served as a classifier (``postprocess:
softmax``) and raw (``output-0``), pipelines fitted on a pandas DataFrame (a number and a string
column) and an ONNX graph with two named inputs. Their answers over ``/predict``, OIP REST (raw
JSON and ``tritonclient.http``) and OIP gRPC (``tritonclient.grpc``) are compared with the same
object's prediction in this process; bad input of each kind is a 4xx (gRPC INVALID_ARGUMENT)
whose message names the problem; ``GET /models``, the OIP metadata and ``models.check`` say what
the signatures say.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.grpc as tg
import tritonclient.http as th
from tritonclient.utils import InferenceServerException

from bench.harness.server import ROOT, Server, start_server
from bench.harness.store import bentoml_store

CNN_CLASSES = ["cat", "dog", "bird"]
SVC_CLASSES = np.array(["c", "a", "b"])
"""String classes for iris 0, 1, 2: sorted (``classes_``, the served order) they are a, b, c."""
CNN_INPUT = "    inputs: [{datatype: FP32, shape: [1, 8, 8]}]\n"
MODELS_YAML = f"""\
models:
  - name: iris-pipe
  - name: gbr
  - name: multi-reg
  - name: svc
  - name: xgb
  - name: cnn
{CNN_INPUT}    postprocess: softmax
    class_names: {CNN_CLASSES}
  - name: cnn-raw
    tag: cnn
{CNN_INPUT}  - name: people
  - name: people-imputed
  - name: adder
"""
SERVED = ("iris-pipe", "gbr", "multi-reg", "svc", "xgb", "cnn", "cnn-raw", "people", "adder")
"""Models whose answers are compared over the three protocols."""
IMPUTED = "people-imputed"
"""The DataFrame model again, its string column imputed before it is one-hot encoded."""
BAD_CNN_YAML = "models:\n  - name: cnn\n    inputs: [{datatype: FP32, shape: [1, 7, 7]}]\n"

KIND = {  # served name -> (task, format) in GET /models
    "iris-pipe": ("classification", "bentoml.sklearn"),
    "gbr": ("regression", "bentoml.sklearn"),
    "multi-reg": ("regression", "bentoml.sklearn"),
    "svc": ("classification", "bentoml.sklearn"),
    "xgb": ("classification", "bentoml.xgboost"),
    "cnn": ("classification", "bentoml.torchscript"),
    "cnn-raw": ("tensor", "bentoml.torchscript"),
    "people": ("classification", "bentoml.sklearn"),
    IMPUTED: ("classification", "bentoml.sklearn"),
    "adder": ("tensor", "bentoml.onnx"),
}


@dataclass
class Case:
    """One model's request rows and the answer the same object gives in this process."""

    native: Any
    """``inputs`` of ``/predict``."""
    tensors: list[tuple[str, np.ndarray, str]]
    """OIP inputs: (name, array, datatype)."""
    task: str
    outputs: dict[str, np.ndarray]
    """Expected OIP outputs by name (``predict``, ``predict_proba`` or the model's own)."""
    labels: list[str] | None = None
    """Classification: the class name per row."""
    parameters: dict[str, Any] = field(default_factory=dict)
    """OIP request parameters (``content_type: pd`` for a DataFrame model)."""


# --- the store, the server, the in-process answers -------------------------------------------


def _classifier(est: Any, x: Any, native: Any, tensors: list, **kw: Any) -> Case:
    """A scikit-learn/XGBoost classifier's case: ``predict`` is the index of the predicted
    class in ``classes_``, the label its name, ``predict_proba`` where the model has it."""
    predicted = np.asarray(est.predict(x))
    outputs = {"predict": np.array([list(est.classes_).index(p) for p in predicted])}
    if hasattr(est, "predict_proba"):
        outputs["predict_proba"] = est.predict_proba(x)
    return Case(native, tensors, "classification", outputs, [str(p) for p in predicted], **kw)


def _save_sklearn_and_xgboost(rng: np.random.Generator, cases: dict[str, Case]) -> None:
    import bentoml
    import xgboost as xgb
    from sklearn.datasets import load_iris
    from sklearn.ensemble import GradientBoostingRegressor
    from sklearn.linear_model import LinearRegression, LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC

    from models import xgboost_dist

    xgboost_dist.install()  # bentoml.xgboost records xgboost's version; servery ships xgboost-cpu
    X, y = load_iris(return_X_y=True)
    rows = X[::13][:12]  # all three classes
    one = [("input-0", rows, "FP64")]

    pipe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500)).fit(X, y)
    bentoml.sklearn.save_model("iris-pipe", pipe)
    cases["iris-pipe"] = _classifier(pipe, rows, rows.tolist(), one)

    # no predict_proba; string classes whose sorted order is not iris's
    svc = make_pipeline(StandardScaler(), LinearSVC()).fit(X, SVC_CLASSES[y])
    assert not hasattr(svc, "predict_proba")
    bentoml.sklearn.save_model("svc", svc)
    cases["svc"] = _classifier(svc, rows, rows.tolist(), one)

    booster = xgb.XGBClassifier(n_estimators=8, max_depth=2, n_jobs=1).fit(X, y)
    bentoml.xgboost.save_model("xgb", booster)
    x32 = rows.astype(np.float32)  # XGBoost takes float32
    cases["xgb"] = _classifier(booster, x32, rows.tolist(), [("input-0", x32, "FP32")])

    Xr = rng.normal(size=(200, 5))
    yr = Xr @ np.array([1.0, -2.0, 0.5, 0.0, 3.0]) + rng.normal(scale=0.1, size=200)
    gbr = GradientBoostingRegressor(n_estimators=20, max_depth=2, random_state=0).fit(Xr, yr)
    multi = LinearRegression().fit(Xr, np.stack([yr, Xr[:, 0] - yr], axis=1))
    for name, est in (("gbr", gbr), ("multi-reg", multi)):
        bentoml.sklearn.save_model(name, est)
        reg = Xr[:7]
        cases[name] = Case(
            reg.tolist(), [("input-0", reg, "FP64")], "regression", {"predict": est.predict(reg)}
        )


def _save_dataframe_models(rng: np.random.Generator, cases: dict[str, Case]) -> None:
    import bentoml
    import pandas as pd
    from sklearn.compose import make_column_transformer
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    cities = np.array(["Oslo", "Lima", "Pune", "Kyiv"])
    people = pd.DataFrame(
        {"age": rng.integers(18, 80, 120).astype(float), "city": cities[rng.integers(0, 4, 120)]}
    )
    bought = np.where((people["age"] > 45) ^ (people["city"] == "Lima"), "yes", "no")
    frame = pd.DataFrame(
        {"age": [41.0, 63.0, 19.0, 50.0], "city": ["Oslo", "Lima", "Pune", "Rome"]}
    )
    tensors = [  # MLServer's pandas codec: one [N, 1] tensor per column, strings as BYTES
        ("age", frame["age"].to_numpy().reshape(-1, 1), "FP64"),
        ("city", frame["city"].to_numpy(dtype=object).reshape(-1, 1), "BYTES"),
    ]
    encoders = {
        "people": OneHotEncoder(handle_unknown="ignore"),
        # the usual preprocessing of a string column: impute, then encode
        IMPUTED: make_pipeline(
            SimpleImputer(strategy="most_frequent"), OneHotEncoder(handle_unknown="ignore")
        ),
    }
    for name, encoder in encoders.items():
        columns = make_column_transformer((StandardScaler(), ["age"]), (encoder, ["city"]))
        model = make_pipeline(columns, LogisticRegression(max_iter=500)).fit(people, bought)
        bentoml.sklearn.save_model(name, model)
        records = frame.to_dict(orient="records")
        cases[name] = _classifier(model, frame, records, tensors, parameters={"content_type": "pd"})


def _save_torchscript(rng: np.random.Generator, cases: dict[str, Case]) -> None:
    import bentoml
    import torch

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(144, 3)
    ).eval()
    traced = torch.jit.trace(net, torch.zeros(2, 1, 8, 8))
    bentoml.torchscript.save_model("cnn", traced)
    images = rng.normal(size=(5, 1, 8, 8)).astype(np.float32)
    with torch.inference_mode():
        logits = traced(torch.from_numpy(images))
    proba = torch.softmax(logits, dim=1).numpy()
    idx = proba.argmax(axis=1)
    one = [("input-0", images, "FP32")]
    outputs = {"predict": idx, "predict_proba": proba}
    labels = [CNN_CLASSES[i] for i in idx]
    cases["cnn"] = Case(images.tolist(), one, "classification", outputs, labels)
    cases["cnn-raw"] = Case(images.tolist(), one, "tensor", {"output-0": logits.numpy()})


def _save_onnx(rng: np.random.Generator, cases: dict[str, Case]) -> None:
    import bentoml
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    def spec(name: str) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, [None, 3])

    nodes = [helper.make_node("Add", ["a", "b"], ["sum"])]
    graph = helper.make_graph(nodes, "adder", [spec("a"), spec("b")], [spec("sum")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(proto)
    bentoml.onnx.save_model("adder", proto)
    a, b = (rng.normal(size=(4, 3)).astype(np.float32) for _ in "ab")
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    cases["adder"] = Case(
        {"a": a.tolist(), "b": b.tolist()},
        [("a", a, "FP32"), ("b", b, "FP32")],
        "tensor",
        {"sum": session.run(["sum"], {"a": a, "b": b})[0]},
    )


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Case]]:
    """``(BENTOML_HOME, case per served name)``: every model saved once into a temporary store."""
    home = tmp_path_factory.mktemp("bentoml-models") / "bentoml"
    rng = np.random.default_rng(0)
    cases: dict[str, Case] = {}
    # bentoml.torchscript / bentoml.onnx and torch.jit are deprecated upstream, and still what
    # users' stores hold: saving with them is the point
    with bentoml_store(home), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        for save in (
            _save_sklearn_and_xgboost,
            _save_dataframe_models,
            _save_torchscript,
            _save_onnx,
        ):
            save(rng, cases)
    return home, cases


@pytest.fixture(scope="module")
def cases(store) -> dict[str, Case]:
    return store[1]


@pytest.fixture(scope="module")
def server(store, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start_server(
        store[0],
        MODELS_YAML,
        tmp_path_factory.mktemp("bentoml-models-serve"),
        env={"SERVERY_LLM_ENABLED": "false", "SERVERY_ROUTER_WORKERS": "1"},
    )
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def http_client(server) -> Iterator[th.InferenceServerClient]:
    c = th.InferenceServerClient(url=server.url.removeprefix("http://"))
    yield c
    c.close()


@pytest.fixture(scope="module")
def grpc_client(server) -> Iterator[tg.InferenceServerClient]:
    c = tg.InferenceServerClient(server.grpc_url)
    yield c
    c.close()


# --- answers --------------------------------------------------------------------------------


def _assert_same(name: str, got: Any, want: np.ndarray) -> None:
    got = np.asarray(got)
    assert got.shape == want.shape, (name, got.shape, want.shape)
    if want.dtype.kind in "iu":
        assert got.tolist() == want.tolist(), name
    else:
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=name)


def _predict(server: Server, model: str, inputs: Any) -> httpx.Response:
    return httpx.post(f"{server.url}/predict", json={"model": model, "inputs": inputs}, timeout=30)


def _assert_native(body: dict, case: Case) -> None:
    """A ``/predict`` answer is the in-process one."""
    assert body["task"] == case.task
    if case.task == "tensor":
        assert set(body["outputs"]) == set(case.outputs)
        for out, want in case.outputs.items():
            _assert_same(out, body["outputs"][out], want)
        _assert_same("predictions", body["predictions"], next(iter(case.outputs.values())))
        return
    _assert_same("predictions", body["predictions"], case.outputs["predict"])
    assert body.get("labels") == case.labels
    if "predict_proba" in case.outputs:
        _assert_same("probabilities", body["probabilities"], case.outputs["predict_proba"])
    else:
        assert body.get("probabilities") is None


@pytest.mark.parametrize("name", SERVED)
def test_predict_matches_in_process(server, cases, name: str) -> None:
    resp = _predict(server, name, cases[name].native)
    assert resp.status_code == 200, resp.text
    assert resp.json()["model"] == name
    _assert_native(resp.json(), cases[name])


@pytest.mark.parametrize("name", SERVED)
def test_oip_rest_matches_in_process(http_client, cases, name: str) -> None:
    case = cases[name]
    inputs = []
    for tensor, arr, datatype in case.tensors:
        inputs.append(th.InferInput(tensor, list(arr.shape), datatype))
        inputs[-1].set_data_from_numpy(arr, binary_data=True)
    result = http_client.infer(name, inputs, parameters=case.parameters or None)
    assert {o["name"] for o in result.get_response()["outputs"]} == set(case.outputs)
    for out, want in case.outputs.items():
        _assert_same(out, result.as_numpy(out), want)
    if case.task == "classification":
        assert result.as_numpy("predict").dtype == np.int64


@pytest.mark.parametrize("name", SERVED)
def test_oip_grpc_matches_in_process(grpc_client, cases, name: str) -> None:
    case = cases[name]
    inputs = [_grpc_input(tensor, arr, datatype) for tensor, arr, datatype in case.tensors]
    result = grpc_client.infer(name, inputs, parameters=case.parameters or None)
    assert {o.name for o in result.get_response().outputs} == set(case.outputs)
    for out, want in case.outputs.items():
        _assert_same(out, result.as_numpy(out), want)


def test_dataframe_model_over_oip_json(server, cases) -> None:
    """MLServer's pandas codec in a raw JSON body: one tensor per column, strings as BYTES."""
    case = cases["people"]
    cities = case.tensors[1][1].reshape(-1).tolist()
    body = {
        "parameters": {"content_type": "pd"},
        "inputs": [  # JSON integers for the float column, shape [N] beside [N, 1]
            {"name": "age", "shape": [4], "datatype": "INT64", "data": [41, 63, 19, 50]},
            {"name": "city", "shape": [4, 1], "datatype": "BYTES", "data": cities},
        ],
    }
    resp = httpx.post(f"{server.url}/v2/models/people/infer", json=body, timeout=30)
    assert resp.status_code == 200, resp.text
    got = {o["name"]: o for o in resp.json()["outputs"]}
    assert (got["predict"]["datatype"], got["predict"]["shape"]) == ("INT64", [4])
    assert got["predict"]["data"] == case.outputs["predict"].tolist()
    assert got["predict_proba"]["shape"] == [4, 2]
    proba = np.reshape(got["predict_proba"]["data"], (4, 2))
    _assert_same("predict_proba", proba, case.outputs["predict_proba"])


# --- metadata -------------------------------------------------------------------------------


def test_models_lists_each_with_task_and_format(server) -> None:
    listed = {m["name"]: m for m in httpx.get(f"{server.url}/models", timeout=10).json()["models"]}
    assert {name: (listed[name]["task"], listed[name]["format"]) for name in KIND} == KIND
    assert all(listed[name]["ready"] for name in KIND)
    assert listed["cnn"]["class_names"] == CNN_CLASSES
    assert listed["svc"]["class_names"] == ["a", "b", "c"]
    assert listed["people"]["input_schema"]["columns"] == ["age", "city"]


def _shapes(tensors: list[dict]) -> list[tuple]:
    # gRPC's as_json renders int64 shapes as strings (protobuf's JSON mapping)
    return [(t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in tensors]


IMAGE = [("input-0", "FP32", [-1, 1, 8, 8])]


@pytest.mark.parametrize(
    ("name", "inputs", "outputs"),
    [
        ("gbr", [("input-0", "FP64", [-1, 5])], [("predict", "FP64", [-1])]),
        ("multi-reg", [("input-0", "FP64", [-1, 5])], [("predict", "FP64", [-1, 2])]),
        ("svc", [("input-0", "FP64", [-1, 4])], [("predict", "INT64", [-1])]),
        ("cnn", IMAGE, [("predict", "INT64", [-1]), ("predict_proba", "FP32", [-1, 3])]),
        ("cnn-raw", IMAGE, [("output-0", "FP32", [-1, 3])]),
        ("adder", [("a", "FP32", [-1, 3]), ("b", "FP32", [-1, 3])], [("sum", "FP32", [-1, 3])]),
    ],
)
def test_oip_metadata(server, grpc_client, name: str, inputs: list, outputs: list) -> None:
    """REST and gRPC metadata say what the signature says (a regressor: FP64 ``predict``)."""
    rest = httpx.get(f"{server.url}/v2/models/{name}", timeout=10).json()
    grpc = grpc_client.get_model_metadata(name, as_json=True)
    for md in (rest, grpc):
        assert md["name"] == name
        assert (_shapes(md["inputs"]), _shapes(md["outputs"])) == (inputs, outputs)


def test_oip_metadata_of_dataframe_model(server, grpc_client) -> None:
    md = httpx.get(f"{server.url}/v2/models/people", timeout=10).json()
    assert md["parameters"] == {"content_type": "pd"}
    assert md["inputs"] == [
        {"name": "age", "datatype": "FP64", "shape": [-1], "parameters": {"content_type": "np"}},
        {"name": "city", "datatype": "BYTES", "shape": [-1], "parameters": {"content_type": "str"}},
    ]
    grpc = grpc_client.get_model_metadata("people", as_json=True)
    assert _shapes(grpc["inputs"]) == [("age", "FP64", [-1]), ("city", "BYTES", [-1])]


# --- bad input ------------------------------------------------------------------------------

ROW = [5.1, 3.5, 1.4, 0.2]


@pytest.mark.parametrize(
    ("model", "inputs", "words"),
    [
        ("cnn", np.zeros((2, 1, 7, 8)).tolist(), ["[2, 1, 7, 8]", "[1, 8, 8]"]),
        ("iris-pipe", [ROW[:3]], ["expects 4 features", "got 3"]),
        ("iris-pipe", [["x", *ROW[1:]]], ["only numbers", "strings"]),
        ("people", [{"age": "forty", "city": "Oslo"}], ["column 'age'", "numbers", "'forty'"]),
        ("people", [{"age": 41, "city": 7}], ["column 'city'", "strings", "int 7"]),
        ("people", [{"age": 41}], ["missing", "['city']"]),
        ("people", [{"age": 41, "city": "Oslo", "country": "NO"}], ["unknown", "['country']"]),
        ("adder", {"a": [[1.0, 2.0, 3.0]]}, ["missing", "['b']"]),
    ],
    ids=[
        "cnn-shape",
        "iris-3-features",
        "string-for-number",
        "string-in-number-column",
        "number-in-string-column",
        "missing-column",
        "extra-column",
        "missing-input",
    ],
)
def test_predict_bad_input(server, model: str, inputs: Any, words: list[str]) -> None:
    resp = _predict(server, model, inputs)
    assert resp.status_code == 422, resp.text
    error = resp.json()["error"]
    assert error["type"] == "invalid_input", error
    for w in words:
        assert w in error["message"], error


def _grpc_input(name: str, arr: np.ndarray, datatype: str) -> tg.InferInput:
    t = tg.InferInput(name, list(arr.shape), datatype)
    t.set_data_from_numpy(arr)
    return t


def _col(name: str, value: Any, datatype: str) -> tuple[str, np.ndarray, str]:
    return name, np.array([value], dtype=object if datatype == "BYTES" else None), datatype


_AGE, _CITY = _col("age", 41.0, "FP64"), _col("city", "Oslo", "BYTES")
BAD_OIP = {  # id -> (model, tensors, words), sent over OIP REST (JSON) and gRPC
    "cnn-shape": (
        "cnn",
        [("input-0", np.zeros((2, 1, 7, 8), np.float32), "FP32")],
        ["[2, 1, 7, 8]", "[n, 1, 8, 8]"],
    ),
    "iris-3-features": ("iris-pipe", [("input-0", np.array([ROW[:3]]), "FP64")], ["[n, 4]"]),
    "bytes-for-numbers": (
        "iris-pipe",
        [("input-0", np.array([["5.1", "3.5", "1.4", "0.2"]], object), "BYTES")],
        ["'BYTES'", "numeric"],
    ),
    "string-in-number-column": (
        "people",
        [_col("age", "forty", "BYTES"), _CITY],
        ["'age'", "numeric column", "BYTES"],
    ),
    "number-in-string-column": (
        "people",
        [_AGE, _col("city", 7, "INT64")],
        ["'city'", "string column", "INT64"],
    ),
    "missing-column": ("people", [_AGE], ["missing", "['city']"]),
    "extra-column": ("people", [_AGE, _CITY, _col("country", "NO", "BYTES")], ["['country']"]),
    "missing-input": ("adder", [("a", np.zeros((1, 3), np.float32), "FP32")], ["missing", "['b']"]),
}


@pytest.mark.parametrize("case", list(BAD_OIP))
def test_oip_rest_bad_input(server, case: str) -> None:
    model, tensors, words = BAD_OIP[case]
    inputs = [
        {"name": n, "shape": list(a.shape), "datatype": dt, "data": a.ravel().tolist()}
        for n, a, dt in tensors
    ]
    body = {"inputs": inputs, "parameters": {"content_type": "pd"} if model == "people" else {}}
    resp = httpx.post(f"{server.url}/v2/models/{model}/infer", json=body, timeout=30)
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert isinstance(error, str)
    for w in words:
        assert w in error, error


def test_oip_rest_string_data_in_a_number_tensor(server) -> None:
    body = {
        "inputs": [{"name": "input-0", "shape": [1, 4], "datatype": "FP64", "data": list("abcd")}]
    }
    resp = httpx.post(f"{server.url}/v2/models/iris-pipe/infer", json=body, timeout=30)
    assert resp.status_code == 400, resp.text
    assert "does not match datatype 'FP64'" in resp.json()["error"]


@pytest.mark.parametrize("case", list(BAD_OIP))
def test_grpc_bad_input_is_invalid_argument(grpc_client, case: str) -> None:
    model, tensors, words = BAD_OIP[case]
    with pytest.raises(InferenceServerException) as e:
        grpc_client.infer(model, [_grpc_input(*t) for t in tensors])
    assert e.value.status() == "StatusCode.INVALID_ARGUMENT", e.value
    for w in words:
        assert w in e.value.message(), e.value.message()


# --- models.check -----------------------------------------------------------------------------


def _check(home: Path, models_yaml: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "models.yaml"
    path.write_text(models_yaml)
    env = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "True"}
    return subprocess.run(
        [sys.executable, "-m", "models.check", str(path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_models_check_lists_every_model(store, tmp_path: Path) -> None:
    done = _check(store[0], MODELS_YAML, tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    # the header lines ("model config:", "model store:") start at column 0, models are indented
    listed = {line.split()[0] for line in done.stdout.splitlines() if line.startswith("  ")}
    assert listed == set(KIND), done.stdout


def test_models_check_names_a_wrong_torch_shape(store, tmp_path: Path) -> None:
    done = _check(store[0], BAD_CNN_YAML, tmp_path)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "model 'cnn'" in done.stderr and "[-1, 1, 7, 7]" in done.stderr, done.stderr


# --- failing when written: services/runtime/inputs.py check_shape's features message names no
# input; models/formats' _string_columns walks only a Pipeline's first step. Last in the module,
# so that -x runs everything else first.


def test_predict_names_the_input_of_a_wrong_shape(server) -> None:
    """Of a model's several inputs, a /predict refusal names the one with the wrong shape, as
    OIP does ("input 'b' has shape [1, 2]; ...")."""
    resp = _predict(server, "adder", {"a": [[1.0, 2.0, 3.0]], "b": [[1.0, 2.0]]})
    assert resp.status_code == 422, resp.text
    assert "'inputs.b'" in resp.json()["error"]["message"], resp.json()


def test_dataframe_model_with_an_imputed_string_column(server, cases) -> None:
    """A string column preprocessed by a Pipeline (SimpleImputer, then OneHotEncoder) is still a
    string column: BYTES in the metadata, strings in records, answers as in process."""
    md = httpx.get(f"{server.url}/v2/models/{IMPUTED}", timeout=10).json()
    assert [(t["name"], t["datatype"]) for t in md["inputs"]] == [
        ("age", "FP64"),
        ("city", "BYTES"),
    ]
    resp = _predict(server, IMPUTED, cases[IMPUTED].native)
    assert resp.status_code == 200, resp.text
    _assert_native(resp.json(), cases[IMPUTED])
