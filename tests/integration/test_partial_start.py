"""Start-up with a model that cannot be served: the others are served, readiness says which is
missing, and the missing one is served once the store has it (no worker restarting in a loop)."""

from __future__ import annotations

from pathlib import Path

import httpx

from bench.harness.server import start_server
from bench.harness.store import bentoml_store, save_iris
from tests.conftest import eventually

CONFIG = """
models:
  - name: iris
  - name: ghost          # not in the store
  - name: broken         # in the store, its file does not load
"""
ROW = {"inputs": [[5.1, 3.5, 1.4, 0.2]]}


def store_of_three(tmp_path: Path) -> Path:
    """A store for CONFIG: iris, a ``broken`` whose model file does not load, and no ``ghost``."""
    home = tmp_path / "bentoml"
    with bentoml_store(home):
        save_iris()
        broken = save_iris("broken")
    (home / "models" / "broken" / broken / "model.joblib").write_bytes(b"not a model")
    return home


def test_models_that_load_are_served_and_readiness_names_the_missing(tmp_path: Path) -> None:
    home = store_of_three(tmp_path)
    srv = start_server(
        home,
        CONFIG,
        tmp_path / "serve",
        env={"SERVERY_RELOAD_INTERVAL_S": "0.5", "SERVERY_ROUTER_WORKERS": "1"},
        ready_path="/livez",
    )
    try:
        url = srv.url
        ok = httpx.post(f"{url}/predict", json={"model": "iris", **ROW}, timeout=30)
        assert ok.status_code == 200, ok.text
        assert httpx.get(f"{url}/readyz", timeout=5).status_code == 503
        models = {m["name"]: m for m in httpx.get(f"{url}/models", timeout=5).json()["models"]}
        assert models["iris"]["ready"] is True
        assert models["ghost"]["ready"] is False
        assert "ghost" in models["ghost"]["error"] and "store" in models["ghost"]["error"]
        assert models["broken"]["ready"] is False
        assert "did not load" in models["broken"]["error"], models["broken"]
        for name in ("ghost", "broken"):
            r = httpx.post(f"{url}/predict", json={"model": name, **ROW}, timeout=30)
            assert r.status_code in (404, 503), r.text
            assert name in r.json()["error"]["message"]
        # the store gets the missing models: they are served, and the server becomes ready
        with bentoml_store(home):
            save_iris("ghost")
            save_iris("broken")
        eventually(
            lambda: httpx.get(f"{url}/readyz", timeout=5).status_code == 200,
            timeout=60,
            what="ready once every model is in the store",
        )
        for name in ("ghost", "broken"):
            r = httpx.post(f"{url}/predict", json={"model": name, **ROW}, timeout=30)
            assert r.status_code == 200, r.text
    except Exception:
        print(srv.log_tail())
        raise
    finally:
        srv.stop()


def test_check_names_every_model_that_cannot_be_served(tmp_path: Path) -> None:
    from models.check import check

    home = store_of_three(tmp_path)
    config = tmp_path / "models.yaml"
    config.write_text(CONFIG)
    with bentoml_store(home):
        problems = check(str(config))
    assert len(problems) == 2, problems
    assert any("'ghost'" in p and "not in the model store" in p for p in problems)
    assert any("'broken'" in p and "cannot be loaded" in p for p in problems)
