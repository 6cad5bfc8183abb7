"""Shared test set-up: folder-based markers, a temporary model store, and a real server.

Nothing here reads the developer's own model store: every model is trained (tiny, seconds) into a
temporary ``BENTOML_HOME``, and every server binds 127.0.0.1 on a free port and is stopped by PID.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bench.server import ROOT

# LLMs come from the store, never from the Hugging Face hub (no network in CI).
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark each test by its folder (tests/unit, tests/integration, tests/e2e)."""
    for item in items:
        parts = Path(str(item.fspath)).relative_to(ROOT / "tests").parts
        if parts and parts[0] in ("unit", "integration", "e2e"):
            item.add_marker(getattr(pytest.mark, parts[0]))


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


@pytest.fixture(scope="session")
def demo_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A temporary store holding the three small demo models (trained once per session)."""
    from training.ensure import ensure

    home = tmp_path_factory.mktemp("store") / "bentoml"
    with bentoml_store(home):
        ensure("small", progress=False)
        yield home


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


class Sent:
    """An ASGI ``send`` that records the messages: status, headers and JSON body of a response."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []

    async def __call__(self, message: dict[str, Any]) -> None:
        self.messages.append(message)

    @property
    def status(self) -> int:
        return self.messages[0]["status"]

    @property
    def headers(self) -> dict[str, str]:
        return {k.decode(): v.decode() for k, v in self.messages[0]["headers"]}

    @property
    def body(self) -> Any:
        return json.loads(b"".join(m.get("body", b"") for m in self.messages[1:]))


def engine_metric(url: str, name: str, model: str) -> float:
    """vLLM engine metric ``name`` of served LLM ``model`` (its ``model_name`` label), summed over
    its series, from the ``/metrics`` at server ``url``; fails when it is missing."""
    from bench.report import metric_samples

    values = [
        v
        for n, labels, v in metric_samples(f"{url}/metrics")
        if n == name and labels.get("model_name") == model
    ]
    assert values, f"{name} missing from /metrics"
    return sum(values)
