"""Binary classification with XGBoost.

small: 50 trees of depth 3 on scikit-learn's breast cancer data (30 features) -> ``breast_cancer``;
large: 300 trees of depth 8 on a synthetic 20,000 x 50 ``make_classification`` set ->
``breast_cancer_large`` (a serving-cost benchmark model, not a medical one). Through
``inplace_predict`` a one-row call cost ~0.4 ms (one thread, varied rows), a row in a batch of 32
~22 us; with the router's own ~0.18 ms of CPU per request that capped what batching can gain at
(0.18 + 0.4) / (0.18 + 0.022) ~ 2.9x. Since the runtime calls XGBoost's C API directly
(services/runtime/predictors.py) a one-row call costs ~0.2 ms and a row in a batch of 32 ~12 us, so
the
cap fell to (0.2 + 0.2) / (0.2 + 0.012) ~ 1.9x: the cheaper unbatched call is a gain for users,
not a loss. ``make bench`` measures it (interleaved runs at c=64, with the CPU the server used
per request): 2.0-2.2x for servery and 2.2x for bare uvicorn + Starlette running the same
batcher, so the 3x of issue 4 is out of reach of a Python HTTP front end for this model here. A
1,000-tree version gained no more (0.44 ms vs 34 us per row) and served fewer requests.

    python -m training.breast_cancer [--size small|large] [--seed N]
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
import xgboost as xgb
from sklearn.datasets import load_breast_cancer, make_classification
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

PARAMS: dict[Size, dict[str, Any]] = {
    "small": {"n_estimators": 50, "max_depth": 3, "learning_rate": 0.3},
    "large": {"n_estimators": 300, "max_depth": 8, "learning_rate": 0.1},
}
COMMON_PARAMS: dict[str, Any] = {
    "objective": "binary:logistic",
    "tree_method": "hist",
    "n_jobs": 2,
    "eval_metric": "logloss",
}
LARGE_DATA: dict[str, Any] = {
    "n_samples": 20_000,
    "n_features": 50,
    "n_informative": 25,
    "n_redundant": 10,
    "n_classes": 2,
}


class _TqdmCallback(xgb.callback.TrainingCallback):
    """One progress-bar step per boosting round."""

    def __init__(self, bar: tqdm) -> None:
        super().__init__()
        self.bar = bar

    def after_iteration(self, model: Any, epoch: int, evals_log: Any) -> bool:
        self.bar.update(1)
        return False  # never stop early


def _load(size: Size, seed: int) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    if size == "small":
        data = load_breast_cancer()
        feature_names = [str(f) for f in data.feature_names]
        return data.data, data.target, feature_names, [str(c) for c in data.target_names]
    X, y = make_classification(**LARGE_DATA, random_state=seed)
    return X, y, [f"f{i}" for i in range(X.shape[1])], ["0", "1"]


def train(size: Size = "small", seed: int = 0, progress: bool = True) -> TrainResult:
    """Train the XGBoost classifier of ``size`` on a stratified 75 % split; metrics on the rest."""
    name = store_name("breast_cancer", size)
    X, y, feature_names, class_names = _load(size, seed)
    X = X.astype(np.float32)
    y = y.astype(np.int64)
    X_train, X_test, y_train, y_test = holdout_split(X, y, seed)

    params = {**PARAMS[size], **COMMON_PARAMS}
    rounds = params["n_estimators"]
    with tqdm(total=rounds, desc=f"{name} boosting rounds", disable=not progress) as bar:
        model = xgb.XGBClassifier(**params, random_state=seed, callbacks=[_TqdmCallback(bar)])
        model.fit(X_train, y_train)
    # The callback holds the (closed) bar; drop it so the estimator stays picklable and clean.
    model.set_params(callbacks=None)

    data_params = LARGE_DATA if size == "large" else {"dataset": "sklearn.load_breast_cancer"}
    return TrainResult(
        name=name,
        framework=Framework.XGBOOST,
        model=model,
        feature_names=feature_names,
        class_names=class_names,
        metrics=classification_metrics(y_test, model.predict_proba(X_test)),
        params={**params, **data_params, "seed": seed, "test_size": TEST_SIZE},
        data_hash=data_sha256(X_train, y_train),
        dtype="float32",
        size=size,
        X_test=X_test,
        y_test=y_test,
    )


if __name__ == "__main__":
    sys.exit(main(train, "Train the XGBoost demo classifier and save it to the BentoML store."))
