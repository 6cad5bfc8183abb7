"""services/protocols/oip/core.py rows_from_inputs: the fast path for flat JSON numbers answers
exactly as the
general path does, value for value and error for error."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from models.signature import Signature, TensorSpec
from services.protocols.oip import core as oip
from services.runtime.errors import ServeryError
from services.runtime.inputs import holds_bool

CASES: list[Any] = [
    [0.5, 1.25, -3.0, 7.0],
    [1, 2, 3, 4],  # ints for a float tensor
    [1, 2.5, -3, 0.1],
    [1e300, 0.0, 0.0, 0.0],  # beyond FP32: inf, refused
    [10**400, 0.0, 0.0, 0.0],  # beyond any float
    [float("nan"), 0.0, 0.0, 0.0],
    [True, 0.0, 0.0, 0.0],  # JSON true is not a number here
    [None, 0.0, 0.0, 0.0],
    ["1.0", 0.0, 0.0, 0.0],
    [[0.5, 1.25], [-3.0, 7.0]],  # nested rows
    [0.5, 1.25, -3.0],  # too few values
    [],
]


def outcome(data: Any, datatype: str, dtype: str) -> Any:
    spec = TensorSpec(oip.INPUT_NAME, np.dtype(dtype), (4,))
    info = SimpleNamespace(name="m", signature=Signature((spec,)))
    tensor = oip.InputTensor(oip.INPUT_NAME, datatype, [1, 4], data)
    try:
        out = oip.rows_from_inputs([tensor], info, max_rows=10)  # type: ignore[arg-type]
    except ServeryError as e:
        return type(e).__name__, e.message
    return out.dtype, out.shape, out.tolist()


@pytest.mark.parametrize("data", CASES)
@pytest.mark.parametrize(("datatype", "dtype"), [("FP32", "float32"), ("FP64", "float64")])
def test_fast_path_answers_as_the_general_path(
    data: Any, datatype: str, dtype: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    fast = outcome(data, datatype, dtype)
    monkeypatch.setattr(oip, "_NUMBERS", frozenset())  # every request takes the general path
    assert fast == outcome(data, datatype, dtype)


def test_fast_path_values_are_the_models_dtype() -> None:
    dt, shape, values = outcome([0.1, 0.2, 0.3, 0.4], "FP32", "float32")
    assert dt == np.float32 and shape == (1, 4)
    assert values == [np.array([0.1, 0.2, 0.3, 0.4], dtype=np.float32).tolist()]


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ([1.0, 2.0], False),
        ([1.0, True], True),
        ([[1.0], [2.0, [False]]], True),
        ([[1.0], [2.0, [3]]], False),
        (False, True),
        (3.0, False),
    ],
)
def test_holds_bool_finds_bools_at_any_depth(data: Any, expected: bool) -> None:
    assert holds_bool(data) is expected
