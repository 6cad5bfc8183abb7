"""A model store for one test or study: point this process's BentoML store somewhere, save an
iris classifier into it. Shared by tests/ and bench/studies/ (bench never imports tests/)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def bentoml_store(home: Path) -> Iterator[Path]:
    """Point this process's BentoML model store at ``home`` (and its children via the env).

    BentoML reads ``BENTOML_HOME`` once and caches the home, the store directory and the
    ``ModelStore`` in singleton providers of its DI container, so setting the variable alone is
    not enough after the first store access. Patching the three providers sends every
    ``bentoml.models`` call here and restores the previous store afterwards.
    """
    from bentoml._internal.configuration.containers import BentoMLContainer
    from bentoml._internal.models import ModelStore
    from bentoml._internal.utils.analytics.usage_stats import do_not_track

    models_dir = home / "models"
    models_dir.mkdir(parents=True, exist_ok=True)
    old = {k: os.environ.get(k) for k in ("BENTOML_HOME", "BENTOML_DO_NOT_TRACK")}
    os.environ["BENTOML_HOME"] = str(home)
    os.environ["BENTOML_DO_NOT_TRACK"] = "True"  # no usage events from tests
    do_not_track.cache_clear()
    try:
        with (
            BentoMLContainer.bentoml_home.patch(str(home)),
            BentoMLContainer.model_store_dir.patch(str(models_dir)),
            BentoMLContainer.model_store.patch(ModelStore(str(models_dir))),
        ):
            yield home
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        do_not_track.cache_clear()


def save_iris(name: str = "iris", c: float = 1.0, dtype: str = "float64") -> str:
    """Save an iris ``LogisticRegression(C=c)`` as a new version of ``name`` in the current store
    (see :func:`bentoml_store`); returns the version. Different ``c``: different answers, same
    cost per call."""
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    from models.store import data_sha256, save_model

    x, y = load_iris(return_X_y=True)
    clf = LogisticRegression(C=c, max_iter=500).fit(x, y)
    saved = save_model(
        name,
        "sklearn",
        clf,
        feature_names=[f"f{i}" for i in range(4)],
        class_names=["setosa", "versicolor", "virginica"],
        metrics={},
        params={"C": c},
        data_hash=data_sha256(x, y),
        dtype=dtype,
    )
    return saved.tag.version
