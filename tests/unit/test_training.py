"""The demo training scripts: hold-out quality, what they write to the store, and training.ensure.

Only small models are trained here (about a second each); every store write goes to a temporary
BENTOML_HOME through the ``model_store`` fixture.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from bench.harness.store import bentoml_store
from models.config import Framework
from models.store import get_model, load_object
from training.common import TrainResult, main, store_name
from training.ensure import DEMOS, ensure

# demo script -> (framework, lowest acceptable hold-out accuracy of the small model)
EXPECTED: dict[str, tuple[Framework, float]] = {
    "iris": (Framework.SKLEARN, 0.85),
    "breast_cancer": (Framework.XGBOOST, 0.9),
    "digits": (Framework.PYTORCH, 0.85),
}
METADATA_KEYS = {
    "framework",
    "feature_names",
    "class_names",
    "input_schema",
    "metrics",
    "params",
    "data_sha256",
}


@pytest.fixture
def model_store(tmp_path: Path) -> Iterator[Path]:
    """An empty temporary BentoML home for this test (see tests/conftest.py)."""
    with bentoml_store(tmp_path / "bentoml") as home:
        yield home


def _script(demo: str) -> ModuleType:
    return importlib.import_module(f"training.{demo}")


@functools.cache
def _trained(demo: str) -> TrainResult:
    # Shared by the tests below, which only read it.
    return _script(demo).train(size="small", seed=0, progress=False)


def _predict(framework: Framework, model: object, X: np.ndarray) -> np.ndarray:
    if framework is Framework.SKLEARN:
        return model.predict_proba(X)
    if framework is Framework.XGBOOST:
        import xgboost as xgb

        if isinstance(model, xgb.Booster):
            return model.predict(xgb.DMatrix(X))
        return model.predict_proba(X)[:, 1]
    import torch

    with torch.no_grad():
        return model(torch.from_numpy(X)).numpy()


@pytest.mark.parametrize("demo", DEMOS)
def test_small_model_beats_accuracy_bound(demo: str) -> None:
    framework, bound = EXPECTED[demo]
    result = _trained(demo)

    assert result.name == demo
    assert result.framework is framework
    assert result.size == "small"
    assert result.metrics["accuracy"] > bound
    assert 0 < result.metrics["log_loss"] < 1
    if len(result.class_names) == 2:
        assert result.metrics["roc_auc"] > bound
    assert result.X_test.dtype == np.dtype(result.dtype)
    assert result.X_test.shape[1] == len(result.feature_names)
    assert set(np.unique(result.y_test)) == set(range(len(result.class_names)))


def test_digits_takes_raw_pixels() -> None:
    result = _trained("digits")
    assert result.X_test.max() == 16.0
    assert result.feature_names[0] == "pixel_0_0"
    assert result.feature_names[-1] == "pixel_7_7"
    assert result.arch == {"n_features": 64, "hidden": [64], "n_classes": 10}


@pytest.mark.parametrize("demo", DEMOS)
def test_save_writes_metadata_and_round_trips(demo: str, model_store: Path) -> None:
    framework, _ = EXPECTED[demo]
    result = _trained(demo)

    saved = _script(demo).save(result)

    assert Path(saved.path).is_relative_to(model_store)
    stored = get_model(f"{demo}:latest")
    assert stored.tag == saved.tag
    labels, metadata = stored.info.labels, stored.info.metadata
    assert labels["framework"] == framework.value
    assert labels["task"] == "classification"
    assert labels["size"] == "small"
    assert METADATA_KEYS <= metadata.keys()
    assert metadata["framework"] == framework.value
    assert metadata["feature_names"] == result.feature_names
    assert metadata["class_names"] == result.class_names
    assert metadata["input_schema"] == {
        "n_features": len(result.feature_names),
        "dtype": result.dtype,
    }
    assert metadata["metrics"] == pytest.approx(result.metrics)
    assert metadata["params"] == result.params
    assert metadata["data_sha256"] == result.data_hash
    if framework is Framework.PYTORCH:
        assert metadata["arch"] == result.arch

    loaded = load_object(stored, framework)
    np.testing.assert_array_equal(
        _predict(framework, loaded, result.X_test),
        _predict(framework, result.model, result.X_test),
    )


def test_data_hash_depends_only_on_seed() -> None:
    from training import iris

    first = iris.train(seed=0, progress=False)
    again = iris.train(seed=0, progress=False)
    other = iris.train(seed=1, progress=False)

    assert first.data_hash == again.data_hash == _trained("iris").data_hash
    assert len(first.data_hash) == 64
    # The hash covers the training split, which the seed changes.
    assert other.data_hash != first.data_hash


def test_store_name_by_size() -> None:
    assert store_name("iris", "small") == "iris"
    assert store_name("iris", "large") == "iris_large"
    with pytest.raises(ValueError, match="size"):
        store_name("iris", "huge")  # type: ignore[arg-type]


def test_cli_trains_and_saves(model_store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from training import iris

    assert main(iris.train, "test", ["--seed", "3", "--no-progress"]) == 0

    stored = get_model("iris:latest")
    assert stored.info.metadata["params"]["seed"] == 3
    assert "iris: saved iris:" in capsys.readouterr().out


def test_ensure_trains_missing_models_once(
    model_store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    created = ensure("small", progress=False)

    assert [tag.split(":")[0] for tag in created] == list(DEMOS)
    for tag in created:
        assert str(get_model(tag).tag) == tag
    assert ensure("small", progress=False) == []
    out = capsys.readouterr().out
    assert out.count("already in the model store") == len(DEMOS)


def test_ensure_rejects_unknown_size(model_store: Path) -> None:
    with pytest.raises(ValueError, match="size"):
        ensure("huge", progress=False)
