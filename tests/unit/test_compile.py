"""models/compile.py and ``servery models compile``: scikit-learn and XGBoost models (servery's own
format and BentoML's framework helpers) to ONNX, checked on held-out rows, saved as a new version;
and the refusals. Real models in a temporary store, real converters and onnxruntime."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bench.harness.server import ROOT
from bench.harness.store import bentoml_store
from models.aliases import AliasError, AliasStore
from models.compile import INPUT_NAME, CompileRefused, compile_model
from models.formats import framework_of
from models.store import load_object


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A store with the small iris (sklearn) and breast_cancer (XGBoost) demo models, and a
    Pipeline and an XGBClassifier saved through bentoml.sklearn / bentoml.xgboost."""
    import bentoml
    import xgboost as xgb
    from sklearn.datasets import load_breast_cancer, load_wine
    from sklearn.linear_model import LinearRegression, LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from models.xgboost_dist import install
    from training import breast_cancer, iris

    install()
    home = tmp_path_factory.mktemp("compile") / "bentoml"
    with bentoml_store(home):
        found: dict[str, Any] = {"home": home}
        for module in (iris, breast_cancer):
            result = module.train("small", seed=0, progress=False)
            found[result.name] = module.save(result).tag.version
        x, y = load_wine(return_X_y=True)
        pipe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(x, y)
        found["wine"] = bentoml.sklearn.save_model("wine", pipe).tag.version
        found["wine_rows"] = x[::3]
        xb, yb = load_breast_cancer(return_X_y=True)
        clf = xgb.XGBClassifier(n_estimators=20, max_depth=3, n_jobs=1).fit(xb[::2], yb[::2])
        found["bc_xgb"] = bentoml.xgboost.save_model("bc_xgb", clf).tag.version
        found["bc_rows"] = xb[1::2]
        found["linear"] = bentoml.sklearn.save_model("linear", LinearRegression().fit(x, y))
        found["linear"] = found["linear"].tag.version
        yield found


def run_saved(tag: str, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The compiled file itself, on onnxruntime: (labels, probabilities)."""
    import bentoml
    import onnxruntime as ort

    model = bentoml.models.get(tag)
    assert model.info.module == "bentoml.onnx"
    session = ort.InferenceSession(
        model.path_of("saved_model.onnx"), providers=["CPUExecutionProvider"]
    )
    assert [(i.name, i.type, i.shape[1]) for i in session.get_inputs()] == [
        (INPUT_NAME, "tensor(float)", x.shape[1])
    ]
    outputs = model.info.metadata["onnx_outputs"]
    labels, proba = session.run(
        [outputs["label"], outputs["probabilities"]], {INPUT_NAME: x.astype(np.float32)}
    )
    return labels, proba


def check_compiled(name: str, source_version: str, result: Any, n_features: int) -> Any:
    import bentoml

    assert result.source_tag == f"{name}:{source_version}"
    assert result.version in AliasStore().versions(name) and result.version != source_version
    info = bentoml.models.get(result.tag).info
    assert info.labels["compiled_from"] == source_version
    assert info.labels["compiled"] == "onnx" and info.labels["task"] == "classification"
    assert "framework" not in info.labels and "servery" not in info.labels
    meta = info.metadata
    assert meta["task"] == "classification"
    assert meta["input_schema"] == {"n_features": n_features, "dtype": "float32"}
    assert len(meta["feature_names"]) == n_features
    assert meta["onnx_outputs"] == {"label": "label", "probabilities": "probabilities"}
    assert meta["source_version"] == source_version
    assert meta["source_tag"] == f"{name}:{source_version}"
    assert meta["agreement"]["labels_agree"] == 1.0
    assert meta["agreement"]["rows"] == result.rows >= 20
    assert 0.0 <= meta["agreement"]["max_abs_proba_diff"] <= 1e-5
    return info


@pytest.mark.parametrize("name", ["iris", "breast_cancer"])
def test_servery_models_compile_on_their_stored_holdout(store: dict[str, Any], name: str) -> None:
    import bentoml

    source = bentoml.models.get(f"{name}:{store[name]}")
    result = compile_model(name, store[name])
    meta = check_compiled(name, store[name], result, len(source.info.metadata["feature_names"]))
    meta = meta.metadata
    for key in ("class_names", "feature_names", "metrics", "params", "data_sha256"):
        assert meta[key] == source.info.metadata[key]
    assert bentoml.models.get(result.tag).info.labels["size"] == "small"  # other labels kept
    holdout = np.load(source.path_of("holdout.npy"))
    assert result.rows == len(holdout)
    # the saved file answers as the source does: same most probable class on every row
    obj = load_object(source, framework_of(source))
    if hasattr(obj, "predict_proba"):
        expected = obj.predict_proba(holdout).argmax(axis=1)
    else:  # the breast_cancer booster: P(malignant)
        expected = (obj.inplace_predict(holdout.astype(np.float32)) > 0.5).astype(int)
    labels, proba = run_saved(result.tag, holdout)
    assert (labels == expected).all() and (proba.argmax(axis=1) == expected).all()
    # the compiled version is the newest, a candidate: production stays on the source
    aliases = AliasStore()
    assert aliases.latest(name) == result.version
    assert aliases.read(name).aliases["production"] == store[name]
    assert result.pinned_production in (store[name], None)  # None: pinned by an earlier compile


def test_bentoml_sklearn_pipeline_compiles_with_rows_from_a_npy_file(
    store: dict[str, Any], tmp_path: Path
) -> None:
    rows = tmp_path / "rows.npy"
    np.save(rows, store["wine_rows"])
    result = compile_model("wine", store["wine"], rows)
    assert result.converter["name"] == "skl2onnx"
    info = check_compiled("wine", store["wine"], result, 13)
    assert info.metadata["class_names"] == ["0", "1", "2"]
    labels, _ = run_saved(result.tag, store["wine_rows"])
    import bentoml

    pipe = bentoml.sklearn.load_model(f"wine:{store['wine']}")
    assert (labels == pipe.predict(store["wine_rows"])).all()


def test_bentoml_xgboost_classifier_compiles_with_rows_from_a_csv(
    store: dict[str, Any], tmp_path: Path
) -> None:
    rows = tmp_path / "rows.csv"
    np.savetxt(rows, store["bc_rows"], delimiter=",")  # numbers only, no header
    result = compile_model("bc_xgb", store["bc_xgb"], rows)
    assert result.converter["name"] == "onnxmltools"
    check_compiled("bc_xgb", store["bc_xgb"], result, 30)
    import bentoml

    clf = bentoml.xgboost.load_model(f"bc_xgb:{store['bc_xgb']}")
    labels, _ = run_saved(result.tag, store["bc_rows"])
    assert (labels == clf.predict(store["bc_rows"])).all()


def test_csv_header_names_the_features_in_any_order(store: dict[str, Any], tmp_path: Path) -> None:
    import bentoml

    source = bentoml.models.get(f"iris:{store['iris']}")
    names = source.info.metadata["feature_names"]
    x = np.load(source.path_of("holdout.npy"))
    rows = tmp_path / "rows.csv"
    np.savetxt(rows, x[:, ::-1], delimiter=",", header=",".join(names[::-1]), comments="")
    assert compile_model("iris", store["iris"], rows).rows == len(x)
    bad = tmp_path / "bad.csv"
    np.savetxt(bad, x, delimiter=",", header="a,b,c,d", comments="")
    with pytest.raises(CompileRefused, match=r"is not iris:\w+'s features"):
        compile_model("iris", store["iris"], bad)


def test_a_disagreement_is_refused_and_says_where(store: dict[str, Any]) -> None:
    # iris is served in float64 and the ONNX model computes in float32: its probabilities
    # differ by ~1e-7, so a tolerance of 0 must refuse, naming rows and the largest difference.
    before = AliasStore().versions("iris")
    with pytest.raises(CompileRefused) as refused:
        compile_model("iris", store["iris"], tolerance=0.0)
    reason = refused.value.reason
    assert "disagrees with the source" in reason
    assert "probabilities differ by more than 0 on" in reason and "(first rows: [" in reason
    assert "max |difference|" in reason and "at row" in reason
    assert "labels differ" not in reason  # labels still agree
    assert AliasStore().versions("iris") == before  # nothing saved


@pytest.mark.parametrize(
    ("name", "rows", "message"),
    [
        ("iris", np.zeros((30, 5)), r"rows of shape \(30, 5\), but iris:\w+ takes 4 features"),
        ("iris", np.zeros((5, 4)), "5 rows are too few to check on; give at least 20"),
        ("iris", np.full((30, 4), np.nan), "NaN or infinite"),
        ("wine", None, r"no stored hold-out rows \(holdout.npy\); pass --rows FILE"),
        ("linear", np.zeros((30, 13)), "not a classifier with predict_proba"),
    ],
)
def test_refusals(store: dict[str, Any], name: str, rows: Any, message: str) -> None:
    with pytest.raises(CompileRefused, match=message):
        compile_model(name, store[name], rows)  # the version: latest may be a compiled one


def test_a_compiled_version_is_not_compiled_again_and_unknown_names_are_errors(
    store: dict[str, Any],
) -> None:
    compiled = compile_model("breast_cancer", store["breast_cancer"]).version
    with pytest.raises(CompileRefused, match="already a compiled"):
        compile_model("breast_cancer", compiled)
    with pytest.raises(AliasError, match="no model named"):
        compile_model("nope")


def cli(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "True"}
    return subprocess.run(
        [sys.executable, "-m", "models.cli", "models", "compile", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_compiles_and_refuses(store: dict[str, Any], tmp_path: Path) -> None:
    ok = cli(store["home"], "iris", "--version", store["iris"])
    assert ok.returncode == 0, ok.stderr
    assert f"compiled iris:{store['iris']} to ONNX as version" in ok.stdout
    assert "labels agree" in ok.stdout
    new = ok.stdout.split("as version ")[1].split()[0]
    assert new in AliasStore().versions("iris")

    rows = tmp_path / "wide.npy"
    np.save(rows, np.zeros((30, 7)))
    refused = cli(store["home"], "iris", "--version", store["iris"], "--rows", str(rows))
    assert refused.returncode == 1
    assert "servery models compile: refused:" in refused.stderr
    assert "rows of shape (30, 7), but iris:" in refused.stderr
    missing = cli(store["home"], "nope")
    assert missing.returncode == 2 and "no model named 'nope'" in missing.stderr
