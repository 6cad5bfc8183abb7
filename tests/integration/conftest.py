"""A real Bento served once per session with every demo model in both placements."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from bench.server import Server, free_port, start_server
from tests.conftest import bentoml_store

DEMOS = ("iris", "breast_cancer", "digits")
# served name -> store name; "-svc" entries run in their framework service
PLACEMENTS = {**{d: d for d in DEMOS}, **{f"{d}-svc": d for d in DEMOS}}

MIXED_CONFIG = "defaults:\n  placement: inline\nmodels:\n" + "".join(
    f"  - name: {name}\n    tag: {store}\n"
    + ("    placement: service\n" if name.endswith("-svc") else "")
    for name, store in PLACEMENTS.items()
)


def dataset(store_name: str) -> np.ndarray:
    """Real feature rows for a demo model (the sklearn dataset it was trained on)."""
    from sklearn import datasets

    loader = {
        "iris": datasets.load_iris,
        "breast_cancer": datasets.load_breast_cancer,
        "digits": datasets.load_digits,
    }[store_name]
    return loader().data


@pytest.fixture(scope="session")
def server(demo_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start_server(
        demo_store,
        MIXED_CONFIG,
        tmp_path_factory.mktemp("serve"),
        env={"SERVERY_GRPC_PORT": str(free_port())},
    )
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="session")
def local_predict(demo_store: Path):
    """In-process predictions with the same runtimes the server uses: name -> rows -> result."""
    from models.config import ModelEntry
    from services.runtimes import load_runtime

    with bentoml_store(demo_store):
        runtimes = {d: load_runtime(ModelEntry(name=d)) for d in DEMOS}

    def predict(served_name: str, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        runtime = runtimes[PLACEMENTS[served_name]]
        return runtime.predict(np.asarray(rows, dtype=runtime.info.dtype))

    return predict
