"""What every format module shares: the formats, the loaded model, declared inputs, class names
and the post-processing of raw-tensor outputs."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import numpy as np

from models.config import Framework, ModelEntry, Postprocess
from models.signature import (
    DEFAULT_INPUT,
    OUTPUT_LABEL,
    OUTPUT_PROBA,
    Signature,
    Task,
    TensorSpec,
    dtype_of,
)
from models.store import StoreError

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


@dataclass(frozen=True)
class Loaded:
    """A model ready to call."""

    format: Format
    framework: Framework
    signature: Signature
    predict: Predict
    feature_names: tuple[str, ...] = ()


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


def class_names(entry: ModelEntry | None, meta: Mapping[str, Any], found: Any = ()) -> tuple:
    if entry is not None and entry.class_names:
        return tuple(entry.class_names)
    if meta.get("class_names"):
        return tuple(str(c) for c in meta["class_names"])
    return tuple(str(c) for c in found)


def postprocessed(
    predict: Predict, signature: Signature, entry: ModelEntry | None, meta: Mapping[str, Any]
) -> tuple[Predict, Signature]:
    """A raw-tensor model with ``postprocess: softmax | argmax`` in its config becomes a
    classifier of its first output (the logits)."""
    how = (entry.postprocess if entry else None) or Postprocess.NONE
    if how is Postprocess.NONE:
        return predict, signature
    names = class_names(entry, meta)
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
