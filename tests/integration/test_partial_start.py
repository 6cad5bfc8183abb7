"""Start-up and reload with models that cannot be served: the others are served and the router
is ready, the missing ones are listed not ready and served once the store has them, and files
that cannot be used are reported once while the last good state keeps serving (no worker
restarting in a loop; issue 20 items 7 and 12)."""

from __future__ import annotations

import re
from pathlib import Path

import httpx

from bench.harness.server import metric_samples, start_server
from bench.harness.store import bentoml_store, save_iris
from tests.conftest import eventually

CONFIG = """
models:
  - name: iris
  - name: ghost          # not in the store
  - name: broken         # in the store, its file does not load
  - name: invalid        # an invalid entry: the file as a whole is invalid
    max_queue: 0
"""
VALID_CONFIG = CONFIG.replace("    max_queue: 0\n", "")
PROCESS = re.compile(r"^\S+ \[[A-Z]+\] \[([^\]]+)\]")
ROW = {"inputs": [[5.1, 3.5, 1.4, 0.2]]}


def store_of_three(tmp_path: Path) -> Path:
    """A store for CONFIG: iris, a ``broken`` whose model file does not load, and no ``ghost``."""
    home = tmp_path / "bentoml"
    with bentoml_store(home):
        save_iris()
        broken = save_iris("broken")
    (home / "models" / "broken" / broken / "model.joblib").write_bytes(b"not a model")
    return home


def reloads(url: str) -> float:
    """Reloads the router has done (``servery_reloads_total``, every outcome)."""
    samples = metric_samples(f"{url}/metrics")
    return sum(v for n, _, v in samples if n == "servery_reloads_total")


def logged_by(log: str, text: str) -> list[str]:
    """The process (``entry_service:router:1``, ``service:sklearn:1``...) of each log line with
    ``text``, in order."""
    found = (PROCESS.search(line) for line in log.splitlines() if text in line)
    return [m.group(1) for m in found if m]


def listed(url: str) -> dict[str, dict]:
    return {m["name"]: m for m in httpx.get(f"{url}/models", timeout=5).json()["models"]}


def test_what_loads_is_served_and_ready_and_bad_files_are_reported_once(tmp_path: Path) -> None:
    home = store_of_three(tmp_path)
    srv = start_server(
        home,
        CONFIG,
        tmp_path / "serve",
        env={"SERVERY_RELOAD_INTERVAL_S": "0.5", "SERVERY_ROUTER_WORKERS": "1"},
        ready_path="/livez",
    )
    models_file = tmp_path / "serve" / "models.yaml"
    try:
        url = srv.url
        ok = httpx.post(f"{url}/predict", json={"model": "iris", **ROW}, timeout=30)
        assert ok.status_code == 200, ok.text
        # ready: the models that cannot be served do not take readiness from iris (item 7)
        assert httpx.get(f"{url}/readyz", timeout=5).status_code == 200
        models = listed(url)
        assert models["iris"]["ready"] is True
        assert models["ghost"]["ready"] is False
        assert "ghost" in models["ghost"]["error"] and "store" in models["ghost"]["error"]
        assert models["broken"]["ready"] is False
        assert "did not load" in models["broken"]["error"], models["broken"]
        assert models["invalid"]["ready"] is False and "max_queue" in models["invalid"]["error"]
        for name in ("ghost", "broken", "invalid"):
            r = httpx.post(f"{url}/predict", json={"model": name, **ROW}, timeout=30)
            assert r.status_code in (404, 503), r.text
            assert name in r.json()["error"]["message"]

        # a model added by hot reload that cannot be planned: listed, the router stays ready
        models_file.write_text("models:\n  - name: iris\n  - name: newcomer\n")
        eventually(lambda: "newcomer" in listed(url), timeout=30, what="newcomer listed")
        assert listed(url)["newcomer"]["ready"] is False
        assert httpx.get(f"{url}/readyz", timeout=5).status_code == 200

        # files that cannot be decoded: each reported once however often it changes, iris
        # keeps serving (item 12; each rewrite below is a reload, counted in /metrics)
        alias_file = home / "models" / "iris" / "servery-aliases.json"
        for path, bad, what in (
            (models_file, b"models:\n  - name: iris\xff\n", "model config"),
            (alias_file, b"\xff\xfe", "alias file"),
        ):
            for _ in range(3):
                before = reloads(url)
                path.write_bytes(bad)
                eventually(lambda b=before: reloads(url) > b, timeout=30, what=f"{what} reread")
                assert httpx.get(f"{url}/readyz", timeout=5).status_code == 200
                r = httpx.post(f"{url}/predict", json={"model": "iris", **ROW}, timeout=30)
                assert r.status_code == 200, r.text
            log = srv.log.read_text(errors="replace")
            # (the server's BENTOML_HOME links to the store: match the path's end)
            reported = logged_by(log, f"/{path.parent.name}/{path.name} is not UTF-8 text")
            # once per process that reads the file (the router, and the framework services
            # read the models file too); the old code logged a traceback at every poll
            assert "entry_service:router:1" in reported, log[-3000:]
            assert len(reported) == len(set(reported)), reported
            assert "Traceback" not in log, log[-3000:]
            if path == models_file:
                models_file.write_text("models:\n  - name: iris\n")
        alias_file.unlink()

        # the store gets the missing models and the file is fixed: all are served
        with bentoml_store(home):
            save_iris("ghost")
            save_iris("broken")
        models_file.write_text(VALID_CONFIG)
        with bentoml_store(home):
            save_iris("invalid")
        for name in ("ghost", "broken", "invalid"):
            eventually(
                lambda name=name: (
                    httpx.post(
                        f"{url}/predict", json={"model": name, **ROW}, timeout=30
                    ).status_code
                    == 200
                ),
                timeout=60,
                what=f"{name} served once it is in the store",
            )
        assert all(m["ready"] for m in listed(url).values())
    except Exception:
        print(srv.log_tail())
        raise
    finally:
        srv.stop()


def test_check_names_every_model_that_cannot_be_served(tmp_path: Path) -> None:
    from models.check import check

    home = store_of_three(tmp_path)
    config = tmp_path / "models.yaml"
    config.write_text(CONFIG[: CONFIG.index("  - name: invalid")])
    with bentoml_store(home):
        problems = check(str(config))
    assert len(problems) == 2, problems
    assert any("'ghost'" in p and "not in the model store" in p for p in problems)
    assert any("'broken'" in p and "cannot be loaded" in p for p in problems)
