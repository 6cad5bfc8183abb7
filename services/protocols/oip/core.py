"""Open Inference Protocol (KServe V2) core, shared by the REST and gRPC front ends.

Protocol-neutral: it turns OIP input tensors into the rows a served model takes (checked by the one
input rule, :mod:`services.runtime.inputs`), and builds output tensors and metadata. The front ends
parse and serialise (JSON in ``rest.py``, protobuf in ``grpc.py``), run the inference through
:func:`services.runtime.inference.infer` (the same registry and micro-batchers as ``/predict``, so
REST, gRPC and native requests for one model batch together), and map :class:`ServeryError` status
codes to their protocol (400/404/503 over REST, INVALID_ARGUMENT/NOT_FOUND/UNAVAILABLE over gRPC).

Every servery classifier has one input and two outputs:

* input ``input-0``: ``[-1, n_features]``, the model's dtype (FP32 or FP64); any numeric datatype
  is accepted and converted;
* output ``predict``: ``INT64 [-1]``, the predicted class index per row;
* output ``predict_proba``: ``[-1, n_classes]`` class probabilities (FP32 or FP64).

The names follow MLServer's scikit-learn runtime so existing clients keep working.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from services.runtime.errors import InvalidInput
from services.runtime.inputs import check_shape, finite
from services.runtime.predictors import ModelInfo

INPUT_NAME = "input-0"
OUTPUT_LABEL = "predict"
OUTPUT_PROBA = "predict_proba"
OUTPUT_NAMES = (OUTPUT_LABEL, OUTPUT_PROBA)

SERVER_NAME = "servery"
SERVER_VERSION = "0.1.0"
EXTENSIONS: list[str] = ["binary_tensor_data"]  # Triton's, used by tritonclient.http

# OIP datatype -> numpy dtype, for the numeric tensors a classifier can take.
NUMERIC_DTYPES: dict[str, np.dtype] = {
    name: np.dtype(dt)
    for name, dt in {
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
ALL_DATATYPES = (*NUMERIC_DTYPES, "BOOL", "BYTES")
_OIP_OF_DTYPE = {dt: name for name, dt in NUMERIC_DTYPES.items()}


def oip_datatype(dtype: np.dtype) -> str:
    """The OIP datatype name of a numpy dtype (FP32 for float32, ...)."""
    return _OIP_OF_DTYPE[np.dtype(dtype)]


def server_metadata() -> dict[str, Any]:
    return {"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": EXTENSIONS}


def model_metadata(info: ModelInfo, versions: Sequence[str] = ()) -> dict[str, Any]:
    """OIP model metadata (``GET /v2/models/{name}``, gRPC ``ModelMetadata``).

    ``versions``: every served version of the model (default: just ``info``'s)."""
    n_classes = len(info.class_names) or -1
    dtype = oip_datatype(info.dtype)
    return {
        "name": info.name,
        "versions": list(versions) or [info.version],
        "platform": info.framework.value,
        "inputs": [{"name": INPUT_NAME, "datatype": dtype, "shape": [-1, info.n_features]}],
        "outputs": [
            {"name": OUTPUT_LABEL, "datatype": "INT64", "shape": [-1]},
            {"name": OUTPUT_PROBA, "datatype": dtype, "shape": [-1, n_classes]},
        ],
    }


@dataclass(frozen=True)
class InputTensor:
    """One decoded request tensor: ``data`` is a flat or nested sequence, or a numpy array."""

    name: str
    datatype: str
    shape: Sequence[int]
    data: Any


@dataclass(frozen=True)
class OutputTensor:
    name: str
    datatype: str
    shape: list[int]
    data: np.ndarray


_NUMBERS = frozenset((float, int))
_WHAT = f"input '{INPUT_NAME}'"


def rows_from_inputs(inputs: Sequence[InputTensor], info: ModelInfo, max_rows: int) -> np.ndarray:
    """Validate the request's input tensors and return a 2-D array in the model's dtype.

    Raises :class:`InvalidInput` (400 on ``/v2``, INVALID_ARGUMENT on gRPC) naming the problem.
    """
    if len(inputs) == 0:
        raise InvalidInput(f"missing input '{INPUT_NAME}' for model '{info.name}'")
    if len(inputs) > 1:
        names = [t.name for t in inputs]
        raise InvalidInput(f"model '{info.name}' takes one input '{INPUT_NAME}', got {names}")
    tensor = inputs[0]
    if tensor.name != INPUT_NAME:
        raise InvalidInput(
            f"unexpected input '{tensor.name}' for model '{info.name}'; expected '{INPUT_NAME}'"
        )
    src = NUMERIC_DTYPES.get(tensor.datatype)
    if src is None:
        allowed = ", ".join(NUMERIC_DTYPES)
        raise InvalidInput(
            f"input '{INPUT_NAME}' has datatype '{tensor.datatype}'; model '{info.name}' takes "
            f"numeric tensors ({allowed})"
        )
    shape = [int(d) for d in tensor.shape]
    # the declared shape first: nothing is converted for a tensor that cannot be served
    check_shape(shape, info.n_features, max_rows, info.name, _WHAT, declared_shape=True)
    data = tensor.data
    out = _flat_numbers(data, src, shape) if src == info.dtype else None
    if out is None:
        out = _converted(data, tensor.datatype, src, shape, info)
    return finite(out, info.dtype, _WHAT)


def _flat_numbers(data: Any, dtype: np.dtype, shape: list[int]) -> np.ndarray | None:
    """The common request, flat JSON numbers for a tensor in the model's dtype, in one
    conversion with no casts to check (a value too large becomes inf, refused by the caller);
    None for anything else (nesting, strings, bools, null), which :func:`_converted` names."""
    if not (
        isinstance(data, list)
        and len(data) == shape[0] * shape[1]
        and set(map(type, data)) <= _NUMBERS
    ):
        return None
    try:
        with np.errstate(over="ignore"):  # the overflow is reported by the caller, as the 400
            return np.array(data, dtype=dtype).reshape(shape)
    except (ValueError, TypeError, OverflowError):
        return None


def _converted(
    data: Any, datatype: str, src: np.dtype, shape: list[int], info: ModelInfo
) -> np.ndarray:
    """``data`` of OIP ``datatype`` (numpy ``src``) checked and cast to the model's dtype."""
    if isinstance(data, np.ndarray):
        arr = data
    else:
        try:
            arr = np.asarray(data)
        except (ValueError, TypeError, OverflowError):
            raise InvalidInput(f"input '{INPUT_NAME}' data is not a regular array") from None
        if arr.dtype.kind not in "iuf" or _holds_bool(data):
            raise InvalidInput(f"input '{INPUT_NAME}' data does not match datatype '{datatype}'")
    if arr.size != shape[0] * shape[1]:
        raise InvalidInput(
            f"input '{INPUT_NAME}' has {arr.size} values but shape {shape} needs "
            f"{shape[0] * shape[1]}"
        )
    if src.kind in "iu" and arr.dtype != src:
        _check_integers(arr, src, datatype)
    with np.errstate(over="ignore", invalid="ignore"):
        typed = arr.astype(src, copy=False) if arr.dtype != src else arr
        return typed.reshape(shape).astype(info.dtype, copy=False)


def _check_integers(arr: np.ndarray, src: np.dtype, datatype: str) -> None:
    """JSON numbers for an integer datatype must be whole and within its range: numpy's cast would
    wrap INT8 1000 to -24 and truncate 1.5 to 1 without a word (gRPC's typed fields refuse them
    on their own)."""
    if arr.dtype.kind == "f" and not np.all(np.mod(arr, 1) == 0):
        raise InvalidInput(
            f"input '{INPUT_NAME}' holds non-integer values for datatype '{datatype}'"
        )
    limits = np.iinfo(src)
    low, high = arr.min(initial=0), arr.max(initial=0)
    if low < limits.min or high > limits.max:
        raise InvalidInput(
            f"input '{INPUT_NAME}' holds values outside the {datatype} range "
            f"[{limits.min}, {limits.max}]"
        )


def _holds_bool(data: Any) -> bool:
    """JSON true/false parse as Python bools, which numpy would silently read as 1/0."""
    if not isinstance(data, list):
        return isinstance(data, bool)
    types = set(map(type, data))  # one C-level pass over a flat list
    if bool in types:
        return True
    return list in types and any(_holds_bool(item) for item in data if type(item) is list)


def requested_outputs(names: Sequence[str] | None) -> tuple[str, ...]:
    """The outputs to return (all when none are requested); unknown names are a 400."""
    if not names:
        return OUTPUT_NAMES
    unknown = [n for n in names if n not in OUTPUT_NAMES]
    if unknown:
        raise InvalidInput(f"unknown output(s) {unknown}; outputs are {list(OUTPUT_NAMES)}")
    return tuple(names)


def output_tensors(
    info: ModelInfo, labels: np.ndarray, proba: np.ndarray, names: Sequence[str]
) -> list[OutputTensor]:
    out = []
    for name in names:
        if name == OUTPUT_LABEL:
            data = labels.astype(np.int64, copy=False)
            out.append(OutputTensor(name, "INT64", [len(data)], data))
        else:
            data = proba.astype(info.dtype, copy=False)
            out.append(OutputTensor(name, oip_datatype(info.dtype), list(data.shape), data))
    return out
