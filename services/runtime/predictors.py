"""Runtimes: a stored model loaded for serving, and what the serving layer knows about it.

The same runtime serves both placements: the router's workers use it in-process (``inline``) and
the framework services use it behind BentoML (``service``). Loading any stored model (servery's
format or anything saved with BentoML's framework APIs) is :func:`models.formats.load`; this
module wraps it for serving. :class:`ModelInfo` is the part that needs no framework object
(signature, metadata, input validation), so the router can validate requests for models that live
in another process.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from models.config import Framework, ModelEntry
from models.formats import Format, Loaded, Outputs, Predict, load
from models.signature import OUTPUT_LABEL, OUTPUT_PROBA, Signature, Task
from models.store import get_model
from services.runtime.inputs import to_batch


@dataclass(frozen=True)
class ModelInfo:
    """What the serving layer knows about one served model version (no framework objects)."""

    name: str
    store_name: str
    version: str
    framework: Framework
    signature: Signature
    feature_names: list[str]
    labels: dict[str, str]
    metadata: dict[str, Any] = field(repr=False)
    format: Format = Format.SERVERY

    @property
    def tag(self) -> str:
        return f"{self.store_name}:{self.version}"

    @property
    def task(self) -> Task:
        return self.signature.task

    @property
    def class_names(self) -> list[str]:
        return list(self.signature.class_names)

    @property
    def n_features(self) -> int:
        """Values per row of a flat one-input model (columns of a tabular one); -1 otherwise."""
        return self.signature.n_features

    @property
    def dtype(self) -> np.dtype:
        """The dtype of a one-input model's input (the first input's otherwise)."""
        return self.signature.inputs[0].dtype

    @cached_property
    def output_dtypes(self) -> dict[str, np.dtype]:
        """The dtype each output is answered in (every protocol): a classifier's class index as
        int64, its probabilities in the model's float input dtype (float32 for a float32 model,
        whatever the framework computed them in), anything else as the model computes it."""
        floats = self.dtype if self.dtype.kind == "f" else None
        out = {}
        for spec in self.signature.outputs:
            dtype = spec.dtype
            if spec.name == OUTPUT_LABEL and self.task is Task.CLASSIFICATION:
                dtype = np.dtype(np.int64)
            elif spec.name == OUTPUT_PROBA and floats is not None:
                dtype = floats
            out[spec.name] = dtype
        return out

    def validate(self, inputs: Any, max_rows: int) -> Any:
        """Turn a JSON ``inputs`` value into this model's rows, or raise a 4xx error."""
        return to_batch(inputs, self.signature, max_rows, self.name)

    def describe(self) -> dict[str, Any]:
        """The public description served by ``GET /models``."""
        sig = self.signature
        schema: dict[str, Any] = {
            "inputs": [t.describe() for t in sig.inputs],
            "outputs": [t.describe() for t in sig.outputs],
        }
        if sig.columnar:
            schema["columns"] = [t.name for t in sig.inputs]
        if sig.n_features >= 0 and not sig.columnar:
            schema.update(
                n_features=sig.n_features, dtype=self.dtype.name, feature_names=self.feature_names
            )
        return {
            "name": self.name,
            "version": self.version,
            "tag": self.tag,
            "framework": self.framework.value,
            "format": self.format.value,
            "task": sig.task.value,
            "input_schema": schema,
            "class_names": self.class_names,
            "metrics": self.metadata.get("metrics", {}),
            "params": self.metadata.get("params", {}),
            "data_sha256": self.metadata.get("data_sha256"),
            "labels": self.labels,
        }


@dataclass(frozen=True)
class Runtime:
    """A loaded model: its :class:`ModelInfo` and its batch ``predict`` (named outputs)."""

    info: ModelInfo
    call: Predict = field(repr=False)

    def predict(self, x: Any) -> Outputs:
        """The model's outputs for a batch of checked rows (``predict`` is the class index of a
        classifier, ``predict_proba`` its probabilities; see :mod:`models.signature`)."""
        out = self.call(x)
        rows = len(x) if isinstance(x, np.ndarray) else len(next(iter(x.values())))
        for name, arr in out.items():
            if len(arr) != rows:
                # LitServe-style batch contract check: a model must answer every row it was given.
                raise RuntimeError(
                    f"batch size mismatch: model {self.info.tag} returned {len(arr)} rows "
                    f"of '{name}' for {rows} inputs"
                )
        return out


def _info(entry: ModelEntry, bento_model: Any, loaded: Loaded) -> ModelInfo:
    meta = dict(bento_model.info.metadata)
    sig = loaded.signature
    names = list(loaded.feature_names) or [str(f) for f in meta.get("feature_names") or []]
    if not names and sig.n_features > 0:
        names = [f"f{i}" for i in range(sig.n_features)]
    return ModelInfo(
        name=entry.name,
        store_name=bento_model.tag.name,
        version=bento_model.tag.version,
        framework=loaded.framework,
        signature=sig,
        feature_names=names,
        labels=dict(bento_model.info.labels),
        metadata=meta,
        format=loaded.format,
    )


def load_runtime(entry: ModelEntry, threads: int = 1, version: str | None = None) -> Runtime:
    """Load ``entry`` (at ``version``, default its tag's) from the store, warmed up."""
    bento_model = get_model(f"{entry.store_name}:{version}" if version else entry.store_tag)
    loaded = load(bento_model, entry, threads)
    return Runtime(_info(entry, bento_model, loaded), loaded.predict)


def load_info(entry: ModelEntry, version: str | None = None) -> tuple[ModelInfo, Any]:
    """The :class:`ModelInfo` of ``entry`` (at ``version``) and the store's model handle.

    The signature of a model saved with BentoML's APIs is read from the loaded model, so this
    loads it (and lets it go): the router does so once per version it routes to another
    service."""
    bento_model = get_model(f"{entry.store_name}:{version}" if version else entry.store_tag)
    loaded = load(bento_model, entry, 1)
    return _info(entry, bento_model, loaded), bento_model
