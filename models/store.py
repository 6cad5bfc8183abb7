"""servery's own model format in the BentoML model store: one file format per framework.

It is one of the formats servery serves (:mod:`models.formats`), beside models saved with
BentoML's framework APIs (``bentoml.sklearn``, ``bentoml.xgboost``, ``bentoml.torchscript``,
``bentoml.pytorch``, ``bentoml.onnx``). :func:`save_model` saves through
``bentoml.models.create`` and records what those do not: metrics, training parameters, a data
hash and, optionally, hold-out rows (``holdout.npy``). ``bentoml.xgboost`` works with the
``xgboost-cpu`` wheel through :mod:`models.xgboost_dist`; ``bentoml.pytorch`` models are loaded
with ``torch.load(weights_only=False)`` directly (:mod:`models.formats.torch_models`), as
BentoML's loader breaks on torch >= 2.6. Each version holds one file named by
:data:`MODEL_FILES` plus labels and metadata:

labels
    ``framework`` (sklearn | xgboost | pytorch), ``task`` (classification), ``servery`` ("1")
metadata
    ``feature_names``, ``class_names``, ``input_schema`` (``n_features``, ``dtype``),
    ``metrics`` (hold-out), ``params`` (training parameters), ``data_sha256``, and for PyTorch
    ``arch`` (``n_features``, ``hidden``, ``n_classes``).

A data scientist's own model saved with :func:`save_model` is served by adding one entry to the
model config; nothing else.
"""

from __future__ import annotations

import hashlib
import pickle
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from models.config import Framework

if TYPE_CHECKING:
    import bentoml

MODEL_FILES: dict[Framework, str] = {
    Framework.SKLEARN: "model.joblib",
    Framework.XGBOOST: "model.ubj",
    Framework.PYTORCH: "model.pt",
}


class StoreError(LookupError):
    """A model or version is not in the store, or its files do not match its labels."""


def data_sha256(*arrays: np.ndarray) -> str:
    """A stable hash of the training data (values, dtypes and shapes)."""
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(str(a.dtype).encode())
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def build_mlp(n_features: int, hidden: Sequence[int], n_classes: int) -> Any:
    """The PyTorch classifier architecture used for every servery MLP (a plain Sequential)."""
    import torch.nn as nn

    layers: list[nn.Module] = []
    width = n_features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, n_classes))
    return nn.Sequential(*layers)


def save_model(
    name: str,
    framework: Framework | str,
    model: Any,
    *,
    feature_names: Sequence[str],
    class_names: Sequence[str],
    metrics: Mapping[str, float],
    params: Mapping[str, Any],
    data_hash: str,
    dtype: str = "float32",
    task: str = "classification",
    arch: Mapping[str, Any] | None = None,
    labels: Mapping[str, str] | None = None,
    metadata: Mapping[str, Any] | None = None,
    holdout: np.ndarray | None = None,
) -> bentoml.Model:
    """Save a trained classifier as a new version of ``name`` and return the stored model.

    ``model`` is a fitted scikit-learn estimator with ``predict_proba``, an ``xgboost.Booster``
    (or ``XGBClassifier``), or a ``torch.nn.Module`` built by :func:`build_mlp` (pass ``arch``).
    ``holdout``: rows the model never trained on, kept as ``holdout.npy`` (2-D float, at most 256
    rows) for checks that need real inputs, such as ``servery models compile``.
    """
    import bentoml

    framework = Framework(framework)
    if framework is Framework.PYTORCH and not arch:
        raise ValueError("PyTorch models need arch={'n_features', 'hidden', 'n_classes'}")
    all_labels = {"framework": framework.value, "task": task, "servery": "1", **(labels or {})}
    all_metadata: dict[str, Any] = {
        "framework": framework.value,
        "feature_names": list(feature_names),
        "class_names": [str(c) for c in class_names],
        "input_schema": {"n_features": len(feature_names), "dtype": dtype},
        "metrics": {k: float(v) for k, v in metrics.items()},
        "params": _no_none(dict(params)),
        "data_sha256": data_hash,
        **(metadata or {}),
    }
    if arch:
        all_metadata["arch"] = dict(arch)
    with bentoml.models.create(name, labels=all_labels, metadata=all_metadata) as bento_model:
        path = bento_model.path_of(MODEL_FILES[framework])
        if framework is Framework.SKLEARN:
            import joblib

            joblib.dump(model, path)
        elif framework is Framework.XGBOOST:
            booster = model.get_booster() if hasattr(model, "get_booster") else model
            booster.save_model(path)
        else:
            import torch

            torch.save(model.state_dict(), path)
        if holdout is not None:
            rows = np.atleast_2d(np.asarray(holdout))[:256]
            if not np.issubdtype(rows.dtype, np.floating):
                rows = rows.astype(np.float64)
            np.save(bento_model.path_of("holdout.npy"), rows)
    # The object above points at BentoML's temporary build folder; return the stored copy.
    return bentoml.models.get(bento_model.tag)


def _no_none(value: Any) -> Any:
    """BentoML rejects None in metadata; keep the key and say "None" (e.g. max_depth=None)."""
    if isinstance(value, dict):
        return {k: _no_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_no_none(v) for v in value]
    return "None" if value is None else value


def store_home() -> str:
    """The BentoML home whose ``models/`` folder is the model store, as BentoML itself resolves
    it: ``$BENTOML_HOME``, else ``~/bentoml``."""
    from bentoml._internal.configuration.containers import BentoMLContainer

    return str(BentoMLContainer.bentoml_home.get())


def get_model(tag: str) -> bentoml.Model:
    """The stored model for ``tag`` (``name:version`` or ``name:latest``); StoreError if absent."""
    import bentoml
    from bentoml.exceptions import BentoMLException, NotFound

    try:
        return bentoml.models.get(tag)
    except NotFound as e:
        raise StoreError(f"model {tag!r} is not in the model store") from e
    except BentoMLException as e:
        raise StoreError(f"cannot read model {tag!r} from the store: {e}") from e


def load_object(bento_model: bentoml.Model, framework: Framework, threads: int = 1) -> Any:
    """Load the framework object stored in ``bento_model`` (not yet wrapped for serving)."""
    path = bento_model.path_of(MODEL_FILES[framework])
    try:
        if framework is Framework.SKLEARN:
            import joblib

            return joblib.load(path)
        if framework is Framework.XGBOOST:
            import xgboost as xgb

            booster = xgb.Booster()
            booster.load_model(path)
            booster.set_param({"nthread": threads})
            return booster
        import torch

        arch = bento_model.info.metadata["arch"]
        net = build_mlp(int(arch["n_features"]), list(arch["hidden"]), int(arch["n_classes"]))
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        net.eval()
        return net
    except (OSError, KeyError, ValueError, EOFError, pickle.UnpicklingError) as e:
        # a missing, truncated or foreign file: joblib reports a damaged pickle as KeyError(110)
        raise StoreError(
            f"model {bento_model.tag}: its {framework} file {MODEL_FILES[framework]} cannot be "
            f"loaded ({type(e).__name__}: {e})"
        ) from e
