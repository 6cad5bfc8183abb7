"""The one input rule of a servery model, and the score check.

A model takes rows x features: at least one row, at most ``SERVERY_MAX_ROWS_PER_REQUEST``, each of
the model's ``n_features`` finite numbers in its dtype. Every way in checks it here:

* ``POST /predict`` sends JSON lists of rows: :func:`to_matrix` (through ``ModelInfo.validate``);
* OIP V2 (REST and gRPC) sends a typed tensor: ``services.protocols.oip.core.rows_from_inputs``
  decodes its datatype and data, and checks the declared shape with :func:`check_shape` before
  converting anything (a shape of 10^9 rows costs nothing) and the values with :func:`finite`;
* a framework service's public ``predict`` checks each row on its own (``CheckedRow`` in
  ``services/frameworks/base.py``) with :func:`check_shape` and :func:`finite`.

What differs is only how each protocol names its input in messages (``what``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

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
    n_features: int,
    max_rows: int,
    name: str,
    what: str,
    *,
    declared_shape: bool = False,
) -> None:
    """``shape`` is ``[rows, n_features]`` with 1 <= rows <= ``max_rows``; ``declared_shape``:
    the client sent the shape (an OIP tensor's), so a wrong one is quoted as sent."""
    wrong = len(shape) != 2 or shape[1] != n_features or shape[0] < 1
    if wrong and declared_shape:
        raise InvalidInput(
            f"{what} has shape {list(shape)}; model '{name}' expects [n, {n_features}] with n >= 1",
            param="inputs",
        )
    if len(shape) != 2:
        hint = " (wrap a single row in another list)" if len(shape) == 1 else ""
        raise InvalidInput(
            f"{what} must be a 2-D list of rows x features, got {len(shape)} dimension(s){hint}",
            param="inputs",
        )
    if shape[1] != n_features:
        raise InvalidInput(
            f"model '{name}' expects {n_features} features per row, got {shape[1]}",
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
    what = "'inputs'"
    if not isinstance(inputs, list):
        raise InvalidInput(
            "'inputs' must be a list of rows, each a list of numbers", param="inputs"
        )
    check_rows(len(inputs), max_rows, what)  # before numpy sees a list of any length
    try:
        arr = np.asarray(inputs)
    except (ValueError, TypeError, OverflowError):
        raise InvalidInput(
            "'inputs' rows must all be lists of the same length holding only numbers",
            param="inputs",
        ) from None
    if arr.ndim != 2:
        check_shape(arr.shape, n_features, max_rows, name, what)  # names the dimensions
    if arr.dtype.kind not in _NUMERIC_KINDS:
        kind = {"b": "booleans", "U": "strings", "S": "strings"}.get(
            arr.dtype.kind, "non-numeric or out-of-range values"
        )
        raise InvalidInput(f"'inputs' must hold only numbers, found {kind}", param="inputs")
    # numpy silently reads JSON true/false as 1/0; a boolean feature value is a client mistake.
    if any(bool in set(map(type, row)) for row in inputs):
        raise InvalidInput("'inputs' must hold only numbers, found booleans", param="inputs")
    check_shape(arr.shape, n_features, max_rows, name, what)
    return finite(arr, dtype, what)


def check_scores(info: ModelInfo, proba: np.ndarray) -> None:
    """Refuse a request whose rows the model scored as NaN/inf (finite inputs so large that the
    model's arithmetic overflows, e.g. iris at 1e308): 422, instead of answering non-finite
    probabilities (JSON cannot carry them; REST answered 500, gRPC sent NaN)."""
    finite = np.isfinite(proba)
    if not finite.all():
        bad = np.flatnonzero(~finite.reshape(len(proba), -1).all(axis=1))[:10].tolist()
        raise InvalidInput(
            f"model '{info.name}' cannot score row(s) {bad}: its output is not finite "
            "(feature values too large for the model)",
            param="inputs",
        )
