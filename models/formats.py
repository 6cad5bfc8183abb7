"""Load any stored model into a batch ``predict`` with its :class:`~models.signature.Signature`.

A model in the BentoML store was saved either with servery's own format (:mod:`models.store`,
label ``servery``) or with one of BentoML's framework APIs, which record their module in the
model's info (``bentoml models get NAME`` shows it):

==================  ===============================  =========================================
``info.module``     saved by                         loaded here with
==================  ===============================  =========================================
bentoml.sklearn     ``bentoml.sklearn.save_model``   ``bentoml.sklearn.load_model`` (joblib)
bentoml.xgboost     ``bentoml.xgboost.save_model``   ``bentoml.xgboost.load_model``
bentoml.torchscript ``bentoml.torchscript.save_...`` ``torch.jit.load`` on its file: BentoML's
                                                     loader is deprecated and moves the module
                                                     to a device of its choosing
bentoml.pytorch     ``bentoml.pytorch.save_model``   ``torch.load(weights_only=False)`` on its
                                                     file: BentoML's loader breaks on torch >=
                                                     2.6 (weights-only unpickling by default)
bentoml.onnx        ``bentoml.onnx.save_model``,     ``onnxruntime.InferenceSession`` on its
                    ``servery models compile``       file: BentoML's loader needs the ``onnx``
                                                     package and sets no thread counts
==================  ===============================  =========================================

:func:`load` returns a :class:`Loaded`: the framework (which service may host it), the signature
(inputs from the model, else from the model config's ``inputs:``; outputs from one warm-up call)
and ``predict``, which takes a batch (an array ``[N, *shape]``, or a dict of them by input name)
and returns the named outputs, each with N rows. One call proves a model servable:
``models.check`` runs it before ``make serve``, the router and the framework services at load.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import numpy as np

from models.config import Framework, ModelEntry, Postprocess
from models.signature import (
    DEFAULT_INPUT,
    OUTPUT_LABEL,
    OUTPUT_PROBA,
    STRING,
    Signature,
    Task,
    TensorSpec,
    dtype_of,
)
from models.store import StoreError

if TYPE_CHECKING:
    import bentoml

Batch = Any
"""An array ``[N, *shape]`` (one input), or a dict of such arrays by input name."""
Outputs = dict[str, np.ndarray]
Predict = Callable[[Batch], Outputs]


class Format(StrEnum):
    SERVERY = "servery"
    SKLEARN = "bentoml.sklearn"
    XGBOOST = "bentoml.xgboost"
    PYTORCH = "bentoml.pytorch"
    TORCHSCRIPT = "bentoml.torchscript"
    ONNX = "bentoml.onnx"


FRAMEWORK_OF_FORMAT: dict[Format, Framework] = {
    Format.SKLEARN: Framework.SKLEARN,
    Format.XGBOOST: Framework.XGBOOST,
    Format.PYTORCH: Framework.PYTORCH,
    Format.TORCHSCRIPT: Framework.PYTORCH,
    Format.ONNX: Framework.ONNX,
}

FILES: dict[Format, str] = {
    Format.SKLEARN: "saved_model.pkl",
    Format.XGBOOST: "saved_model.ubj",
    Format.PYTORCH: "saved_model.pt",
    Format.TORCHSCRIPT: "saved_model.pt",
    Format.ONNX: "saved_model.onnx",
}


def format_of(bento_model: bentoml.Model) -> Format:
    """How ``bento_model`` was saved: its BentoML module, else servery's format."""
    module = bento_model.info.module or ""
    if module.startswith("_bentoml_impl.frameworks."):  # BentoML's own name for two of them
        module = "bentoml." + module.rsplit(".", 1)[1]
    if module and module != Format.SERVERY:
        try:
            return Format(module)
        except ValueError:
            served = ", ".join(f.value for f in FRAMEWORK_OF_FORMAT)
            raise StoreError(
                f"model {bento_model.tag} was saved with {module}, which servery does not serve; "
                f"servery serves models saved with {served} or models.store.save_model"
            ) from None
    return Format.SERVERY


def framework_of(bento_model: bentoml.Model, override: Framework | None = None) -> Framework:
    """The model's framework: ``override`` if given, else its BentoML module's, else its
    ``framework`` label (servery's format)."""
    if override is not None:
        return override
    fmt = format_of(bento_model)
    if fmt is not Format.SERVERY:
        return FRAMEWORK_OF_FORMAT[fmt]
    label = bento_model.info.labels.get("framework") or bento_model.info.metadata.get("framework")
    try:
        framework = Framework(label)
    except ValueError:
        framework = None
    if framework is None or framework is Framework.ONNX:
        raise StoreError(
            f"model {bento_model.tag} has no BentoML framework module and no known 'framework' "
            f"label ({label!r}); save it with bentoml.sklearn / bentoml.xgboost / "
            "bentoml.torchscript / bentoml.onnx save_model, or models.store.save_model"
        )
    return framework


@dataclass(frozen=True)
class Loaded:
    """A model ready to call."""

    format: Format
    framework: Framework
    signature: Signature
    predict: Predict
    feature_names: tuple[str, ...] = ()


def load(bento_model: bentoml.Model, entry: ModelEntry | None = None, threads: int = 1) -> Loaded:
    """Load ``bento_model`` (hints and overrides from its config ``entry``) and warm it up with
    one row. Raises :class:`StoreError` naming why it cannot be served."""
    fmt = format_of(bento_model)
    framework = framework_of(bento_model, entry.framework if entry else None)
    expected = FRAMEWORK_OF_FORMAT.get(fmt)
    if expected is not None and framework is not expected:
        raise StoreError(
            f"model {bento_model.tag} was saved with {fmt.value}; the config says framework "
            f"'{framework}' (remove 'framework' from its entry)"
        )
    meta = dict(bento_model.info.metadata)
    try:
        if framework is Framework.SKLEARN:
            loaded = _sklearn(_sklearn_object(bento_model, fmt), fmt, meta, entry, threads)
        elif framework is Framework.XGBOOST:
            loaded = _xgboost(_xgboost_object(bento_model, fmt), fmt, meta, entry, threads)
        elif framework is Framework.PYTORCH:
            loaded = _torch(bento_model, fmt, meta, entry, threads)
        else:
            loaded = _onnx(bento_model, fmt, meta, entry, threads)
    except StoreError:
        raise
    except (OSError, KeyError, ValueError, TypeError, ImportError, RuntimeError) as e:
        raise StoreError(
            f"model {bento_model.tag} ({fmt.value}, {framework}) cannot be loaded: "
            f"{type(e).__name__}: {e}"
        ) from e
    return _warmed_up(bento_model, loaded)


def _warmed_up(bento_model: bentoml.Model, loaded: Loaded) -> Loaded:
    """Call the model once (first calls allocate), and read its outputs' dtypes and shapes."""
    sig = loaded.signature
    try:
        out = loaded.predict(sig.example(2))
    except Exception as e:
        raise StoreError(
            f"model {bento_model.tag} fails on a batch of 2 rows of its inputs "
            f"{[t.describe() for t in sig.inputs]}: {type(e).__name__}: {e}"
            + (" (declare the right shape in the model config: inputs:)" if sig.inputs else "")
        ) from e
    specs = []
    for name, arr in out.items():
        arr = np.asarray(arr)
        if arr.ndim == 0 or arr.shape[0] != 2:
            raise StoreError(
                f"model {bento_model.tag} answered output '{name}' with shape {list(arr.shape)} "
                "for 2 rows; servery batches rows on the first dimension"
            )
        specs.append(TensorSpec(name, arr.dtype, tuple(arr.shape[1:])))
    return Loaded(
        loaded.format,
        loaded.framework,
        sig.with_outputs(specs),
        loaded.predict,
        loaded.feature_names,
    )


# --- declared inputs --------------------------------------------------------------------------


def declared_inputs(entry: ModelEntry | None, meta: Mapping[str, Any]) -> tuple[TensorSpec, ...]:
    """Inputs the model config (``inputs:``) or the model's metadata (``inputs``) declares."""
    decls: Any = None
    if entry is not None and entry.inputs:
        decls = [d.model_dump() for d in entry.inputs]
    elif isinstance(meta.get("inputs"), list):
        decls = meta["inputs"]
    if not decls:
        return ()
    specs = []
    for i, d in enumerate(decls):
        try:
            name = str(d.get("name") or (DEFAULT_INPUT if len(decls) == 1 else f"input-{i}"))
            dtype = dtype_of(str(d.get("datatype", "FP32")))
            shape = tuple(int(s) for s in d.get("shape", ()))
        except (AttributeError, TypeError, ValueError) as e:
            raise StoreError(f"declared input {d!r} is not valid: {e}") from None
        specs.append(TensorSpec(name, dtype, shape))
    return tuple(specs)


def _class_names(entry: ModelEntry | None, meta: Mapping[str, Any], found: Any = ()) -> tuple:
    if entry is not None and entry.class_names:
        return tuple(entry.class_names)
    if meta.get("class_names"):
        return tuple(str(c) for c in meta["class_names"])
    return tuple(str(c) for c in found)


def _postprocessed(
    predict: Predict, signature: Signature, entry: ModelEntry | None, meta: Mapping[str, Any]
) -> tuple[Predict, Signature]:
    """A raw-tensor model with ``postprocess: softmax | argmax`` in its config becomes a
    classifier of its first output (the logits)."""
    how = (entry.postprocess if entry else None) or Postprocess.NONE
    if how is Postprocess.NONE:
        return predict, signature
    names = _class_names(entry, meta)
    sig = Signature(signature.inputs, (), Task.CLASSIFICATION, signature.columnar, names)

    if how is Postprocess.SOFTMAX:

        def softmax(batch: Batch) -> Outputs:
            logits = np.asarray(next(iter(predict(batch).values())))
            logits = logits.reshape(len(logits), -1)
            z = np.exp(logits - logits.max(axis=1, keepdims=True))
            proba = z / z.sum(axis=1, keepdims=True)
            return {OUTPUT_LABEL: proba.argmax(axis=1), OUTPUT_PROBA: proba}

        return softmax, sig

    def argmax(batch: Batch) -> Outputs:
        scores = np.asarray(next(iter(predict(batch).values())))
        return {OUTPUT_LABEL: scores.reshape(len(scores), -1).argmax(axis=1)}

    return argmax, sig


# --- scikit-learn -----------------------------------------------------------------------------


def _sklearn_object(bento_model: bentoml.Model, fmt: Format) -> Any:
    if fmt is Format.SKLEARN:
        import bentoml

        return bentoml.sklearn.load_model(bento_model)
    from models.store import load_object

    return load_object(bento_model, Framework.SKLEARN)


def _string_columns(estimator: Any) -> dict[str, tuple[str, ...]]:
    """Columns a fitted estimator encodes as categories of strings (its encoders' inputs), with
    the categories: found through every ColumnTransformer and Pipeline inside it."""
    from sklearn.compose import ColumnTransformer
    from sklearn.pipeline import Pipeline

    found: dict[str, tuple[str, ...]] = {}

    def walk(est: Any, columns: Any) -> None:
        if isinstance(est, Pipeline):
            if est.steps:
                walk(est.steps[0][1], columns)
            for _, step in est.steps[1:]:
                if isinstance(step, ColumnTransformer):
                    walk(step, None)
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
            for col, values in zip(columns, cats, strict=False):
                values = np.asarray(values)
                if values.dtype.kind in "OUS":
                    found[col] = tuple(str(v) for v in values if isinstance(v, str))

    walk(estimator, None)
    return found


def _sklearn(
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
            TensorSpec(c, STRING, (), strings[c])
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
        names = _class_names(entry, meta, classes if classes is not None else ())
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


# --- XGBoost ----------------------------------------------------------------------------------


def _xgboost_object(bento_model: bentoml.Model, fmt: Format) -> Any:
    if fmt is Format.XGBOOST:
        import bentoml

        from models import xgboost_dist

        xgboost_dist.install()
        return bentoml.xgboost.load_model(bento_model)
    from models.store import load_object

    return load_object(bento_model, Framework.XGBOOST)


_XGB_PROBA = ("binary:logistic", "multi:softprob")
_XGB_LABEL = ("multi:softmax", "binary:hinge")


def _xgboost(
    model: Any, fmt: Format, meta: Mapping[str, Any], entry: ModelEntry | None, threads: int
) -> Loaded:
    booster = model.get_booster() if hasattr(model, "get_booster") else model
    booster.set_param({"nthread": threads})
    config = json.loads(booster.save_config())["learner"]
    objective = config["objective"]["name"]
    n = booster.num_features()
    feature_names = tuple(booster.feature_names or meta.get("feature_names") or ())
    inputs = declared_inputs(entry, meta) or (TensorSpec(DEFAULT_INPUT, np.dtype("float32"), (n,)),)
    if len(inputs) != 1 or len(inputs[0].shape) != 1:
        raise StoreError("an XGBoost model takes one input of shape [n_features]")
    dense = _xgboost_dense_predict(booster)
    classes = getattr(model, "classes_", None)
    if objective in _XGB_PROBA:
        names = _class_names(entry, meta, classes if classes is not None else ())
        sig = Signature(inputs, (), Task.CLASSIFICATION, False, names)

        def classify(batch: Batch) -> Outputs:
            out = dense(batch)
            proba = np.stack([1.0 - out, out], axis=1) if out.ndim == 1 else out
            return {OUTPUT_LABEL: proba.argmax(axis=1), OUTPUT_PROBA: proba}

        return Loaded(fmt, Framework.XGBOOST, sig, classify, feature_names)
    if objective in _XGB_LABEL:
        names = _class_names(entry, meta, classes if classes is not None else ())
        sig = Signature(inputs, (), Task.CLASSIFICATION, False, names)
        return Loaded(
            fmt,
            Framework.XGBOOST,
            sig,
            lambda batch: {OUTPUT_LABEL: dense(batch).astype(np.int64)},
            feature_names,
        )
    sig = Signature(inputs, (), Task.REGRESSION, False, ())
    return Loaded(
        fmt, Framework.XGBOOST, sig, lambda batch: {OUTPUT_LABEL: dense(batch)}, feature_names
    )


def _xgboost_dense_predict(booster: Any) -> Callable[[np.ndarray], np.ndarray]:
    """``booster.inplace_predict(x)`` for a 2-D numpy array, through the C function it calls.

    ``inplace_predict`` (no DMatrix) is XGBoost's cheapest call for small batches, but its Python
    side (input-type dispatch over pandas/arrow/polars/cupy, JSON arguments built per call,
    feature validation, a ctypes class made per call for the output) was about half of a call
    in the router: 382 -> 191 us for one row and 464 -> 383 us for 32 rows of the 300-tree
    breast_cancer_large model. This makes the same ``XGBoosterPredictFromDense`` call (XGBoost's
    public C API) with the arguments prepared once; the result is identical. Falls back to
    ``inplace_predict`` when the private helpers it reuses move in another XGBoost release.
    """
    import ctypes

    try:
        from xgboost.core import _LIB, _check_call, c_bst_ulong, make_jcargs
    except ImportError:
        return booster.inplace_predict  # type: ignore[no-any-return]
    config = make_jcargs(
        type=0,  # probabilities, not margins
        training=False,
        iteration_begin=0,
        iteration_end=0,
        missing=float("nan"),
        strict_shape=False,
        cache_id=0,
    )
    n_features = booster.num_features()
    no_proxy = ctypes.c_void_p()
    c_float_p = ctypes.POINTER(ctypes.c_float)
    shape_p = ctypes.POINTER(c_bst_ulong)

    def predict(x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)  # XGBoost compares features as float32
        if not x.flags.aligned:  # e.g. unpickled from a byte offset; XGBoost refuses those
            x = x.copy()
        if x.ndim != 2 or x.shape[1] != n_features:
            raise ValueError(f"Feature shape mismatch, expected: {n_features}, got {x.shape}")
        iface = b'{"data":[%d,true],"shape":[%d,%d],"strides":null,"typestr":"<f4","version":3}' % (
            x.ctypes.data,
            x.shape[0],
            x.shape[1],
        )
        shape, dims, preds = shape_p(), c_bst_ulong(), c_float_p()
        _check_call(
            _LIB.XGBoosterPredictFromDense(
                booster.handle,  # through the booster: the closure keeps it (and its handle) alive
                iface,
                config,
                no_proxy,
                ctypes.byref(shape),
                ctypes.byref(dims),
                ctypes.byref(preds),
            )
        )
        out = np.empty([shape[i] for i in range(dims.value)], dtype=np.float32)
        ctypes.memmove(out.ctypes.data, preds, out.nbytes)  # XGBoost reuses its buffer: copy
        return out

    return predict


# --- PyTorch ----------------------------------------------------------------------------------


def _torch(
    bento_model: bentoml.Model,
    fmt: Format,
    meta: Mapping[str, Any],
    entry: ModelEntry | None,
    threads: int,
) -> Loaded:
    import torch

    torch.set_num_threads(threads)
    if fmt is Format.SERVERY:
        from models.store import load_object

        net = load_object(bento_model, Framework.PYTORCH)
        arch = meta["arch"]
        inputs = (TensorSpec(DEFAULT_INPUT, np.dtype("float32"), (int(arch["n_features"]),)),)
        sig = Signature(inputs, (), Task.CLASSIFICATION, False, _class_names(entry, meta))

        def classify(batch: Batch) -> Outputs:
            with torch.inference_mode():
                proba = torch.softmax(net(_tensor(torch, batch)), dim=1).numpy()
            return {OUTPUT_LABEL: proba.argmax(axis=1), OUTPUT_PROBA: proba}

        return Loaded(fmt, Framework.PYTORCH, sig, classify, tuple(meta.get("feature_names", ())))

    path = bento_model.path_of(FILES[fmt])
    if fmt is Format.TORCHSCRIPT:
        net = torch.jit.load(path, map_location="cpu")
    else:
        # A whole pickled module (bentoml.pytorch): unpickling runs its code, as joblib does for
        # scikit-learn; the store is trusted like the code that serves it.
        net = torch.load(path, map_location="cpu", weights_only=False)
    net.eval()
    inputs = declared_inputs(entry, meta)
    if not inputs:
        raise StoreError(
            f"a {fmt.value} model does not record its input shape: declare it in the model "
            "config, e.g. inputs: [{datatype: FP32, shape: [1, 28, 28]}] (shape per row), or "
            "save it with metadata={'inputs': [...]}"
        )
    names = [t.name for t in inputs]

    def run(batch: Batch) -> Outputs:
        with torch.inference_mode():
            if isinstance(batch, dict):
                out = net(*(_tensor(torch, batch[n]) for n in names))
            else:
                out = net(_tensor(torch, batch))
        if isinstance(out, dict):
            return {str(k): v.numpy() for k, v in out.items()}
        if isinstance(out, list | tuple):
            return {f"output-{i}": v.numpy() for i, v in enumerate(out)}
        return {"output-0": out.numpy()}

    sig = Signature(inputs, (), Task.TENSOR, False, ())
    predict, sig = _postprocessed(run, sig, entry, meta)
    return Loaded(fmt, Framework.PYTORCH, sig, predict)


def _tensor(torch: Any, x: np.ndarray) -> Any:
    x = np.ascontiguousarray(x)
    if not x.flags.writeable:  # unpickled/frombuffer arrays: torch warns on those
        x = x.copy()
    return torch.from_numpy(x)


# --- ONNX Runtime -----------------------------------------------------------------------------

_ONNX_TYPES = {
    "tensor(float)": "float32",
    "tensor(double)": "float64",
    "tensor(float16)": "float16",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
    "tensor(int16)": "int16",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(uint16)": "uint16",
    "tensor(uint32)": "uint32",
    "tensor(uint64)": "uint64",
    "tensor(bool)": "bool",
    "tensor(string)": "object",
}


def _onnx(
    bento_model: bentoml.Model,
    fmt: Format,
    meta: Mapping[str, Any],
    entry: ModelEntry | None,
    threads: int,
) -> Loaded:
    import onnxruntime as ort

    if fmt is not Format.ONNX:
        raise StoreError("framework 'onnx' serves models saved with bentoml.onnx")
    options = ort.SessionOptions()
    # One intra-op thread per worker by default: the router runs several workers, each its own
    # batches; ONNX Runtime's default (a thread per core) would oversubscribe the machine.
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        session = ort.InferenceSession(
            bento_model.path_of(FILES[fmt]), options, providers=["CPUExecutionProvider"]
        )
    inputs = []
    for node in session.get_inputs():
        dtype = _ONNX_TYPES.get(node.type)
        if dtype is None:
            raise StoreError(f"ONNX input '{node.name}' has type {node.type}, not a tensor")
        dims = node.shape[1:] if node.shape else []
        shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in dims)
        inputs.append(TensorSpec(node.name, np.dtype(dtype), shape))
    declared = declared_inputs(entry, meta)
    columnar = bool(declared) and all(t.shape == () for t in inputs) and len(inputs) > 1
    names = [t.name for t in inputs]
    run_session = session.run

    def feeds(batch: Batch) -> dict[str, np.ndarray]:
        if isinstance(batch, dict):
            return {n: _onnx_array(batch[n], t) for n, t in zip(names, inputs, strict=True)}
        return {names[0]: _onnx_array(batch, inputs[0])}

    mapped = meta.get("onnx_outputs") or {}
    task = Task(meta.get("task", Task.TENSOR))
    output_names = [o.name for o in session.get_outputs()]
    if task is Task.CLASSIFICATION and mapped.get("label") in output_names:
        names_ = _class_names(entry, meta)
        index = {c: i for i, c in enumerate(names_)}
        wanted = [mapped["label"]] + (
            [mapped["probabilities"]] if mapped.get("probabilities") else []
        )

        def classify(batch: Batch) -> Outputs:
            got = run_session(wanted, feeds(batch))
            if len(got) > 1:
                # the class index is the most probable class, as servery serves the source model
                # (the label output holds class values, e.g. 1..3, not indices)
                proba = np.asarray(got[1])
                return {OUTPUT_LABEL: proba.argmax(axis=1), OUTPUT_PROBA: proba}
            values = np.asarray(got[0]).reshape(-1)
            # class values -> their index in class_names
            labels = np.array([index.get(str(v), -1) for v in values], dtype=np.int64)
            return {OUTPUT_LABEL: labels}

        sig = Signature(tuple(inputs), (), Task.CLASSIFICATION, columnar, names_)
        return Loaded(fmt, Framework.ONNX, sig, classify, tuple(meta.get("feature_names", ())))
    if task is Task.REGRESSION and mapped.get("predict") in output_names:
        wanted = [mapped["predict"]]
        sig = Signature(tuple(inputs), (), Task.REGRESSION, columnar, ())
        return Loaded(
            fmt,
            Framework.ONNX,
            sig,
            lambda batch: {OUTPUT_LABEL: np.asarray(run_session(wanted, feeds(batch))[0])},
            tuple(meta.get("feature_names", ())),
        )

    def run(batch: Batch) -> Outputs:
        return dict(zip(output_names, run_session(None, feeds(batch)), strict=True))

    sig = Signature(tuple(inputs), (), Task.TENSOR, columnar, ())
    predict, sig = _postprocessed(run, sig, entry, meta)
    return Loaded(fmt, Framework.ONNX, sig, predict)


def _onnx_array(x: np.ndarray, spec: TensorSpec) -> np.ndarray:
    if spec.is_string:
        return np.asarray(x, dtype=object)
    return np.ascontiguousarray(x, dtype=spec.dtype)
