"""services/runtime/inputs.py and predictors.py: request validation (``to_matrix``), ModelInfo
and the batch contract."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from models.config import Framework
from models.signature import Signature, Task, TensorSpec
from services.runtime.errors import InvalidInput, PayloadTooLarge, ServeryError
from services.runtime.inputs import to_matrix
from services.runtime.predictors import ModelInfo, Runtime

F32 = np.dtype("float32")
F64 = np.dtype("float64")


def matrix(inputs: Any, n_features: int = 2, dtype: np.dtype = F32, max_rows: int = 8) -> Any:
    return to_matrix(inputs, n_features, dtype, max_rows, "iris")


def rejected(inputs: Any, *, exc: type[ServeryError] = InvalidInput, **kwargs: Any) -> str:
    """Assert ``inputs`` is rejected with ``exc`` (exactly) and return the message."""
    with pytest.raises(ServeryError) as info:
        matrix(inputs, **kwargs)
    assert type(info.value) is exc
    assert info.value.details == {"param": "inputs"}
    return info.value.message


# --- accepted -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("inputs", "expected"),
    [
        ([[1, 2], [3, 4]], [[1.0, 2.0], [3.0, 4.0]]),  # ints
        ([[0.5, -1.25]], [[0.5, -1.25]]),  # floats
        ([[1, 2.5], [-3, 0]], [[1.0, 2.5], [-3.0, 0.0]]),  # mixed
        ([[2**63, 0]], [[2.0**63, 0.0]]),  # uint64 range still a number
        ([[-1e30, 3.4e38]], [[-1e30, 3.4e38]]),  # large but within float32
    ],
)
@pytest.mark.parametrize("dtype", [F32, F64])
def test_accepted(inputs: Any, expected: list[list[float]], dtype: np.dtype) -> None:
    out = matrix(inputs, dtype=dtype)
    assert isinstance(out, np.ndarray)
    assert out.dtype == dtype
    assert out.shape == (len(expected), 2)
    np.testing.assert_array_equal(out, np.array(expected, dtype=dtype))


def test_float64_keeps_precision() -> None:
    out = matrix([[0.1, 1 / 3]], dtype=F64)
    assert out[0, 0] == 0.1
    assert out[0, 1] == 1 / 3


def test_max_rows_is_inclusive() -> None:
    assert matrix([[1, 2]] * 8, max_rows=8).shape == (8, 2)


def test_single_row_and_single_feature() -> None:
    assert matrix([[7]], n_features=1).tolist() == [[7.0]]


# --- rejected -----------------------------------------------------------------------------------


@pytest.mark.parametrize("inputs", ["1,2", 3, None, {"a": 1}, (1, 2), np.zeros((1, 2))])
def test_not_a_list(inputs: Any) -> None:
    assert "must be a list of rows" in rejected(inputs)


def test_empty() -> None:
    assert "'inputs' is empty" in rejected([])


def test_too_many_rows() -> None:
    msg = rejected([[1, 2]] * 9, exc=PayloadTooLarge, max_rows=8)
    assert "9 rows" in msg
    assert "limit is 8" in msg
    assert "SERVERY_MAX_ROWS_PER_REQUEST" in msg


def test_too_many_rows_checked_before_content() -> None:
    # An oversized body is refused on its length alone, even if its rows are garbage.
    rejected(["x"] * 9, exc=PayloadTooLarge, max_rows=8)


@pytest.mark.parametrize("inputs", [[[1, 2], [3]], [[1, 2], 3], [[1, [2]]], [[1, 2], [3, 4, 5]]])
def test_ragged(inputs: Any) -> None:
    assert "same length" in rejected(inputs)


def test_one_dimensional() -> None:
    msg = rejected([1.0, 2.0])
    assert "2-D" in msg
    assert "got 1 dimension" in msg
    assert "wrap a single row in another list" in msg


def test_three_dimensional() -> None:
    msg = rejected([[[1, 2]], [[3, 4]]])
    assert "got 3 dimension" in msg
    assert "wrap" not in msg


@pytest.mark.parametrize("inputs", [[["a", "b"]], [[1, "2"]], [["1.5", "2.5"]]])
def test_strings(inputs: Any) -> None:
    assert "found strings" in rejected(inputs)


@pytest.mark.parametrize(
    "inputs",
    [[[True, False]], [[1.5, True]], [[1, True]], [[0, 1], [1.0, False]], [[False, 2]]],
)
def test_booleans(inputs: Any) -> None:
    # numpy reads True as 1 when mixed with numbers; the check must still catch it.
    assert "found booleans" in rejected(inputs)


@pytest.mark.parametrize("inputs", [[[1, None]], [[None, None]], [[1, {"a": 1}]], [[1 + 2j, 0]]])
def test_non_numbers(inputs: Any) -> None:
    assert "must hold only numbers" in rejected(inputs)


@pytest.mark.parametrize(
    "inputs", [[[10**400, 1]], [[10**400, 1.5]], [[2**64, 1]], [[-(10**30), 0]]]
)
@pytest.mark.parametrize("dtype", [F32, F64])
def test_huge_ints(inputs: Any, dtype: np.dtype) -> None:
    # Python ints past 64 bits make an object array: rejected as out of range, never rounded.
    assert "out-of-range" in rejected(inputs, dtype=dtype)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", [F32, F64])
def test_not_finite(bad: float, dtype: np.dtype) -> None:
    msg = rejected([[1, 2], [bad, 0], [3, 4], [0, bad]], dtype=dtype)
    assert "finite" in msg
    assert "NaN/Infinity" in msg
    assert "bad row(s): [1, 3]" in msg


def test_float32_overflow() -> None:
    msg = rejected([[1, 2], [1e39, 0]], dtype=F32)
    assert "within float32 range" in msg
    assert "bad row(s): [1]" in msg
    # The same values fit a float64 model.
    assert matrix([[1, 2], [1e39, 0]], dtype=F64)[1, 0] == 1e39


def test_bad_rows_listed_at_most_ten() -> None:
    msg = rejected([[float("nan"), 0]] * 12, max_rows=20)
    assert "bad row(s): [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]" in msg


@pytest.mark.parametrize(("row", "got"), [([1, 2, 3], 3), ([1], 1), ([], 0)])
def test_wrong_number_of_features(row: list[int], got: int) -> None:
    msg = rejected([row, row])
    assert msg == f"model 'iris' expects 2 features per row, got {got}"


def test_error_status_codes() -> None:
    assert InvalidInput.status_code == 422
    assert PayloadTooLarge.status_code == 413


# --- ModelInfo ----------------------------------------------------------------------------------


def make_info(**overrides: Any) -> ModelInfo:
    fields: dict[str, Any] = {
        "name": "flowers",
        "store_name": "iris",
        "version": "abc123",
        "framework": Framework.SKLEARN,
        "n_features": 4,
        "dtype": F32,
        "feature_names": ["sl", "sw", "pl", "pw"],
        "class_names": ["setosa", "versicolor", "virginica"],
        "labels": {"task": "classification", "framework": "sklearn"},
        "metadata": {
            "metrics": {"accuracy": 0.97},
            "params": {"C": 1.0},
            "data_sha256": "deadbeef",
            "private": "not served",
        },
    }
    fields.update(overrides)
    spec = TensorSpec("input-0", np.dtype(fields.pop("dtype")), (fields.pop("n_features"),))
    classes = tuple(fields.pop("class_names"))
    fields["signature"] = Signature((spec,), (), Task.CLASSIFICATION, False, classes)
    return ModelInfo(**fields)


def test_describe() -> None:
    info = make_info()
    assert info.tag == "iris:abc123"
    d = info.describe()
    assert set(d) == {
        "name",
        "version",
        "tag",
        "framework",
        "format",
        "task",
        "input_schema",
        "class_names",
        "metrics",
        "params",
        "data_sha256",
        "labels",
    }
    assert d["name"] == "flowers"
    assert d["version"] == "abc123"
    assert d["tag"] == "iris:abc123"
    assert d["framework"] == "sklearn"
    assert d["task"] == "classification"
    assert d["format"] == "servery"
    assert d["input_schema"] == {
        "inputs": [{"name": "input-0", "datatype": "FP32", "shape": [-1, 4]}],
        "outputs": [],
        "n_features": 4,
        "dtype": "float32",
        "feature_names": ["sl", "sw", "pl", "pw"],
    }
    assert d["class_names"] == ["setosa", "versicolor", "virginica"]
    assert d["metrics"] == {"accuracy": 0.97}
    assert d["params"] == {"C": 1.0}
    assert d["data_sha256"] == "deadbeef"
    assert "not served" not in json.dumps(d)  # plain JSON, and only the public metadata


def test_describe_without_optional_metadata() -> None:
    d = make_info(labels={}, metadata={}, framework=Framework.PYTORCH).describe()
    assert d["task"] == "classification"
    assert d["framework"] == "pytorch"
    assert d["metrics"] == {}
    assert d["params"] == {}
    assert d["data_sha256"] is None


def test_validate_uses_the_model_schema() -> None:
    info = make_info(dtype=F64)
    out = info.validate([[1, 2, 3, 4]], max_rows=1)
    assert out.dtype == F64
    assert out.shape == (1, 4)
    with pytest.raises(InvalidInput, match="model 'flowers' expects 4 features per row, got 2"):
        info.validate([[1, 2]], max_rows=1)
    with pytest.raises(PayloadTooLarge):
        info.validate([[1, 2, 3, 4]] * 2, max_rows=1)


# --- Runtime ------------------------------------------------------------------------------------


def test_runtime_predict() -> None:
    proba = np.array([[0.1, 0.7, 0.2], [0.6, 0.3, 0.1]])
    runtime = Runtime(
        info=make_info(),
        call=lambda x: {"predict": proba[: len(x)].argmax(1), "predict_proba": proba},
    )
    out = runtime.predict(np.zeros((2, 4), dtype=F32))
    assert out["predict"].tolist() == [1, 0]
    np.testing.assert_array_equal(out["predict_proba"], proba)


def test_runtime_batch_size_mismatch() -> None:
    runtime = Runtime(info=make_info(), call=lambda x: {"predict_proba": np.zeros((len(x) + 1, 2))})
    with pytest.raises(RuntimeError, match="batch size mismatch") as info:
        runtime.predict(np.zeros((3, 4), dtype=F32))
    msg = str(info.value)
    assert "iris:abc123" in msg
    assert "returned 4 rows of 'predict_proba' for 3 inputs" in msg
