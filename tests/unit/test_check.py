"""models.check: the preflight that `make serve` runs before `bentoml serve`."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.harness.store import bentoml_store
from models.check import check, main
from training import iris


@pytest.fixture
def store_with_iris(tmp_path: Path):
    with bentoml_store(tmp_path / "bentoml") as home:
        iris.save(iris.train(progress=False))
        yield home


def config(tmp_path: Path, text: str) -> str:
    path = tmp_path / "models.yaml"
    path.write_text(text)
    return str(path)


def test_resolved_config_has_no_problems(store_with_iris, tmp_path, capsys) -> None:
    assert check(config(tmp_path, "models:\n  - name: iris\n")) == []
    out = capsys.readouterr().out
    assert "iris:" in out and "sklearn" in out and "inline" in out


def test_missing_model_is_one_clear_problem(store_with_iris, tmp_path) -> None:
    problems = check(config(tmp_path, "models:\n  - name: iris\n  - name: ghost\n"))
    assert problems == ["model 'ghost': model 'ghost:latest' is not in the model store"]


def test_bad_config_and_exit_code(store_with_iris, tmp_path, capsys) -> None:
    assert main([config(tmp_path, "models: []\n")]) == 1
    err = capsys.readouterr().err
    assert "invalid model config" in err and "make models" in err
    assert main([config(tmp_path, "models:\n  - name: iris\n")]) == 0
