"""The one input rule of a servery model, and the output check.

A model takes rows of its :class:`~models.signature.Signature`'s inputs: at least one row, at most
``SERVERY_MAX_ROWS_PER_REQUEST``; each input's rows of its per-row shape, in its dtype: finite
floats, whole numbers in range for integer inputs, strings for string inputs (and columns). Every
way in checks it here:

* ``POST /predict`` sends JSON: nested lists of rows, records for a tabular model, an object by
  input name for several inputs (:func:`to_batch`, through ``ModelInfo.validate``);
* OIP V2 (REST and gRPC) sends a typed tensor: ``services.protocols.oip.core.rows_from_inputs``
  decodes its datatype and data, and checks the declared shape with :func:`check_shape` before
  converting anything (a shape of 10^9 rows costs nothing) and the values with :func:`finite`;
* a framework service's public ``predict`` checks each row on its own (``CheckedRow`` in
  ``services/frameworks/base.py``) with :func:`check_shape` and :func:`finite`.

What differs is only how each protocol names its input in messages (``what``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from models.signature import DEFAULT_INPUT, Signature, TensorSpec
from services.runtime.errors import InvalidInput, PayloadTooLarge

if TYPE_CHECKING:
    from services.runtime.predictors import ModelInfo

# numpy dtype kinds accepted as numbers: signed/unsigned integers and floats (not bool, str, object)
_NUMERIC_KINDS = frozenset("iuf")


def check_rows(n_rows: int, max_rows: int, what: str) -> None:
    """At least one row and at most ``max_rows`` (before anything is converted)."""
    if n_rows < 1:
        empty = "is empty" if n_rows == 0 else f"has {n_rows} rows"
        raise InvalidInput(f"{what} {empty}: send at least one row", param="inputs")
    if n_rows > max_rows:
        raise PayloadTooLarge(
            f"{n_rows} rows in one request; the limit is {max_rows} (SERVERY_MAX_ROWS_PER_REQUEST)",
            param="inputs",
        )


def check_shape(
    shape: Sequence[int],
    n_features: int | Sequence[int],
    max_rows: int,
    name: str,
    what: str,
    *,
    declared_shape: bool = False,
) -> None:
    """``shape`` is ``[rows, *row_shape]`` with 1 <= rows <= ``max_rows``; ``n_features``: the
    model's values per row (a flat model) or its per-row shape (``-1``: any size);
    ``declared_shape``: the client sent the shape (an OIP tensor's), so a wrong one is quoted as
    sent."""
    if type(n_features) is int:
        if len(shape) == 2 and shape[1] == n_features and 1 <= shape[0] <= max_rows:
            return  # the common request (a flat model's rows), in a few comparisons
        row: tuple[int, ...] = (n_features,)
    else:
        row = tuple(n_features)
        if len(row) == 1 and len(shape) == 2 and shape[1] == row[0] and 1 <= shape[0] <= max_rows:
            return
    wrong = (
        len(shape) != 1 + len(row)
        or any(e >= 0 and g != e for g, e in zip(shape[1:], row, strict=False))
        or shape[0] < 1
    )
    expected = "[n, " + ", ".join(str(d) for d in row) + "]" if row else "[n]"
    if wrong and declared_shape:
        raise InvalidInput(
            f"{what} has shape {list(shape)}; model '{name}' expects {expected} with n >= 1",
            param="inputs",
        )
    if len(row) == 1 and len(shape) != 2:
        hint = " (wrap a single row in another list)" if len(shape) == 1 else ""
        raise InvalidInput(
            f"{what} must be a 2-D list of rows x features, got {len(shape)} dimension(s){hint}",
            param="inputs",
        )
    if len(row) == 1 and row[0] >= 0 and shape[1] != row[0]:
        where = "" if what == "'inputs'" else f"{what}: "
        raise InvalidInput(
            f"{where}model '{name}' expects {row[0]} features per row, got {shape[1]}",
            param="inputs",
        )
    if wrong and shape[0] >= 1:
        raise InvalidInput(
            f"{what} has shape {list(shape)}; model '{name}' expects rows of shape "
            f"{list(row)} ({expected})",
            param="inputs",
        )
    check_rows(shape[0], max_rows, what)


def finite(arr: np.ndarray, dtype: np.dtype, what: str) -> np.ndarray:
    """``arr`` in ``dtype``, refused unless every value is finite there (no NaN/Infinity, nothing
    that overflows the dtype, e.g. 1e39 in float32)."""
    if arr.dtype == dtype:
        out = arr  # already cast (OIP's decoder casts as it converts): no errstate (~1 us)
    else:
        with np.errstate(over="ignore", invalid="ignore"):
            out = arr.astype(dtype)
    ok = np.isfinite(out)
    if not ok.all():
        bad = np.flatnonzero(~ok.reshape(len(out), -1).all(axis=1))
        raise InvalidInput(
            f"{what} must be finite numbers (no NaN/Infinity, within {np.dtype(dtype).name} "
            f"range); bad row(s): {bad[:10].tolist()}",
            param="inputs",
        )
    return out


def to_matrix(
    inputs: Any, n_features: int, dtype: np.dtype, max_rows: int, name: str
) -> np.ndarray:
    """Rows from JSON: ``inputs`` must be a non-empty list of rows of ``n_features`` numbers."""
    spec = TensorSpec(DEFAULT_INPUT, np.dtype(dtype), (n_features,))
    return tensor_from_json(inputs, spec, max_rows, name, "'inputs'")


def tensor_from_json(
    inputs: Any, spec: TensorSpec, max_rows: int, name: str, what: str
) -> np.ndarray:
    """One input's rows from JSON: a list of rows, each nested as the input's per-row shape."""
    if not isinstance(inputs, list):
        raise InvalidInput(f"{what} must be a list of rows, each a list of numbers", param="inputs")
    check_rows(len(inputs), max_rows, what)  # before numpy sees a list of any length
    try:
        arr = np.asarray(inputs, dtype=object if spec.is_string else None)
    except (ValueError, TypeError, OverflowError):
        raise InvalidInput(
            f"{what} rows must all be lists of the same length holding only numbers",
            param="inputs",
        ) from None
    if arr.ndim != 1 + len(spec.shape):
        check_shape(arr.shape, spec.shape, max_rows, name, what)  # names the dimensions
    if spec.is_string:
        check_shape(arr.shape, spec.shape, max_rows, name, what)
        return strings(arr, what)
    if arr.dtype.kind not in _NUMERIC_KINDS:
        kind = {"b": "booleans", "U": "strings", "S": "strings"}.get(
            arr.dtype.kind, "non-numeric or out-of-range values"
        )
        raise InvalidInput(f"{what} must hold only numbers, found {kind}", param="inputs")
    # numpy silently reads JSON true/false as 1/0; a boolean feature value is a client mistake.
    if holds_bool(inputs):
        raise InvalidInput(f"{what} must hold only numbers, found booleans", param="inputs")
    check_shape(arr.shape, spec.shape, max_rows, name, what)
    return typed(arr, spec.dtype, what)


def typed(arr: np.ndarray, dtype: np.dtype, what: str) -> np.ndarray:
    """Numbers in the input's dtype: finite floats, or whole numbers within an integer range."""
    if dtype.kind in "iu":
        if arr.dtype.kind == "f" and not np.all(np.mod(arr, 1) == 0):
            raise InvalidInput(f"{what} holds non-integer values for {dtype.name}", param="inputs")
        limits = np.iinfo(dtype)
        if arr.size and (arr.min() < limits.min or arr.max() > limits.max):
            raise InvalidInput(
                f"{what} holds values outside the {dtype.name} range", param="inputs"
            )
        return arr.astype(dtype)
    if dtype.kind == "b":
        return arr.astype(dtype)
    return finite(arr, dtype, what)


def strings(arr: np.ndarray, what: str) -> np.ndarray:
    """A string input's values: every one a str (bytes are decoded as UTF-8)."""
    flat = arr.reshape(-1)
    out = np.empty(flat.shape, dtype=object)
    for i, v in enumerate(flat):
        if isinstance(v, bytes):
            try:
                v = v.decode()
            except UnicodeDecodeError:
                raise InvalidInput(
                    f"{what} holds bytes that are not UTF-8", param="inputs"
                ) from None
        if not isinstance(v, str):
            raise InvalidInput(
                f"{what} takes strings; value {i} is {type(v).__name__} {v!r:.40}",
                param="inputs",
            )
        out[i] = v
    return out.reshape(arr.shape)


def to_batch(inputs: Any, signature: Signature, max_rows: int, name: str) -> Any:
    """A ``/predict`` body's ``inputs`` as the model's rows: nested lists for a one-input model,
    records (``[{"age": 41, "city": "Oslo"}]``) for a tabular one, and an object of nested
    lists by input name for a model with several inputs."""
    if signature.columnar:
        return records(inputs, signature, max_rows, name)
    single = signature.single
    if single is not None:
        return tensor_from_json(inputs, single, max_rows, name, "'inputs'")
    names = [t.name for t in signature.inputs]
    if not isinstance(inputs, dict):
        raise InvalidInput(
            f"model '{name}' takes {len(names)} inputs {names}: send 'inputs' as an object "
            "of input name -> rows",
            param="inputs",
        )
    check_names(set(inputs), names, name, "inputs")
    batch = {
        t.name: tensor_from_json(inputs[t.name], t, max_rows, name, f"'inputs.{t.name}'")
        for t in signature.inputs
    }
    same_rows(batch, name)
    return batch


def check_names(given: set[str], expected: Sequence[str], name: str, what: str) -> None:
    """``given`` names are exactly ``expected``: else a 4xx naming the missing and the extra."""
    missing = [n for n in expected if n not in given]
    extra = sorted(given - set(expected))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {what} {missing}")
        if extra:
            parts.append(f"unknown {what} {extra}")
        raise InvalidInput(
            f"{'; '.join(parts)}; model '{name}' takes {list(expected)}", param="inputs"
        )


def same_rows(batch: dict[str, np.ndarray], name: str) -> None:
    counts = {k: len(v) for k, v in batch.items()}
    if len(set(counts.values())) > 1:
        raise InvalidInput(
            f"model '{name}' needs as many rows in every input; got {counts}", param="inputs"
        )


def records(inputs: Any, signature: Signature, max_rows: int, name: str) -> dict[str, np.ndarray]:
    """A tabular model's rows from JSON records: one object per row, one key per column."""
    columns = [t.name for t in signature.inputs]
    if not isinstance(inputs, list) or not all(isinstance(r, dict) for r in inputs):
        raise InvalidInput(
            f"model '{name}' takes records: 'inputs' must be a list of objects with the "
            f"columns {columns}",
            param="inputs",
        )
    check_rows(len(inputs), max_rows, "'inputs'")
    wanted = set(columns)
    for i, record in enumerate(inputs):
        if record.keys() != wanted:
            check_names(set(record), columns, name, f"column(s) in record {i}:")
    return {
        t.name: column([r[t.name] for r in inputs], t, f"column '{t.name}'")
        for t in signature.inputs
    }


def column(values: Sequence[Any] | np.ndarray, spec: TensorSpec, what: str) -> np.ndarray:
    """One column's values (a list of JSON scalars, or a decoded tensor) in its dtype."""
    if spec.is_string:
        out = strings(np.asarray(values, dtype=object).reshape(-1), what)
        if spec.closed:
            known = set(spec.categories)
            bad = [i for i, v in enumerate(out) if v not in known]
            if bad:
                shown = ", ".join(map(repr, spec.categories[:20]))
                more = ", ..." if len(spec.categories) > 20 else ""
                raise InvalidInput(
                    f"{what} has {out[bad[0]]!r:.40} (row {bad[0]}), which the model does not "
                    f"know; it takes one of [{shown}{more}]",
                    param="inputs",
                )
        return out
    if isinstance(values, np.ndarray) and values.dtype.kind in _NUMERIC_KINDS:
        return typed(values.reshape(-1), spec.dtype, what)
    for i, v in enumerate(values):
        if type(v) not in (int, float):
            raise InvalidInput(
                f"{what} takes numbers; row {i} has {type(v).__name__} {v!r:.40}", param="inputs"
            )
    try:
        arr = np.asarray(values, dtype=np.float64 if spec.dtype.kind == "f" else None)
    except (ValueError, TypeError, OverflowError):
        raise InvalidInput(f"{what} holds numbers out of range", param="inputs") from None
    return typed(arr, spec.dtype, what)


def holds_bool(data: Any) -> bool:
    """JSON true/false parse as Python bools, which numpy would silently read as 1/0."""
    if not isinstance(data, list):
        return isinstance(data, bool)
    types = set(map(type, data))  # one C-level pass over a flat list
    if bool in types:
        return True
    return list in types and any(holds_bool(item) for item in data if type(item) is list)


def check_outputs(info: ModelInfo, outputs: Mapping[str, np.ndarray]) -> None:
    """Refuse a request whose rows the model scored as NaN/inf (finite inputs so large that the
    model's arithmetic overflows, e.g. iris at 1e308): 422, instead of answering non-finite
    values (JSON cannot carry them; REST answered 500, gRPC sent NaN)."""
    for arr in outputs.values():
        if arr.dtype.kind != "f":
            continue
        ok = np.isfinite(arr)
        if not ok.all():
            bad = np.flatnonzero(~ok.reshape(len(arr), -1).all(axis=1))[:10].tolist()
            raise InvalidInput(
                f"model '{info.name}' cannot score row(s) {bad}: its output is not finite "
                "(feature values too large for the model)",
                param="inputs",
            )
