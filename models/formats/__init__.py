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

from typing import TYPE_CHECKING

import numpy as np

from models.config import Framework, ModelEntry, Postprocess
from models.formats.common import (
    FILES,
    FRAMEWORK_OF_FORMAT,
    Batch,
    Format,
    Loaded,
    Outputs,
    Predict,
    declared_inputs,
)
from models.formats.onnx_models import load_onnx
from models.formats.sklearn_models import load_sklearn, sklearn_object
from models.formats.torch_models import load_torch
from models.formats.xgboost_models import load_xgboost, xgboost_object
from models.signature import OUTPUT_PROBA, Signature, TensorSpec
from models.store import StoreError

if TYPE_CHECKING:
    import bentoml

__all__ = [
    "FILES",
    "FRAMEWORK_OF_FORMAT",
    "Batch",
    "Format",
    "Loaded",
    "Outputs",
    "Predict",
    "declared_inputs",
    "format_of",
    "framework_of",
    "inline_only",
    "load",
]


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
    how = entry.postprocess if entry is not None else None
    if how not in (None, Postprocess.NONE) and (
        framework in (Framework.SKLEARN, Framework.XGBOOST)
        or fmt is Format.SERVERY
        or meta.get("task") in ("classification", "regression")
    ):
        raise StoreError(
            f"model {bento_model.tag} ({fmt.value}) answers predictions itself; 'postprocess: "
            f"{how}' is for raw-tensor models (TorchScript, PyTorch, ONNX): remove it"
        )
    try:
        if framework is Framework.SKLEARN:
            loaded = load_sklearn(sklearn_object(bento_model, fmt), fmt, meta, entry, threads)
        elif framework is Framework.XGBOOST:
            loaded = load_xgboost(xgboost_object(bento_model, fmt), fmt, meta, entry, threads)
        elif framework is Framework.PYTORCH:
            loaded = load_torch(bento_model, fmt, meta, entry, threads)
        else:
            loaded = load_onnx(bento_model, fmt, meta, entry, threads)
    except StoreError:
        raise
    except (OSError, KeyError, ValueError, TypeError, ImportError, RuntimeError) as e:
        raise StoreError(
            f"model {bento_model.tag} ({fmt.value}, {framework}) cannot be loaded: "
            f"{type(e).__name__}: {e}"
        ) from e
    return _warmed_up(bento_model, loaded)


SERVICE_FRAMEWORKS = (Framework.SKLEARN, Framework.XGBOOST, Framework.PYTORCH)
"""The frameworks a framework service hosts (services/frameworks/); ONNX runs inline only."""


def inline_only(name: str, framework: Framework, signature: Signature) -> str | None:
    """Why model ``name`` cannot be placed in a framework service, or None when it can: the
    services host three frameworks and take one flat tensor per row (their micro-batches are one
    array)."""
    if framework not in SERVICE_FRAMEWORKS:
        return (
            f"model '{name}': {framework} models are served inline only (no framework service "
            "hosts them); set placement: inline"
        )
    if signature.single is None:
        return (
            f"model '{name}' takes several inputs or named columns, which are served inline "
            "only; set placement: inline"
        )
    return None


def _hint(loaded: Loaded) -> str:
    if loaded.format is Format.ONNX:
        return (
            " (servery batches rows on the first dimension: export the graph with a dynamic "
            "first dimension, e.g. dynamic_axes / dynamic_shapes for the batch)"
        )
    if loaded.framework is Framework.PYTORCH and loaded.format is not Format.SERVERY:
        return " (declare the input's per-row shape in the model config: inputs:)"
    return ""


def _warmed_up(bento_model: bentoml.Model, loaded: Loaded) -> Loaded:
    """Call the model once (first calls allocate), and read its outputs' dtypes and shapes."""
    sig = loaded.signature
    try:
        out = loaded.predict(sig.example(2))
    except Exception as e:
        raise StoreError(
            f"model {bento_model.tag} fails on a batch of 2 rows of its inputs "
            f"{[t.describe() for t in sig.inputs]}: {type(e).__name__}: {e}{_hint(loaded)}"
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
    proba = out.get(OUTPUT_PROBA)
    if sig.class_names and proba is not None and np.shape(proba)[1:] != (len(sig.class_names),):
        raise StoreError(
            f"model {bento_model.tag} has {len(sig.class_names)} class names "
            f"{list(sig.class_names)[:10]} but answers {np.shape(proba)[1:]} probabilities per row"
        )
    return Loaded(
        loaded.format,
        loaded.framework,
        sig.with_outputs(specs),
        loaded.predict,
        loaded.feature_names,
    )
