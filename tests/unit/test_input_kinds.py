"""services/runtime/inputs.py to_batch and services/protocols/oip/core.py rows_from_inputs for
every kind of input a signature has: n-D tensors, several named inputs, tabular columns."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from models.signature import STRING, Signature, TensorSpec
from services.protocols.oip import core as oip
from services.runtime.errors import InvalidInput
from services.runtime.inputs import to_batch

F32 = np.dtype("float32")
IMAGE = Signature((TensorSpec("input-0", F32, (1, 2, 2)),))
PAIR = Signature((TensorSpec("a", F32, (3,)), TensorSpec("b", np.dtype("int64"), (2,))))
TABLE = Signature(
    (TensorSpec("age", np.dtype("float64"), ()), TensorSpec("city", STRING, (), ("Oslo",))),
    columnar=True,
)


def refused(inputs: Any, sig: Signature) -> str:
    with pytest.raises(InvalidInput) as e:
        to_batch(inputs, sig, 8, "m")
    return e.value.message


def test_nd_rows() -> None:
    out = to_batch([[[[1, 2], [3, 4]]], [[[5, 6], [7, 8]]]], IMAGE, 8, "m")
    assert out.dtype == F32 and out.shape == (2, 1, 2, 2)
    msg = refused([[[1, 2], [3, 4]]], IMAGE)
    assert "shape [1, 2, 2]" in msg and "[n, 1, 2, 2]" in msg
    assert "shape [1, 2, 2]" in refused([[[[1, 2, 3], [3, 4, 5]]]], IMAGE)


def test_named_inputs() -> None:
    out = to_batch({"a": [[1, 2, 3]], "b": [[4, 5]]}, PAIR, 8, "m")
    assert out["a"].dtype == F32 and out["b"].dtype == np.int64 and out["b"].tolist() == [[4, 5]]
    assert "missing inputs ['b']" in refused({"a": [[1, 2, 3]]}, PAIR)
    assert "unknown inputs ['c']" in refused({"a": [[1, 2, 3]], "b": [[4, 5]], "c": []}, PAIR)
    assert "object of input name" in refused([[1, 2, 3]], PAIR)
    assert "as many rows" in refused({"a": [[1, 2, 3]], "b": [[4, 5], [6, 7]]}, PAIR)
    assert "non-integer" in refused({"a": [[1, 2, 3]], "b": [[4.5, 5]]}, PAIR)


def test_records() -> None:
    out = to_batch([{"age": 41, "city": "Oslo"}, {"age": 7.5, "city": "Lima"}], TABLE, 8, "m")
    assert out["age"].tolist() == [41.0, 7.5] and out["city"].tolist() == ["Oslo", "Lima"]
    msg = refused([{"age": 41}], TABLE)
    assert "missing column(s) in record 0: ['city']" in msg
    assert "unknown column(s) in record 0: ['zip']" in refused(
        [{"age": 41, "city": "Oslo", "zip": 1}], TABLE
    )
    assert "column 'age' takes numbers; row 0 has str" in refused(
        [{"age": "41", "city": "Oslo"}], TABLE
    )
    assert "column 'age' takes numbers; row 0 has bool" in refused(
        [{"age": True, "city": "Oslo"}], TABLE
    )
    assert "column 'city' takes strings" in refused([{"age": 41, "city": 7}], TABLE)
    assert "takes records" in refused([[41, "Oslo"]], TABLE)
    assert "must be finite" in refused([{"age": float("nan"), "city": "Oslo"}], TABLE)


def info(sig: Signature) -> Any:
    return SimpleNamespace(name="m", signature=sig)


def tensor(name: str, shape: list[int], datatype: str, data: Any) -> oip.InputTensor:
    return oip.InputTensor(name, datatype, shape, data)


def test_oip_columns_as_mlserver_sends_them() -> None:
    got = oip.rows_from_inputs(
        [tensor("age", [2, 1], "FP64", [41, 7]), tensor("city", [2], "BYTES", ["Oslo", "Lima"])],
        info(TABLE),
        8,
    )
    assert got["age"].tolist() == [41.0, 7.0] and got["city"].tolist() == ["Oslo", "Lima"]
    binary = np.empty(1, dtype=object)
    binary[:] = [b"Oslo"]
    got = oip.rows_from_inputs(
        [
            tensor("age", [1], "INT32", np.array([3], np.int32)),
            tensor("city", [1], "BYTES", binary),
        ],
        info(TABLE),
        8,
    )
    assert got["city"].tolist() == ["Oslo"]


@pytest.mark.parametrize(
    ("tensors", "words"),
    [
        ([tensor("age", [1], "FP64", [1.0])], "missing input(s) ['city']"),
        (
            [
                tensor("age", [1], "FP64", [1.0]),
                tensor("city", [1], "BYTES", ["x"]),
                tensor("zip", [1], "FP64", [1.0]),
            ],
            "unknown input(s) ['zip']",
        ),
        (
            [tensor("age", [1], "BYTES", ["x"]), tensor("city", [1], "BYTES", ["x"])],
            "input 'age' is a numeric column",
        ),
        (
            [tensor("age", [1], "FP64", [1.0]), tensor("city", [1], "FP64", [1.0])],
            "input 'city' is a string column",
        ),
        (
            [tensor("age", [2], "FP64", [1.0, 2.0]), tensor("city", [1], "BYTES", ["x"])],
            "as many rows",
        ),
        (
            [tensor("age", [1, 2], "FP64", [1.0, 2.0]), tensor("city", [1], "BYTES", ["x"])],
            "input 'age' has shape [1, 2]",
        ),
    ],
)
def test_oip_column_mistakes(tensors: list[oip.InputTensor], words: str) -> None:
    with pytest.raises(InvalidInput) as e:
        oip.rows_from_inputs(tensors, info(TABLE), 8)
    assert words in e.value.message


def test_oip_nd_and_named() -> None:
    x = oip.rows_from_inputs(
        [tensor("input-0", [1, 1, 2, 2], "FP64", [1, 2, 3, 4])], info(IMAGE), 8
    )
    assert x.dtype == F32 and x.shape == (1, 1, 2, 2)
    with pytest.raises(InvalidInput, match=r"expects \[n, 1, 2, 2\]"):
        oip.rows_from_inputs([tensor("input-0", [1, 4], "FP32", [1, 2, 3, 4])], info(IMAGE), 8)
    got = oip.rows_from_inputs(
        [tensor("b", [1, 2], "INT64", [4, 5]), tensor("a", [1, 3], "FP32", [1, 2, 3])],
        info(PAIR),
        8,
    )
    assert set(got) == {"a", "b"} and got["b"].dtype == np.int64


def test_metadata_tells_the_truth() -> None:
    sig = TABLE.with_outputs([TensorSpec("predict", np.dtype("int64"), ())])
    meta = oip.model_metadata(
        SimpleNamespace(
            name="m",
            version="v",
            signature=sig,
            framework=SimpleNamespace(value="sklearn"),
            task=sig.task,
            dtype=np.dtype("float64"),
            output_dtypes={"predict": np.dtype("int64")},
        )
    )
    assert meta["parameters"] == {"content_type": "pd"}
    assert meta["inputs"] == [
        {"name": "age", "datatype": "FP64", "shape": [-1], "parameters": {"content_type": "np"}},
        {"name": "city", "datatype": "BYTES", "shape": [-1], "parameters": {"content_type": "str"}},
    ]
    assert meta["outputs"] == [{"name": "predict", "datatype": "INT64", "shape": [-1]}]
