"""What a served model takes and answers: named, typed tensors per row, and its task.

Every way into a model (``/predict``, OIP V2 over REST and gRPC, a framework service) is checked
against one :class:`Signature`; OIP metadata is rendered from it, so it tells the truth about
every model. A signature comes from the model itself where the model records it (scikit-learn's
``n_features_in_`` / ``feature_names_in_``, a booster's feature count, an ONNX graph's inputs, the
metadata servery saves), else from the model config (``inputs:``); see :mod:`models.formats`.

Shapes are per row: a tabular model's input is ``(n_features,)``, an image model's
``(1, 28, 28)``, a column of a DataFrame model ``()``; the batch dimension is always the first
one on the wire (``[-1, *shape]`` in OIP metadata). ``-1`` in a shape is any size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from functools import cached_property
from typing import Any

import numpy as np

DEFAULT_INPUT = "input-0"
"""The input name of a single-tensor model that does not name its own (MLServer's convention)."""
OUTPUT_LABEL = "predict"
"""A classifier's predicted class index per row, or a regressor's prediction."""
OUTPUT_PROBA = "predict_proba"
"""A classifier's class probabilities per row."""

STRING = np.dtype(object)
"""The dtype of a string tensor (OIP ``BYTES``): a numpy object array of ``str``."""

OIP_DTYPES: dict[str, np.dtype] = {
    name: np.dtype(dt)
    for name, dt in {
        "BOOL": "bool",
        "UINT8": "uint8",
        "UINT16": "uint16",
        "UINT32": "uint32",
        "UINT64": "uint64",
        "INT8": "int8",
        "INT16": "int16",
        "INT32": "int32",
        "INT64": "int64",
        "FP16": "float16",
        "FP32": "float32",
        "FP64": "float64",
    }.items()
}
_OIP_OF_DTYPE = {dt: name for name, dt in OIP_DTYPES.items()}


def oip_datatype(dtype: np.dtype) -> str:
    """The OIP datatype name of a numpy dtype (FP32 for float32, BYTES for strings)."""
    name = _OIP_OF_DTYPE.get(dtype)  # a numeric np.dtype (every output, per request): one lookup
    if name is not None:
        return name
    dtype = np.dtype(dtype)
    if dtype.kind in "OUS":
        return "BYTES"
    return _OIP_OF_DTYPE[dtype]


def dtype_of(datatype: str) -> np.dtype:
    """The numpy dtype of an OIP datatype name; ValueError for an unknown one."""
    if datatype == "BYTES":
        return STRING
    try:
        return OIP_DTYPES[datatype]
    except KeyError:
        raise ValueError(
            f"unknown datatype {datatype!r}; one of {[*OIP_DTYPES, 'BYTES']}"
        ) from None


class Task(StrEnum):
    CLASSIFICATION = "classification"
    """Outputs ``predict`` (class index, INT64) and, where the model has them, ``predict_proba``."""
    REGRESSION = "regression"
    """Output ``predict``: one float per row, or one per target."""
    TENSOR = "tensor"
    """The model's own outputs (logits, embeddings, ...), named as the model names them."""


@dataclass(frozen=True)
class TensorSpec:
    """One named tensor of a model, per row."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    """Per row (no batch dimension); -1 is any size."""
    categories: tuple[str, ...] = ()
    """For a string column: the values the model was trained on (first one used to warm up)."""
    closed: bool = False
    """Only ``categories`` are valid (the model's encoder refuses any other value)."""

    @property
    def datatype(self) -> str:
        return oip_datatype(self.dtype)

    @property
    def is_string(self) -> bool:
        return self.dtype.kind in "OUS"

    def oip_shape(self) -> list[int]:
        return [-1, *self.shape]

    def matches(self, other: TensorSpec) -> bool:
        """Same name and per-row shape (a shadow or a compiled version can take the rows)."""
        return self.name == other.name and self.shape == other.shape

    def example(self, rows: int = 1) -> np.ndarray:
        """``rows`` rows of valid-looking values (zeros; a known category for strings)."""
        shape = (rows, *(1 if d < 0 else d for d in self.shape))
        if self.is_string:
            return np.full(shape, self.categories[0] if self.categories else "", dtype=object)
        return np.zeros(shape, dtype=self.dtype)

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "datatype": self.datatype,
            "shape": self.oip_shape(),
        }
        if self.closed:
            out["categories"] = list(self.categories)
        return out


@dataclass(frozen=True)
class Signature:
    """A model's inputs and outputs, its task and class names."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...] = ()
    task: Task = Task.CLASSIFICATION
    columnar: bool = False
    """Tabular with named (and string) columns: each input is one column, shape ``()``; the model
    takes a pandas DataFrame. ``/predict`` sends records; OIP sends one tensor per column
    (MLServer's pandas codec, ``content_type: "pd"``)."""
    class_names: tuple[str, ...] = ()

    @cached_property
    def single(self) -> TensorSpec | None:
        """The one input of a single-tensor model; None for several inputs or columns."""
        return self.inputs[0] if len(self.inputs) == 1 and not self.columnar else None

    @cached_property
    def n_features(self) -> int:
        """Values per row of a flat single-input model, or columns of a tabular one; -1 else."""
        if self.columnar:
            return len(self.inputs)
        single = self.single
        if single is not None and len(single.shape) == 1:
            return single.shape[0]
        return -1

    @cached_property
    def output_names(self) -> tuple[str, ...]:
        return tuple(o.name for o in self.outputs)

    def accepts_rows_of(self, other: Signature) -> bool:
        """Whether rows checked for ``other`` fit this signature (for shadows)."""
        return (
            self.columnar == other.columnar
            and len(self.inputs) == len(other.inputs)
            and all(a.matches(b) for a, b in zip(self.inputs, other.inputs, strict=True))
        )

    def example(self, rows: int = 1) -> Any:
        """A valid batch of ``rows`` rows (warm-up): an array, or a dict of them by input name."""
        single = self.single
        if single is not None:
            return single.example(rows)
        return {spec.name: spec.example(rows) for spec in self.inputs}

    def with_outputs(self, outputs: Sequence[TensorSpec]) -> Signature:
        return Signature(self.inputs, tuple(outputs), self.task, self.columnar, self.class_names)
