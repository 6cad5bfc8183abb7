"""Open Inference Protocol (KServe V2) core, shared by the REST and gRPC front ends.

Protocol-neutral: it turns OIP input tensors into the rows a served model takes (checked by the one
input rule, :mod:`services.runtime.inputs`), and builds output tensors and metadata. The front ends
parse and serialise (JSON in ``rest.py``, protobuf in ``grpc.py``), run the inference through
:func:`services.runtime.inference.infer` (the same registry and micro-batchers as ``/predict``, so
REST, gRPC and native requests for one model batch together), and map :class:`ServeryError` status
codes to their protocol (400/404/503 over REST, INVALID_ARGUMENT/NOT_FOUND/UNAVAILABLE over gRPC).

Inputs and outputs come from the model's :class:`~models.signature.Signature`, and the model
metadata says exactly that:

* a one-input model takes its input (``input-0`` unless the model names it, e.g. an ONNX graph)
  as ``[-1, *row_shape]``; any numeric datatype is accepted and converted to the model's;
* a model with several inputs takes one tensor per input name;
* a tabular model (a scikit-learn pipeline fitted on a DataFrame) takes one tensor per column,
  shape ``[-1]`` or ``[-1, 1]``, ``BYTES`` for string columns, as MLServer's pandas codec
  (``parameters.content_type: "pd"``) sends them;
* a classifier answers ``predict`` (``INT64 [-1]``, the class index) and, when it has them,
  ``predict_proba`` (``[-1, n_classes]``); a regressor ``predict`` (its floats); a tensor model its
  own outputs (``output-0`` for a TorchScript model's one output).

The classifier names follow MLServer's scikit-learn runtime so existing clients keep working.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from models.signature import (
    DEFAULT_INPUT,
    OIP_DTYPES,
    OUTPUT_LABEL,
    OUTPUT_PROBA,
    TensorSpec,
    oip_datatype,
)
from services.runtime.errors import InvalidInput
from services.runtime.inputs import (
    check_names,
    check_shape,
    column,
    holds_bool,
    same_rows,
    strings,
    typed,
)
from services.runtime.predictors import ModelInfo

INPUT_NAME = DEFAULT_INPUT
OUTPUT_NAMES = (OUTPUT_LABEL, OUTPUT_PROBA)

SERVER_NAME = "servery"
SERVER_VERSION = "0.1.0"
EXTENSIONS: list[str] = ["binary_tensor_data"]  # Triton's, used by tritonclient.http

# OIP datatype -> numpy dtype, for numeric tensors.
NUMERIC_DTYPES: dict[str, np.dtype] = {k: v for k, v in OIP_DTYPES.items() if k != "BOOL"}
ALL_DATATYPES = (*OIP_DTYPES, "BYTES")
PANDAS = "pd"
"""MLServer's content type for a DataFrame sent as one tensor per column."""


def server_metadata() -> dict[str, Any]:
    return {"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": EXTENSIONS}


def model_metadata(info: ModelInfo, versions: Sequence[str] = ()) -> dict[str, Any]:
    """OIP model metadata (``GET /v2/models/{name}``, gRPC ``ModelMetadata``).

    ``versions``: every served version of the model (default: just ``info``'s)."""
    sig = info.signature
    meta: dict[str, Any] = {
        "name": info.name,
        "versions": list(versions) or [info.version],
        "platform": info.framework.value,
        "inputs": [_tensor_metadata(t, sig.columnar) for t in sig.inputs],
        "outputs": [
            {
                "name": t.name,
                "datatype": oip_datatype(info.output_dtypes.get(t.name, t.dtype)),
                "shape": t.oip_shape(),
            }
            for t in sig.outputs
        ],
    }
    if sig.columnar:
        meta["parameters"] = {"content_type": PANDAS}
    return meta


def _tensor_metadata(spec: TensorSpec, columnar: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"name": spec.name, "datatype": spec.datatype, "shape": spec.oip_shape()}
    if columnar:
        out["parameters"] = {"content_type": "str" if spec.is_string else "np"}
    return out


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


def rows_from_inputs(inputs: Sequence[InputTensor], info: ModelInfo, max_rows: int) -> Any:
    """Validate the request's input tensors and return the model's rows: an array in the
    model's dtype (one input), or a dict of arrays by input (or column) name.

    Raises :class:`InvalidInput` (400 on ``/v2``, INVALID_ARGUMENT on gRPC) naming the problem.
    """
    sig = info.signature
    single = sig.single
    if single is not None:
        return _single(inputs, single, info, max_rows)
    names = [t.name for t in sig.inputs]
    given = {t.name: t for t in inputs}
    if len(given) != len(inputs):
        raise InvalidInput(f"input names repeat: {[t.name for t in inputs]}")
    check_names(set(given), names, info.name, "input(s)")
    batch = {}
    for spec in sig.inputs:
        tensor = given[spec.name]
        what = f"input '{spec.name}'"
        shape = [int(d) for d in tensor.shape]
        if sig.columnar:
            # a column: [n] or [n, 1], as MLServer's pandas codec sends it
            if len(shape) == 2 and shape[1] == 1:
                shape = shape[:1]
            check_shape(shape, (), max_rows, info.name, what, declared_shape=True)
            batch[spec.name] = column(_values(tensor, spec, shape, what), spec, what)
        else:
            check_shape(shape, spec.shape, max_rows, info.name, what, declared_shape=True)
            batch[spec.name] = _tensor(tensor, spec, shape, what)
    same_rows(batch, info.name)
    return batch


def _single(
    inputs: Sequence[InputTensor], spec: TensorSpec, info: ModelInfo, max_rows: int
) -> np.ndarray:
    name = spec.name
    if len(inputs) == 0:
        raise InvalidInput(f"missing input '{name}' for model '{info.name}'")
    if len(inputs) > 1:
        names = [t.name for t in inputs]
        raise InvalidInput(f"model '{info.name}' takes one input '{name}', got {names}")
    tensor = inputs[0]
    if tensor.name != name:
        raise InvalidInput(
            f"unexpected input '{tensor.name}' for model '{info.name}'; expected '{name}'"
        )
    what = f"input '{name}'"
    shape = [int(d) for d in tensor.shape]
    # the declared shape first: nothing is converted for a tensor that cannot be served
    if spec.is_string:
        check_shape(shape, spec.shape, max_rows, info.name, what, declared_shape=True)
        return _tensor(tensor, spec, shape, what)
    src = NUMERIC_DTYPES.get(tensor.datatype)
    if src is None:
        allowed = ", ".join(NUMERIC_DTYPES)
        raise InvalidInput(
            f"input '{name}' has datatype '{tensor.datatype}'; model '{info.name}' takes "
            f"numeric tensors ({allowed})"
        )
    check_shape(shape, spec.shape, max_rows, info.name, what, declared_shape=True)
    data = tensor.data
    out = (
        _flat_numbers(data, src, shape)
        if src == spec.dtype and spec.dtype.kind == "f" and len(shape) == 2
        else None
    )
    if out is None:
        out = _converted(data, tensor.datatype, src, shape, spec.dtype, what)
    return typed(out, spec.dtype, what)


def _values(tensor: InputTensor, spec: TensorSpec, shape: list[int], what: str) -> Any:
    """A tensor's values, flat, for a column of ``spec`` (strings or numbers)."""
    if spec.is_string:
        values = _string_values(tensor, what, "is a string column")
    else:
        src = NUMERIC_DTYPES.get(tensor.datatype)
        if src is None:
            raise InvalidInput(
                f"{what} is a numeric column: send a numeric datatype, not {tensor.datatype}"
            )
        values = _converted(tensor.data, tensor.datatype, src, shape, spec.dtype, what)
    if len(values) != shape[0]:
        raise InvalidInput(f"{what} has {len(values)} values but shape {shape} needs {shape[0]}")
    return values


def _tensor(tensor: InputTensor, spec: TensorSpec, shape: list[int], what: str) -> np.ndarray:
    """One named input of a multi-input model, in its dtype."""
    size = int(np.prod(shape))
    if spec.is_string:
        values = _string_values(tensor, what, "takes strings")
        if len(values) != size:
            raise InvalidInput(f"{what} has {len(values)} values but shape {shape} needs {size}")
        return strings(np.asarray(values, dtype=object), what).reshape(shape)
    src = NUMERIC_DTYPES.get(tensor.datatype)
    if src is None:
        raise InvalidInput(f"{what} has datatype '{tensor.datatype}'; it takes numbers")
    out = _converted(tensor.data, tensor.datatype, src, shape, spec.dtype, what)
    return typed(out, spec.dtype, what)


def _string_values(tensor: InputTensor, what: str, wants: str) -> Any:
    """A BYTES tensor's values, flat (JSON strings, or the binary forms' bytes)."""
    if tensor.datatype != "BYTES":
        raise InvalidInput(f"{what} {wants}: send datatype BYTES, not {tensor.datatype}")
    data = tensor.data
    return data.reshape(-1) if isinstance(data, np.ndarray) else _flatten(data)


def _flatten(data: Any) -> list[Any]:
    if not isinstance(data, list):
        return [data]
    if not any(type(v) is list for v in data):
        return data
    return [v for item in data for v in _flatten(item)]


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
    data: Any, datatype: str, src: np.dtype, shape: list[int], dtype: np.dtype, what: str
) -> np.ndarray:
    """``data`` of OIP ``datatype`` (numpy ``src``) checked and cast to the model's ``dtype``."""
    if isinstance(data, np.ndarray):
        arr = data
    else:
        try:
            arr = np.asarray(data)
        except (ValueError, TypeError, OverflowError):
            raise InvalidInput(f"{what} data is not a regular array") from None
        if arr.dtype.kind not in "iuf" or holds_bool(data):
            raise InvalidInput(f"{what} data does not match datatype '{datatype}'")
    size = int(np.prod(shape))
    if arr.size != size:
        raise InvalidInput(f"{what} has {arr.size} values but shape {shape} needs {size}")
    if src.kind in "iu" and arr.dtype != src:
        _check_integers(arr, src, datatype, what)
    with np.errstate(over="ignore", invalid="ignore"):
        typed_ = arr.astype(src, copy=False) if arr.dtype != src else arr
        if dtype.kind in "iu" and src.kind == "f":
            return typed_.reshape(shape)  # checked as whole numbers by typed()
        return typed_.reshape(shape).astype(dtype, copy=False)


def _check_integers(arr: np.ndarray, src: np.dtype, datatype: str, what: str) -> None:
    """JSON numbers for an integer datatype must be whole and within its range: numpy's cast would
    wrap INT8 1000 to -24 and truncate 1.5 to 1 without a word (gRPC's typed fields refuse them
    on their own)."""
    if arr.dtype.kind == "f" and not np.all(np.mod(arr, 1) == 0):
        raise InvalidInput(f"{what} holds non-integer values for datatype '{datatype}'")
    limits = np.iinfo(src)
    low, high = arr.min(initial=0), arr.max(initial=0)
    if low < limits.min or high > limits.max:
        raise InvalidInput(
            f"{what} holds values outside the {datatype} range [{limits.min}, {limits.max}]"
        )


def bytes_elements(raw: memoryview | bytes, what: str) -> np.ndarray:
    """A BYTES tensor's binary form (Triton's, also in gRPC ``raw_input_contents``): each element
    a 4-byte little-endian length, then that many bytes."""
    out: list[bytes] = []
    view = memoryview(raw)
    i = 0
    while i < len(view):
        if i + 4 > len(view):
            raise InvalidInput(f"{what}: BYTES data ends inside an element's 4-byte length")
        n = int.from_bytes(view[i : i + 4], "little")
        i += 4
        if i + n > len(view):
            raise InvalidInput(f"{what}: a BYTES element of {n} bytes runs past the data")
        out.append(bytes(view[i : i + n]))
        i += n
    arr = np.empty(len(out), dtype=object)
    arr[:] = out
    return arr


def requested_outputs(names: Sequence[str] | None, info: ModelInfo) -> tuple[str, ...]:
    """The outputs to return (all when none are requested); unknown names are a 400."""
    have = info.signature.output_names
    if not names:
        return have
    unknown = [n for n in names if n not in have]
    if unknown:
        raise InvalidInput(f"unknown output(s) {unknown}; outputs are {list(have)}")
    return tuple(names)


def output_tensors(
    info: ModelInfo, outputs: Mapping[str, np.ndarray], names: Sequence[str]
) -> list[OutputTensor]:
    wire = info.output_dtypes
    out = []
    for name in names:
        data = outputs[name]
        dtype = wire.get(name, data.dtype)
        if data.dtype != dtype:
            data = data.astype(dtype)
        out.append(OutputTensor(name, oip_datatype(dtype), list(data.shape), data))
    return out
