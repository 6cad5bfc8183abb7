"""models/formats: each BentoML save API's model loads with the right framework, task, signature
and answers; what cannot be served is refused with the reason (as models.check reports it)."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bench.harness.store import bentoml_store
from models.config import ModelEntry
from models.formats import Format, load
from models.signature import STRING, Task
from models.store import StoreError, get_model

X = np.random.default_rng(0).normal(size=(60, 4))
Y = (X[:, 0] + X[:, 1] > 0).astype(int) + (X[:, 2] > 1)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    home = tmp_path_factory.mktemp("formats") / "bentoml"
    with bentoml_store(home):
        yield home


def loaded(name: str, **entry: Any) -> Any:
    return load(get_model(f"{name}:latest"), ModelEntry(name=name, **entry))


def test_sklearn_classifier_regressor_and_no_proba(store: Path) -> None:
    import bentoml
    from sklearn.ensemble import GradientBoostingRegressor
    from sklearn.linear_model import LinearRegression, LogisticRegression
    from sklearn.svm import LinearSVC

    clf = LogisticRegression().fit(X, Y)
    bentoml.sklearn.save_model("clf", clf)
    m = loaded("clf")
    assert m.format is Format.SKLEARN and m.signature.task is Task.CLASSIFICATION
    assert m.signature.inputs[0].shape == (4,) and m.signature.output_names == (
        "predict",
        "predict_proba",
    )
    out = m.predict(X[:5])
    np.testing.assert_allclose(out["predict_proba"], clf.predict_proba(X[:5]))

    bentoml.sklearn.save_model("gbr", GradientBoostingRegressor(n_estimators=5).fit(X, X[:, 0]))
    reg = loaded("gbr")
    assert reg.signature.task is Task.REGRESSION and reg.signature.outputs[0].shape == ()
    multi = LinearRegression().fit(X, X[:, :2])
    bentoml.sklearn.save_model("multi", multi)
    m2 = loaded("multi")
    assert m2.signature.outputs[0].shape == (2,)
    np.testing.assert_allclose(m2.predict(X[:3])["predict"], multi.predict(X[:3]))

    svc = LinearSVC().fit(X, np.array(["b", "a", "c"])[Y])  # classes_ sorted: a, b, c
    bentoml.sklearn.save_model("svc", svc)
    m3 = loaded("svc")
    assert m3.signature.output_names == ("predict",) and m3.signature.class_names == ("a", "b", "c")
    idx = m3.predict(X[:10])["predict"]
    assert [m3.signature.class_names[i] for i in idx] == svc.predict(X[:10]).tolist()


def test_dataframe_pipeline_takes_named_string_columns(store: Path) -> None:
    import bentoml
    import pandas as pd
    from sklearn.compose import ColumnTransformer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    frame = pd.DataFrame({"age": X[:, 0] * 10 + 40, "city": np.array(["Oslo", "Lima"])[Y % 2]})
    pipe = make_pipeline(
        ColumnTransformer([("n", StandardScaler(), ["age"]), ("c", OneHotEncoder(), ["city"])]),
        LogisticRegression(),
    ).fit(frame, Y)
    bentoml.sklearn.save_model("people", pipe)
    m = loaded("people")
    sig = m.signature
    assert sig.columnar and [t.name for t in sig.inputs] == ["age", "city"]
    city = sig.inputs[1]
    assert city.dtype == STRING and city.closed and set(city.categories) == {"Oslo", "Lima"}
    out = m.predict({"age": np.array([30.0, 60.0]), "city": np.array(["Lima", "Oslo"], object)})
    want = pipe.predict_proba(pd.DataFrame({"age": [30.0, 60.0], "city": ["Lima", "Oslo"]}))
    np.testing.assert_allclose(out["predict_proba"], want)


def test_xgboost_saved_with_bentoml(store: Path) -> None:
    import bentoml
    import xgboost as xgb

    from models import xgboost_dist

    xgboost_dist.install()
    model = xgb.XGBClassifier(n_estimators=5, max_depth=2).fit(X, Y)
    bentoml.xgboost.save_model("xgbc", model)
    m = loaded("xgbc")
    assert m.format is Format.XGBOOST and m.signature.task is Task.CLASSIFICATION
    np.testing.assert_allclose(
        m.predict(X[:4].astype(np.float32))["predict_proba"],
        model.predict_proba(X[:4].astype(np.float32)),
        rtol=1e-6,
    )
    bentoml.xgboost.save_model("xgbr", xgb.XGBRegressor(n_estimators=5).fit(X, X[:, 1]))
    assert loaded("xgbr").signature.task is Task.REGRESSION


def test_torchscript_needs_its_input_shape_and_postprocess_makes_a_classifier(store: Path) -> None:
    import bentoml
    import torch

    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bentoml.torchscript.save_model("cnn", torch.jit.trace(net, torch.zeros(1, 1, 2, 2)))
    with pytest.raises(StoreError, match="does not record its input shape"):
        loaded("cnn")
    with pytest.raises(StoreError, match=r"declare the input's per-row shape"):
        loaded("cnn", inputs=[{"shape": [1, 3, 3]}])
    raw = loaded("cnn", inputs=[{"shape": [1, 2, 2]}])
    assert raw.signature.task is Task.TENSOR and raw.signature.output_names == ("output-0",)
    clf = loaded(
        "cnn", inputs=[{"shape": [1, 2, 2]}], postprocess="softmax", class_names=["a", "b", "c"]
    )
    out = clf.predict(np.ones((2, 1, 2, 2), np.float32))
    np.testing.assert_allclose(out["predict_proba"].sum(axis=1), 1.0, rtol=1e-6)
    with pytest.raises(StoreError, match="has 2 class names"):
        loaded("cnn", inputs=[{"shape": [1, 2, 2]}], postprocess="softmax", class_names=["a", "b"])


def test_what_cannot_be_served_is_refused(store: Path) -> None:
    import bentoml
    from sklearn.linear_model import LogisticRegression

    bentoml.sklearn.save_model("plain", LogisticRegression().fit(X, Y))
    with pytest.raises(StoreError, match="answers predictions itself"):
        loaded("plain", postprocess="softmax")
    with pytest.raises(StoreError, match=r"saved with bentoml\.sklearn; the config says"):
        loaded("plain", framework="pytorch")
    with bentoml.models.create("custom", module="bentoml.picklable_model"):
        pass
    with pytest.raises(StoreError, match="servery does not serve"):
        loaded("custom")


def test_which_models_a_framework_service_can_host() -> None:
    from models.config import Framework
    from models.formats import inline_only
    from models.signature import Signature, TensorSpec

    flat = Signature((TensorSpec("input-0", np.dtype("float32"), (4,)),))
    table = Signature(
        (TensorSpec("a", np.dtype("float64"), ()), TensorSpec("b", STRING, ())), columnar=True
    )
    assert inline_only("m", Framework.SKLEARN, flat) is None
    assert "onnx models are served inline only" in (inline_only("m", Framework.ONNX, flat) or "")
    assert "several inputs or named columns" in (inline_only("m", Framework.SKLEARN, table) or "")
