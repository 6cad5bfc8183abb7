"""scikit-learn estimators and pipelines: ``bentoml.sklearn`` and servery's format."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from models.config import Framework, ModelEntry
from models.formats.common import Batch, Format, Loaded, Outputs, class_names, declared_inputs
from models.signature import (
    DEFAULT_INPUT,
    OUTPUT_LABEL,
    OUTPUT_PROBA,
    STRING,
    Signature,
    Task,
    TensorSpec,
)
from models.store import StoreError

if TYPE_CHECKING:
    import bentoml


def sklearn_object(bento_model: bentoml.Model, fmt: Format) -> Any:
    if fmt is Format.SKLEARN:
        import bentoml

        return bentoml.sklearn.load_model(bento_model)
    from models.store import load_object

    return load_object(bento_model, Framework.SKLEARN)


def _string_columns(estimator: Any) -> dict[str, tuple[tuple[str, ...], bool]]:
    """Columns a fitted estimator encodes as categories of strings (its encoders' inputs), with
    the categories and whether the encoder refuses others (``handle_unknown="error"``, the
    default): found through every ColumnTransformer and Pipeline inside it."""
    from sklearn.compose import ColumnTransformer
    from sklearn.pipeline import Pipeline

    found: dict[str, tuple[tuple[str, ...], bool]] = {}

    def walk(est: Any, columns: Any) -> None:
        if isinstance(est, Pipeline):
            # The columns reach each step until one encodes them (an imputer, then an encoder)
            for _, step in est.steps:
                if isinstance(step, ColumnTransformer):
                    walk(step, None)
                elif columns:
                    walk(step, columns)
                    if getattr(step, "categories_", None) is not None:
                        columns = None
            return
        if isinstance(est, ColumnTransformer):
            for _, trans, cols in getattr(est, "transformers_", ()):
                if isinstance(cols, str):
                    cols = [cols]
                if trans in ("drop", "passthrough") or not isinstance(cols, list | tuple):
                    continue
                names = [c for c in cols if isinstance(c, str)]
                walk(trans, names)
            return
        cats = getattr(est, "categories_", None)
        if cats is not None and columns:
            closed = getattr(est, "handle_unknown", "error") == "error"
            for col, values in zip(columns, cats, strict=False):
                values = np.asarray(values)
                if values.dtype.kind in "OUS":
                    found[col] = (tuple(str(v) for v in values if isinstance(v, str)), closed)

    walk(estimator, None)
    return found


def load_sklearn(
    est: Any, fmt: Format, meta: Mapping[str, Any], entry: ModelEntry | None, threads: int
) -> Loaded:
    import sklearn
    from sklearn.base import is_classifier, is_regressor

    if hasattr(est, "n_jobs"):
        est.n_jobs = threads
    declared = declared_inputs(entry, meta)
    columns = getattr(est, "feature_names_in_", None)
    feature_names: tuple[str, ...]
    if columns is not None and not declared:
        # Fitted on a DataFrame: it takes one (named, possibly string, columns).
        strings = _string_columns(est)
        feature_names = tuple(str(c) for c in columns)
        inputs = tuple(
            TensorSpec(c, STRING, (), *strings[c])
            if c in strings
            else TensorSpec(c, np.dtype("float64"), ())
            for c in feature_names
        )
        columnar = True
    elif declared:
        inputs, columnar = (
            declared,
            bool(len(declared) > 1 and all(t.shape == () for t in declared)),
        )
        feature_names = tuple(t.name for t in declared) if columnar else ()
    else:
        n = getattr(est, "n_features_in_", None)
        schema = meta.get("input_schema") or {}
        n = int(schema.get("n_features") or n or 0)
        if n <= 0:
            raise StoreError(
                "the estimator does not record its number of features (n_features_in_): "
                "declare it in the model config, e.g. inputs: [{shape: [4]}]"
            )
        dtype = np.dtype(schema.get("dtype", "float32" if fmt is Format.SERVERY else "float64"))
        inputs, columnar = (TensorSpec(DEFAULT_INPUT, dtype, (n,)),), False
        feature_names = tuple(str(f) for f in meta.get("feature_names") or ())

    def frame(batch: Batch) -> Any:
        if not columnar:
            return batch
        import pandas as pd

        return pd.DataFrame(
            {name: batch[name] for name in feature_names}, columns=list(feature_names)
        )

    # Rows reaching a runtime are already checked (finite numbers of the right shape), so
    # sklearn's own finiteness scan and parameter validation are skipped: about 20 % of a one-row
    # LogisticRegression call (112 -> 90 us here).
    def fast() -> Any:  # a new context each call: config_context is a one-shot generator
        return sklearn.config_context(assume_finite=True, skip_parameter_validation=True)

    if is_classifier(est) or fmt is Format.SERVERY:
        classes = getattr(est, "classes_", None)
        names = class_names(entry, meta, classes if classes is not None else ())
        sig = Signature(inputs, (), Task.CLASSIFICATION, columnar, names)
        if hasattr(est, "predict_proba"):
            predict_proba = est.predict_proba

            def classify(batch: Batch) -> Outputs:
                with fast():
                    proba = predict_proba(frame(batch))
                return {OUTPUT_LABEL: proba.argmax(axis=1), OUTPUT_PROBA: proba}

            return Loaded(fmt, Framework.SKLEARN, sig, classify, feature_names)
        if classes is None:
            raise StoreError("the classifier has neither predict_proba nor classes_")
        classes = np.asarray(classes)
        order = np.argsort(classes, kind="stable")
        sorted_classes = classes[order]

        def label(batch: Batch) -> Outputs:
            with fast():
                pred = np.asarray(est.predict(frame(batch)))
            # class value -> its index in classes_ (the label names' order)
            return {OUTPUT_LABEL: order[np.searchsorted(sorted_classes, pred)]}

        return Loaded(fmt, Framework.SKLEARN, sig, label, feature_names)

    task = Task.REGRESSION if is_regressor(est) else Task.TENSOR
    sig = Signature(inputs, (), task, columnar, ())

    def regress(batch: Batch) -> Outputs:
        with fast():
            return {OUTPUT_LABEL: np.asarray(est.predict(frame(batch)))}

    return Loaded(fmt, Framework.SKLEARN, sig, regress, feature_names)
