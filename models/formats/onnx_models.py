"""ONNX Runtime: ``bentoml.onnx`` models, including those ``servery models compile`` saves."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from models.config import Framework, ModelEntry
from models.formats.common import (
    FILES,
    Batch,
    Format,
    Loaded,
    Outputs,
    class_names,
    declared_inputs,
    postprocessed,
)
from models.signature import OUTPUT_LABEL, OUTPUT_PROBA, Signature, Task, TensorSpec
from models.store import StoreError

if TYPE_CHECKING:
    import bentoml

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


def load_onnx(
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
        names_ = class_names(entry, meta)
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
    predict, sig = postprocessed(run, sig, entry, meta)
    return Loaded(fmt, Framework.ONNX, sig, predict)


def _onnx_array(x: np.ndarray, spec: TensorSpec) -> np.ndarray:
    if spec.is_string:
        return np.asarray(x, dtype=object)
    return np.ascontiguousarray(x, dtype=spec.dtype)
