"""MLServer 1.7 as a peer server: its own venv, our stored models in its repository, start, stop.

MLServer lives in ``.venv-mlserver`` (Python 3.11) so its pins (fastapi < 0.116, pandas, ...)
never touch ours. Install workarounds (docs/internals/stack.md): ``mlserver-xgboost`` goes in
``--no-deps`` next
to ``xgboost-cpu`` (its ``xgboost`` requirement pulls the CUDA/NCCL wheel) and ``uvloop<0.22``
(0.23 crashes its workers at start). scikit-learn, joblib and xgboost are pinned to the versions of
the interpreter running this module, so the pickled/serialised models load identically.

A repository serves sklearn models (``mlserver_sklearn.SKLearnModel``) and XGBoost models
(``mlserver_xgboost.XGBoostModel``) from $BENTOML_HOME with adaptive batching ``max_batch_size
64`` / ``max_batch_time 0.01``. PyTorch models have no MLServer runtime installed here and are
skipped. Used by :mod:`bench.studies.peers` and :mod:`bench.studies.mlserver_peer`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import httpx

from bench.harness.server import ROOT, ServerProcess, free_port, launch

VENV = ROOT / ".venv-mlserver"
STAMP = VENV / ".servery-peer-installed"
DEFAULT_MODELS = ("iris", "breast_cancer_large")
IMPLEMENTATIONS = {
    "sklearn": ("mlserver_sklearn.SKLearnModel", "model.joblib"),
    "xgboost": ("mlserver_xgboost.XGBoostModel", "model.ubj"),  # also accepts .json / .bst
}
# pip check's one expected complaint: xgboost-cpu provides `import xgboost` under another name.
EXPECTED_PIP_CHECK = "requires xgboost, which is not installed."


def requirements() -> tuple[list[str], list[str]]:
    """(installed with deps, installed ``--no-deps``): MLServer 1.7 and our model libraries."""
    pinned = [f"{d}=={version(d)}" for d in ("scikit-learn", "joblib", "xgboost-cpu")]
    main = ["mlserver>=1.7,<1.8", "mlserver-sklearn>=1.7,<1.8", "uvloop<0.22", *pinned]
    return main, ["mlserver-xgboost>=1.7,<1.8"]


def pip_check(venv: Path = VENV) -> list[str]:
    """``pip check`` problems in ``venv`` other than the expected xgboost-cpu naming one."""
    out = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "check"], capture_output=True, text=True
    ).stdout
    return [
        line
        for line in out.splitlines()
        if line.strip()
        and not (line.startswith("mlserver-xgboost ") and line.endswith(EXPECTED_PIP_CHECK))
    ]


def setup(python: str = "python3.11", venv: Path = VENV) -> Path:
    """Create ``venv`` with MLServer installed; a no-op when its stamp matches the requirements."""
    main, no_deps = requirements()
    stamp_text = json.dumps({"main": main, "no_deps": no_deps})
    stamp = venv / STAMP.name
    if stamp.is_file() and stamp.read_text() == stamp_text:
        return venv
    start = time.monotonic()
    if not (venv / "bin" / "python").exists():
        subprocess.run([python, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    subprocess.run([*pip, *main], check=True)
    subprocess.run([*pip, "--no-deps", *no_deps], check=True)
    stamp.write_text(stamp_text)
    print(f"installed MLServer into {venv} in {time.monotonic() - start:.0f} s", flush=True)
    return venv


def export_model(name: str, dest: Path) -> dict[str, Any] | None:
    """Write ``dest/<name>/`` (model file + ``model-settings.json``); None for PyTorch models.

    Our XGBoost models are raw boosters (no scikit-learn attributes): MLServer would load one as
    an ``XGBRegressor`` whose ``predict`` returns P(class 1) and which refuses ``predict_proba``.
    Re-saving the same trees through ``XGBClassifier`` adds ``_estimator_type: classifier``, so
    MLServer answers ``predict`` with labels and ``predict_proba`` like our server.
    """
    from models.formats import framework_of
    from models.store import MODEL_FILES, get_model

    bento_model = get_model(f"{name}:latest")
    framework = framework_of(bento_model)
    if framework.value not in IMPLEMENTATIONS:
        return None
    implementation, filename = IMPLEMENTATIONS[framework.value]
    folder = dest / name
    folder.mkdir(parents=True, exist_ok=True)
    source = bento_model.path_of(MODEL_FILES[framework])
    if framework.value == "xgboost":
        import xgboost as xgb

        classifier = xgb.XGBClassifier()
        classifier.load_model(source)
        classifier.save_model(folder / filename)
    else:
        shutil.copyfile(source, folder / filename)
    settings = {
        "name": name,
        "implementation": implementation,
        "parameters": {"uri": f"./{filename}", "version": str(bento_model.tag.version)},
        "max_batch_size": 64,
        "max_batch_time": 0.01,
    }
    (folder / "model-settings.json").write_text(json.dumps(settings, indent=2) + "\n")
    return settings


def write_server_settings(dest: Path) -> dict[str, Any]:
    """(Re)write ``dest/settings.json`` on fresh free loopback ports; returns the settings."""
    settings = {
        "debug": False,  # True logs every request
        "parallel_workers": 0,  # beat 1 on 2 cores (docs/internals/stack.md)
        "host": "127.0.0.1",
        "http_port": free_port(),
        "grpc_port": free_port(),
        "metrics_endpoint": "/metrics",
        "metrics_port": free_port(),
        "metrics_dir": str(dest / ".metrics"),
        "environments_dir": str(dest / ".envs"),
    }
    (dest / "settings.json").write_text(json.dumps(settings, indent=2) + "\n")
    return settings


def prepare_repository(models: Sequence[str], dest: Path) -> list[str]:
    """Export ``models`` from the store into an MLServer repository at ``dest``; served names."""
    dest.mkdir(parents=True, exist_ok=True)
    served = []
    for name in models:
        if export_model(name, dest) is None:
            print(f"skipping {name}: no MLServer runtime for PyTorch here", flush=True)
        else:
            served.append(name)
    write_server_settings(dest)
    return served


@dataclass
class MLServer(ServerProcess):
    """A running ``mlserver start`` (own process group); ``url`` REST, ``grpc_url`` gRPC."""

    grpc_url: str = ""
    metrics_url: str = ""


def start_mlserver(repo: Path, venv: Path = VENV, ready_timeout: float = 120) -> MLServer:
    """Start ``mlserver start repo`` on fresh free ports and wait until every model is ready."""
    settings = write_server_settings(repo)
    models = [p.parent.name for p in repo.glob("*/model-settings.json")]
    log = repo / f"mlserver-{settings['http_port']}.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLSERVER_", "VIRTUAL_ENV"))}
    proc = launch([str(venv / "bin" / "mlserver"), "start", str(repo)], cwd=repo, env=env, log=log)
    server = MLServer(
        url=f"http://127.0.0.1:{settings['http_port']}",
        grpc_url=f"127.0.0.1:{settings['grpc_port']}",
        metrics_url=f"http://127.0.0.1:{settings['metrics_port']}{settings['metrics_endpoint']}",
        proc=proc,
        log=log,
    )
    paths = ["/v2/health/ready", *(f"/v2/models/{m}/ready" for m in models)]
    server.wait_ready(
        lambda: all(httpx.get(server.url + p, timeout=2).status_code == 200 for p in paths),
        ready_timeout,
        "mlserver",
    )
    return server


@contextlib.contextmanager
def running(repo: Path) -> Iterator[MLServer]:
    """MLServer on ``repo`` for the ``with`` block; always stopped afterwards."""
    server = start_mlserver(repo)
    try:
        yield server
    finally:
        server.stop()
