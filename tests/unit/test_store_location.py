"""Which model store ``make``, ``training.ensure`` and the benchmarks use: BentoML's standard one.

``$BENTOML_HOME`` when set, else ``~/bentoml`` (BentoML's own default), the store a plain
``bentoml serve`` in the project root reads too; never a project-local ``./.bentoml``. Each test
points ``HOME`` at a temporary folder, so nothing here touches the developer's own store.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench.harness.results import use_model_store
from bench.harness.server import ROOT
from bench.harness.store import bentoml_store
from training.ensure import DEMOS

# What make passes on to a make started inside a recipe (`make test` runs pytest): a command-line
# BENTOML_HOME would reach the makes below through these and hide what the Makefile does itself.
MAKE_VARIABLES = ("BENTOML_HOME", "MAKEFLAGS", "MFLAGS", "MAKEOVERRIDES", "MAKELEVEL")


def _env(home: Path, **extra: str) -> dict[str, str]:
    """This process's environment with ``HOME=home``, without BENTOML_HOME (unless in extra)."""
    env = {k: v for k, v in os.environ.items() if k not in MAKE_VARIABLES}
    return env | {"HOME": str(home), "BENTOML_DO_NOT_TRACK": "True"} | extra


def _store_seen_by_make_recipes(home: Path, *args: str, **env: str) -> str:
    """The BentoML home that a Python started by a recipe of the project's Makefile resolves,
    with ``HOME=home`` and the given make arguments and environment."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    probe = (
        "servery-store-probe: ;"
        f" @{sys.executable} -c 'from models.store import store_home; print(store_home())'"
    )
    out = subprocess.run(
        ["make", "-s", "--no-print-directory", "--eval", probe, *args, "servery-store-probe"],
        cwd=ROOT,
        env=_env(home, **env),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return out.stdout.strip().splitlines()[-1]


def test_make_uses_bentomls_standard_store(tmp_path: Path) -> None:
    assert _store_seen_by_make_recipes(tmp_path) == str(tmp_path / "bentoml")


def test_make_keeps_the_bentoml_home_override(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    assert _store_seen_by_make_recipes(tmp_path, f"BENTOML_HOME={elsewhere}") == str(elsewhere)
    from_env = tmp_path / "from-env"
    assert _store_seen_by_make_recipes(tmp_path, BENTOML_HOME=str(from_env)) == str(from_env)


def test_no_make_target_names_a_project_local_store(tmp_path: Path) -> None:
    """The dry runs of the targets that touch the store mention no ``.bentoml`` folder."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    targets = ("serve", "models", "models-large", "models-llm", "test", "bench", "bench-overload")
    out = subprocess.run(
        ["make", "-n", "--no-print-directory", *targets],
        cwd=ROOT,
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert ".bentoml" not in out.stdout, out.stdout
    assert "training.ensure" in out.stdout and "bentoml serve services:Router" in out.stdout


@pytest.mark.parametrize("override", [False, True], ids=["standard", "BENTOML_HOME"])
def test_training_ensure_prints_the_store_it_uses(tmp_path: Path, override: bool) -> None:
    """``python -m training.ensure`` names the store: ``~/bentoml`` unless BENTOML_HOME is set.

    The demo models are already there (empty placeholders: ensure only looks their names up), so
    nothing is trained."""
    import bentoml

    bentoml_home = tmp_path / ("custom" if override else "home/bentoml")
    with bentoml_store(bentoml_home):
        for name in DEMOS:
            with bentoml.models.create(name):
                pass
    env = {"BENTOML_HOME": str(bentoml_home)} if override else {}
    out = subprocess.run(
        [sys.executable, "-m", "training.ensure", "--no-progress"],
        cwd=ROOT,
        env=_env(tmp_path / "home", **env),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    source = "$BENTOML_HOME" if override else "BentoML's default, ~/bentoml"
    assert f"model store: {bentoml_home / 'models'} ({source})\n" in out.stdout, out.stdout
    assert "all demo models present" in out.stdout, out.stdout


def test_benchmarks_use_the_standard_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("BENTOML_HOME", "recorded, so that teardown removes what is set below")
    monkeypatch.delenv("BENTOML_HOME")
    assert use_model_store() == tmp_path / "bentoml"
    assert os.environ["BENTOML_HOME"] == str(tmp_path / "bentoml")  # for the servers it starts
    monkeypatch.setenv("BENTOML_HOME", str(tmp_path / "mine"))
    assert use_model_store() == tmp_path / "mine"
