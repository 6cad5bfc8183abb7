"""Iris flowers (4 features, 3 classes) with scikit-learn.

small: ``LogisticRegression`` -> store name ``iris``;
large: ``RandomForestClassifier`` with 200 trees -> ``iris_large``.

    python -m training.iris [--size small|large] [--seed N]
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
from sklearn.datasets import load_iris
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from tqdm.auto import tqdm

from models.config import Framework
from models.store import data_sha256
from training.common import (
    TEST_SIZE,
    Size,
    TrainResult,
    classification_metrics,
    holdout_split,
    main,
    save,
    store_name,
)

__all__ = ["save", "train"]

FOREST_STEP = 20
"""Trees added per ``fit`` call while growing the forest (one progress-bar step)."""


def _fit_forest(
    params: dict[str, Any], X: np.ndarray, y: np.ndarray, seed: int, progress: bool
) -> RandomForestClassifier:
    # Growing the forest with warm_start gives a progress bar and the same trees as one fit:
    # scikit-learn advances the random state past the trees already grown.
    n_trees = params["n_estimators"]
    forest = RandomForestClassifier(**params, random_state=seed, warm_start=True)
    with tqdm(total=n_trees, desc="iris_large trees", disable=not progress) as bar:
        for grown in range(FOREST_STEP, n_trees + FOREST_STEP, FOREST_STEP):
            forest.set_params(n_estimators=min(grown, n_trees)).fit(X, y)
            bar.update(forest.n_estimators - bar.n)
    # n_jobs was for training; a served predict_proba on a few rows is faster in one thread
    # than through joblib's pool, and the serving side sets its own thread budget.
    return forest.set_params(warm_start=False, n_jobs=1)


def train(size: Size = "small", seed: int = 0, progress: bool = True) -> TrainResult:
    """Train the iris classifier of ``size`` on a stratified 75 % split; metrics on the rest."""
    name = store_name("iris", size)
    data = load_iris()
    X = data.data.astype(np.float64)
    y = data.target.astype(np.int64)
    X_train, X_test, y_train, y_test = holdout_split(X, y, seed)

    if size == "small":
        params = {"C": 1.0, "max_iter": 1000}
        model = LogisticRegression(**params, random_state=seed).fit(X_train, y_train)
        estimator = "LogisticRegression"
    else:
        params = {"n_estimators": 200, "min_samples_leaf": 1, "n_jobs": 2}
        model = _fit_forest(params, X_train, y_train, seed, progress)
        estimator = "RandomForestClassifier"

    return TrainResult(
        name=name,
        framework=Framework.SKLEARN,
        model=model,
        feature_names=list(data.feature_names),
        class_names=[str(c) for c in data.target_names],
        metrics=classification_metrics(y_test, model.predict_proba(X_test)),
        params={"estimator": estimator, **params, "seed": seed, "test_size": TEST_SIZE},
        data_hash=data_sha256(X_train, y_train),
        dtype="float64",
        size=size,
        X_test=X_test,
        y_test=y_test,
    )


if __name__ == "__main__":
    sys.exit(main(train, "Train the iris demo classifier and save it to the BentoML store."))
