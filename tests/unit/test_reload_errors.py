"""Reload and start-up with files that cannot be used (issue 20 items 7, 12): a process starts
and serves what it can, an unusable models or alias file is reported once per distinct error and
the last good state keeps serving (services/runtime/reload.py, services/runtime/loader.py)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.harness.store import bentoml_store, save_iris
from models.aliases import AliasStore
from models.config import Settings
from services.runtime.loader import Loader
from services.runtime.reload import DesiredWatch, poll

NOT_UTF8 = b"models:\n  - name: iris\xff\n"


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    home = tmp_path_factory.mktemp("reload-errors") / "bentoml"
    with bentoml_store(home):
        save_iris()
        yield home


def errors_logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def test_watch_starts_with_an_unusable_file_and_reports_each_error_once(
    home: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    models = tmp_path / "models.yaml"
    models.write_bytes(NOT_UTF8)
    watch = DesiredWatch(models, AliasStore(home / "models"))
    with caplog.at_level(logging.ERROR, "servery"):
        state = watch.first()  # raised before: the process exited, and was restarted in a loop
    assert state.plans == {} and "not UTF-8" in (state.config_error or "")
    assert len(errors_logged(caplog)) == 1

    async def reads() -> None:
        for content in (NOT_UTF8, NOT_UTF8 + b"# touched\n", b"models: [\n"):
            models.write_bytes(content)
            assert watch.changed()
            with pytest.raises(ValueError):
                await watch.read()
            assert not watch.changed()  # settled: not re-read at every poll

    caplog.clear()
    with caplog.at_level(logging.ERROR, "servery"):
        asyncio.run(reads())
    logged = errors_logged(caplog)
    # the same file, touched or not, fails the way it did at start: not logged again
    assert len(logged) == 1 and "not valid YAML" in logged[0], logged


def test_poll_logs_a_repeated_failure_once(caplog: pytest.LogCaptureFixture) -> None:
    ticks = [ValueError("a"), ValueError("a"), ValueError("a"), None, ValueError("a"), KeyError(1)]

    async def tick() -> None:
        error = ticks.pop(0) if ticks else None
        if not ticks:
            raise asyncio.CancelledError
        if error is not None:
            raise error

    with caplog.at_level(logging.ERROR, "servery"), contextlib.suppress(asyncio.CancelledError):
        asyncio.run(poll(0, tick, "reload failed"))
    tracebacks = [r for r in caplog.records if r.exc_info]
    # a, (a, a: same), success, a again, then a new error
    assert [str(r.exc_info[1]) for r in tracebacks] == ["a", "a"]


def loader(home: Path, models: Path) -> Loader:
    return Loader(Settings(), remote={}, models_file=models, aliases=AliasStore(home / "models"))


def test_a_router_starting_with_an_invalid_file_serves_its_valid_entries(
    home: Path, tmp_path: Path
) -> None:
    models = tmp_path / "models.yaml"
    models.write_text("models:\n  - name: iris\n  - name: bad\n    max_queue: 0\n")
    registry = loader(home, models).initial()  # raised ConfigError before
    assert registry.names() == ["iris"] and registry.ready()
    listed = {m["name"]: m for m in registry.describe()}
    assert listed["bad"]["ready"] is False and "max_queue" in listed["bad"]["error"]
    assert registry.last_reload["ok"] is False


def test_a_router_starting_with_an_unusable_file_serves_nothing_then_the_fixed_file(
    home: Path, tmp_path: Path
) -> None:
    models = tmp_path / "models.yaml"
    models.write_bytes(NOT_UTF8)
    registry = loader(home, models).initial()
    assert len(registry) == 0 and not registry.ready()
    assert "not UTF-8" in registry.last_reload["error"]
    models.write_text("models:\n  - name: iris\n")
    report = asyncio.run(registry.reload())
    assert report["ok"] and registry.names() == ["iris"] and registry.ready()


def test_an_undecodable_alias_file_keeps_the_model_served(
    home: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    models = tmp_path / "models.yaml"
    models.write_text("models:\n  - name: iris\n")
    store = AliasStore(home / "models")
    registry = loader(home, models).initial()
    before = registry.get("iris")
    try:
        store.path("iris").write_bytes(b"\xff\xfe not json")
        with caplog.at_level(logging.ERROR, "servery"):
            for _ in range(3):  # the poll would call this every interval while it changed
                asyncio.run(registry.reload())
        assert registry.get("iris") is before and registry.ready()
        assert "not UTF-8" in " ".join(registry.describe_model("iris")["warnings"])
        planned = [m for m in errors_logged(caplog) if "cannot be planned" in m]
        assert len(planned) == 1, planned
    finally:
        store.path("iris").unlink(missing_ok=True)


def test_a_model_added_by_reload_that_cannot_be_served_leaves_the_router_ready(
    home: Path, tmp_path: Path
) -> None:
    models = tmp_path / "models.yaml"
    models.write_text("models:\n  - name: iris\n")
    registry = loader(home, models).initial()
    assert registry.ready()
    models.write_text("models:\n  - name: iris\n  - name: ghost\n")
    report = asyncio.run(registry.reload())
    assert not report["ok"] and "ghost" in report["errors"]
    assert registry.ready()  # was False: every replica dropped out of the Service
    listed = {m["name"]: m for m in registry.describe()}
    assert listed["ghost"]["ready"] is False and listed["iris"]["ready"] is True
