"""Shared pieces of the demo training scripts: the result type, split, metrics, saving and CLI.

Every script (``training/iris.py`` and friends) exposes ``train(size, seed, progress)`` returning a
:class:`TrainResult` and ``save(result)`` writing it to the BentoML model store through
:func:`models.store.save_model`. ``python -m training.<name>`` runs both through :func:`main`.

scikit-learn is imported inside the functions that use it: ``training.ensure`` imports this module
to learn the store names and must stay fast when every model is already in the store.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from models.config import Framework
from models.store import save_model

if TYPE_CHECKING:
    import bentoml

Size = Literal["small", "large"]
SIZES: tuple[Size, ...] = ("small", "large")
TEST_SIZE = 0.25
"""Fraction of every data set held out for the metrics recorded with the model."""


@dataclass(kw_only=True)
class TrainResult:
    """A trained model plus everything :func:`save` records about it."""

    name: str
    """Store name, e.g. ``iris`` or ``iris_large``."""
    framework: Framework
    model: Any
    feature_names: list[str]
    class_names: list[str]
    metrics: dict[str, float]
    """Hold-out metrics of exactly the object in ``model``."""
    params: dict[str, Any]
    """Training hyper-parameters (JSON-serialisable), including seed and split."""
    data_hash: str
    """:func:`models.store.data_sha256` of the training split (features, labels)."""
    dtype: str
    """Feature dtype the model is served with (``float32`` or ``float64``)."""
    arch: dict[str, Any] | None = None
    """PyTorch only: ``n_features``, ``hidden``, ``n_classes`` for ``models.store.build_mlp``."""
    size: Size
    X_test: np.ndarray
    y_test: np.ndarray


def store_name(base: str, size: Size) -> str:
    """The store name of a demo model: ``base`` for small, ``base_large`` for large."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, not {size!r}")
    return base if size == "small" else f"{base}_large"


def holdout_split(
    X: np.ndarray, y: np.ndarray, seed: int, test_size: float = TEST_SIZE
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Stratified ``X_train, X_test, y_train, y_test``; the same seed gives the same split."""
    from sklearn.model_selection import train_test_split

    return train_test_split(X, y, test_size=test_size, random_state=seed, stratify=y)


def classification_metrics(y_true: np.ndarray, proba: np.ndarray) -> dict[str, float]:
    """Hold-out ``accuracy`` and ``log_loss``, plus ``roc_auc`` for a binary task.

    ``proba`` is ``(n, n_classes)`` class probabilities, or ``(n,)`` positive-class
    probabilities for a binary task (what an XGBoost booster returns).
    """
    from sklearn.metrics import accuracy_score, log_loss, roc_auc_score

    proba = np.asarray(proba, dtype=np.float64)
    if proba.ndim == 2 and proba.shape[1] == 2:
        proba = proba[:, 1]
    if proba.ndim == 1:
        proba = np.column_stack([1.0 - proba, proba])
    # float32 model outputs miss a row sum of 1 by ~1e-7, which log_loss warns about.
    proba /= proba.sum(axis=1, keepdims=True)
    labels = np.arange(proba.shape[1])
    metrics = {
        "accuracy": float(accuracy_score(y_true, proba.argmax(axis=1))),
        "log_loss": float(log_loss(y_true, proba, labels=labels)),
    }
    if proba.shape[1] == 2:
        metrics["roc_auc"] = float(roc_auc_score(y_true, proba[:, 1]))
    return metrics


def save(result: TrainResult) -> bentoml.Model:
    """Write ``result`` to the BentoML model store as a new version of ``result.name``."""
    return save_model(
        result.name,
        result.framework,
        result.model,
        feature_names=result.feature_names,
        class_names=result.class_names,
        metrics=result.metrics,
        params=result.params,
        data_hash=result.data_hash,
        dtype=result.dtype,
        arch=result.arch,
        labels={"size": result.size},
        # held-out rows travel with the model: `servery models compile` checks on them
        holdout=result.X_test[:256],
    )


def main(
    train: Callable[..., TrainResult],
    description: str,
    argv: Sequence[str] | None = None,
) -> int:
    """The ``python -m training.<name>`` command: parse arguments, train, report, save."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--size", choices=SIZES, default="small", help="default: small")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    result = train(size=args.size, seed=args.seed, progress=not args.no_progress)
    trained = time.perf_counter() - start
    scores = ", ".join(f"{k}={v:.4f}" for k, v in result.metrics.items())
    print(f"{result.name}: trained in {trained:.1f}s; hold-out {scores}")
    bento_model = save(result)
    print(f"{result.name}: saved {bento_model.tag} at {bento_model.path}")
    return 0
