"""The model lifecycle walkthrough (docs/models-and-versions.md), step by step, against a real
``bentoml serve``.

train (``python -m training.iris``) → promote today's version → train again → canary (staging
alias + a routing table added to the models file while serving) → promote → rollback, with the
``servery`` console script for every store change, as a user types them. Nothing restarts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx

from bench.harness.server import ROOT, start_server
from tests.conftest import on_every_router_worker

ROW = [[5.1, 3.5, 1.4, 0.2]]
SERVERY = Path(sys.executable).with_name("servery")


def run(home: Path, *cmd: str) -> str:
    env = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "True"}
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"{cmd}: {out.stderr}"
    return out.stdout


def servery(home: Path, *args: str) -> dict:
    return json.loads(run(home, str(SERVERY), "models", *args, "--json"))


def test_readme_lifecycle(tmp_path: Path) -> None:
    home = tmp_path / "bentoml"
    run(home, sys.executable, "-m", "training.iris", "--no-progress")
    today = servery(home, "show", "iris")["latest"]

    models_file = tmp_path / "serve" / "models.yaml"
    server = start_server(
        home,
        "models:\n  - name: iris\n",
        tmp_path / "serve",
        env={"SERVERY_RELOAD_INTERVAL_S": "0.5"},
    )
    client = httpx.Client(base_url=server.url, timeout=30)

    def predict(c: httpx.Client = client, **extra: object) -> dict:
        r = c.post("/predict", json={"model": "iris", "inputs": ROW, **extra})
        assert r.status_code == 200, r.text
        return r.json()

    try:
        # 0. pin what serves today
        assert predict()["routed_by"] == "latest"
        assert servery(home, "promote", "iris", today)["version"] == today
        on_every_router_worker(
            server, lambda c: predict(c)["routed_by"] == "alias:production", "production pinned"
        )

        # 1. train and save a new version: it is served (pinnable) but not the default
        run(home, sys.executable, "-m", "training.iris", "--seed", "1", "--no-progress")
        new = servery(home, "show", "iris")["latest"]
        assert new != today
        on_every_router_worker(
            server, lambda c: predict(c, version="latest")["version"] == new, "the new version"
        )
        assert predict()["version"] == today

        # 2. canary: staging alias + a routing table in the models file, no restart
        servery(home, "promote", "iris", new, "--alias", "staging")
        models_file.write_text(
            "models:\n  - name: iris\n    routing:\n      split: {production: 90, staging: 10}\n"
        )
        on_every_router_worker(
            server, lambda c: len(c.get("/models/iris").json()["routing"]["split"]) == 2, "split"
        )
        seen = [predict() for _ in range(400)]
        share = sum(b["version"] == new for b in seen) / len(seen)
        assert 0.04 <= share <= 0.18, share  # 10 % +- 3 binomial sd
        assert {b["routed_by"] for b in seen} == {"split:production", "split:staging"}
        key = {"X-Servery-Route-Key": "customer-17"}
        sticky = {
            client.post("/predict", json={"model": "iris", "inputs": ROW}, headers=key).json()[
                "version"
            ]
            for _ in range(20)
        }
        assert len(sticky) == 1

        # 3. promote: both sides of the split now point at the new version
        servery(home, "promote", "iris", new)
        on_every_router_worker(
            server, lambda c: predict(c, version="production")["version"] == new, "promoted"
        )
        assert predict()["version"] == new

        # 4. rollback: production back to today's version
        back = servery(home, "rollback", "iris")
        assert back["version"] == today
        on_every_router_worker(
            server, lambda c: predict(c, version="production")["version"] == today, "rolled back"
        )
        answers = [predict() for _ in range(50)]
        assert all(b["version"] == today for b in answers if b["routed_by"] == "split:production")
        history = servery(home, "show", "iris")["history"]
        assert [h["action"] for h in history] == ["promote", "promote", "promote", "rollback"]
    finally:
        client.close()
        server.stop()
