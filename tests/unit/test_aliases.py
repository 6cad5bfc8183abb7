"""models/aliases.py and ``servery models``: alias file, atomic writes, concurrency, rollback."""

from __future__ import annotations

import json
import multiprocessing
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.harness.store import bentoml_store, save_iris
from models import cli
from models.aliases import ALIAS_FILE, AliasError, AliasStore


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[AliasStore, list[str]]]:
    """A temporary store with three versions of a tiny iris model (oldest first)."""

    home = tmp_path_factory.mktemp("aliases") / "bentoml"
    with bentoml_store(home):
        versions = [save_iris(c=c) for c in (0.1, 1.0, 10.0)]
        yield AliasStore(home / "models"), versions


@pytest.fixture(autouse=True)
def fresh_aliases(store: tuple[AliasStore, list[str]]) -> None:
    aliases, _ = store
    aliases.path("iris").unlink(missing_ok=True)


def test_resolve_without_aliases_falls_back_to_latest(store) -> None:
    aliases, versions = store
    assert aliases.versions("iris") == versions
    assert aliases.resolve("iris") == (versions[-1], "latest")
    assert aliases.resolve("iris", versions[0]) == (versions[0], "version")
    assert aliases.resolve("iris", versions[0][:12]) == (versions[0], "version")


def test_promote_writes_the_documented_file(store) -> None:
    aliases, versions = store
    change = aliases.promote("iris", versions[0][:12], "staging")
    assert change["version"] == versions[0] and change["previous"] is None
    doc = json.loads(aliases.path("iris").read_text())
    assert doc["servery_aliases"] == 1
    assert doc["aliases"] == {"staging": versions[0]}
    assert doc["history"][0]["action"] == "promote"
    assert aliases.resolve("iris", "staging") == (versions[0], "alias:staging")
    aliases.promote("iris", versions[1])
    assert aliases.resolve("iris") == (versions[1], "alias:production")


def test_bentoml_ignores_the_alias_file(store) -> None:
    import bentoml

    aliases, versions = store
    aliases.promote("iris", versions[0])
    assert sorted(m.tag.version for m in bentoml.models.list("iris")) == sorted(versions)


def test_mistakes_are_refused_with_a_reason(store) -> None:
    aliases, versions = store
    with pytest.raises(AliasError, match="no model named 'nope'"):
        aliases.promote("nope", versions[0])
    with pytest.raises(AliasError, match="has no version 'zzz'"):
        aliases.promote("iris", "zzz")
    with pytest.raises(AliasError, match="ambiguous"):
        aliases.resolve_version("iris", "")
    for bad in ("latest", "Prod", "1st", "a/b", "x" * 64):
        with pytest.raises(AliasError, match="invalid alias"):
            aliases.promote("iris", versions[0], bad)
    with pytest.raises(AliasError, match="no promote of alias 'production'"):
        aliases.rollback("iris")
    aliases.path("iris").write_text("{not json")
    with pytest.raises(AliasError, match="not valid JSON"):
        aliases.read("iris")


def test_rollback_walks_back_through_promotes(store) -> None:
    aliases, (v0, v1, v2) = store
    for v in (v0, v1, v2):
        aliases.promote("iris", v)
    aliases.promote("iris", v0, "staging")  # another alias's history does not interfere
    assert aliases.rollback("iris")["version"] == v1
    assert aliases.rollback("iris")["version"] == v0
    change = aliases.rollback("iris")  # undoing the first promote removes the alias
    assert change["version"] is None and "production" not in aliases.read("iris").aliases
    with pytest.raises(AliasError):
        aliases.rollback("iris")
    assert aliases.read("iris").aliases == {"staging": v0}
    assert [h["action"] for h in aliases.read("iris").history].count("rollback") == 3


def test_a_crash_mid_write_leaves_the_old_file(store, monkeypatch) -> None:
    aliases, (v0, v1, _) = store
    aliases.promote("iris", v0)
    before = aliases.path("iris").read_text()

    def crash(*_: object) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk gone"):
        aliases.promote("iris", v1)
    monkeypatch.undo()
    assert aliases.path("iris").read_text() == before
    leftovers = [p.name for p in aliases.path("iris").parent.iterdir() if p.name != ALIAS_FILE]
    assert not any(n.startswith(f".{ALIAS_FILE}") for n in leftovers)


def _promote_many(models_dir: str, version: str, prefix: str, n: int) -> None:
    aliases = AliasStore(Path(models_dir))
    for i in range(n):
        aliases.promote("iris", version, f"{prefix}{i}")


def test_concurrent_promotes_from_two_processes_lose_nothing(store) -> None:
    aliases, (v0, v1, _) = store
    ctx = multiprocessing.get_context("fork")  # the children inherit the test's store
    procs = [
        ctx.Process(target=_promote_many, args=(str(aliases.models_dir), v, p, 25))
        for v, p in ((v0, "a"), (v1, "b"))
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    current = aliases.read("iris")
    assert len(current.aliases) == 50 and len(current.history) == 50
    assert {current.aliases[f"a{i}"] for i in range(25)} == {v0}
    assert {current.aliases[f"b{i}"] for i in range(25)} == {v1}


def test_cli_promote_show_rollback(store, capsys) -> None:
    aliases, (v0, v1, _) = store
    assert cli.main(["models", "promote", "iris", v0[:10], "--alias", "staging"]) == 0
    assert f"staging None -> {v0}" in capsys.readouterr().out
    assert cli.main(["models", "promote", "iris", v1]) == 0
    capsys.readouterr()
    assert cli.main(["models", "show", "iris", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["aliases"] == {"staging": v0, "production": v1}
    assert cli.main(["models", "list"]) == 0
    assert f"production -> {v1}" in capsys.readouterr().out
    assert cli.main(["models", "rollback", "iris"]) == 0
    assert "production" not in aliases.read("iris").aliases
    assert cli.main(["models", "promote", "iris", "nosuchversion"]) == 2
    assert "has no version 'nosuchversion'" in capsys.readouterr().err


def test_export_then_import_into_another_store_keeps_versions_and_aliases(store, tmp_path) -> None:
    from models.aliases import export_model, import_models

    aliases, (v0, v1, v2) = store
    aliases.promote("iris", v1)
    aliases.promote("iris", v0, "staging")
    written = export_model(aliases, "iris", tmp_path / "out")
    assert len(written) == 4 and written[-1].name == f"iris.{ALIAS_FILE}"
    with bentoml_store(tmp_path / "other") as home:
        other = AliasStore(home / "models")
        imported = import_models(other, tmp_path / "out")
        # archives are imported in file-name order; version ids do not sort by creation time
        assert sorted(imported["iris"]) == sorted([v0, v1, v2]) and list(imported) == ["iris"]
        assert other.versions("iris") == [v0, v1, v2]
        assert other.read("iris").aliases == {"production": v1, "staging": v0}
        assert other.resolve("iris") == (v1, "alias:production")
        # importing again: versions are kept, live aliases are never silently replaced
        with pytest.raises(AliasError, match="already has aliases"):
            import_models(other, tmp_path / "out")


def test_export_and_import_take_relative_folders(store, tmp_path, monkeypatch) -> None:
    """bentoml.models.export_model reads a relative path as one under "/": servery resolves it."""
    from models.aliases import export_model, import_models

    aliases, versions = store
    monkeypatch.chdir(tmp_path)
    written = export_model(aliases, "iris", "relative/out")
    assert all(p.is_file() and p.is_absolute() for p in written)
    assert (tmp_path / "relative" / "out").is_dir()
    with bentoml_store(tmp_path / "other") as home:
        assert sorted(import_models(AliasStore(home / "models"), "relative/out")["iris"]) == sorted(
            versions
        )


# --- damaged or hostile alias files (issue 20 items 12, 13) -----------------------------------


def test_an_alias_file_that_is_not_utf8_is_an_alias_error(store) -> None:
    aliases, _ = store
    aliases.path("iris").write_bytes(b'{"servery_aliases": 1, "aliases": {"\xff": "x"}}')
    with pytest.raises(AliasError, match="not UTF-8"):
        aliases.read("iris")


def valid_doc(version: str) -> dict:
    return {
        "servery_aliases": 1,
        "aliases": {"production": version},
        "history": [
            {
                "at": "2026-12-07T08:00:00+00:00",
                "action": "promote",
                "alias": "production",
                "version": version,
                "previous": None,
            }
        ],
    }


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d["history"].append("promote"), "history\\[1\\] is not an object"),
        (lambda d: d["history"][0].pop("alias"), "not a valid alias name"),
        (lambda d: d["history"][0].update(alias="../x"), "not a valid alias name"),
        (lambda d: d["history"][0].update(action="delete"), "action 'delete'"),
        (lambda d: d["history"][0].pop("at"), "'at' must be a time"),
        (lambda d: d["history"][0].update(version=None), "a promote names a version"),
        (lambda d: d["history"][0].update(version="../../x"), "version '../../x'"),
        (lambda d: d["history"][0].update(previous=7), "previous 7"),
        (
            lambda d: d["history"].append({**d["history"][0], "action": "rollback", "undoes": 5}),
            "'undoes' must index an earlier entry",
        ),
        (lambda d: d["aliases"].update(latest="abc"), "'latest' is not a valid alias"),
        (lambda d: d["aliases"].update(staging=["abc"]), "version \\['abc'\\]"),
    ],
)
def test_alias_history_entries_are_validated_when_read(store, edit, message: str) -> None:
    """``show`` and ``rollback`` read fields of every history entry: a damaged one was a
    KeyError traceback (or an alias pointing at '../../x')."""
    aliases, versions = store
    doc = valid_doc(versions[0])
    aliases.path("iris").write_text(json.dumps(doc))
    assert aliases.read("iris").aliases == {"production": versions[0]}
    edit(doc)
    aliases.path("iris").write_text(json.dumps(doc))
    with pytest.raises(AliasError, match=message):
        aliases.read("iris")


def test_damaged_history_is_one_line_from_the_cli(store, capsys) -> None:
    aliases, versions = store
    doc = valid_doc(versions[0])
    del doc["history"][0]["alias"]
    aliases.path("iris").write_text(json.dumps(doc))
    with bentoml_store(aliases.models_dir.parent):
        assert cli.main(["models", "show", "iris"]) == 2
    assert "not a valid alias name" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["..", ".", "a/b", "../iris", ""])
def test_the_store_refuses_names_that_are_not_model_names(store, name: str) -> None:
    aliases, versions = store
    with pytest.raises(AliasError, match="lowercase letters"):
        aliases.promote(name, versions[0])
    with pytest.raises(AliasError, match="lowercase letters"):
        aliases.read(name)
