"""models/archives.py and ``servery models import``: archives are checked member by member with
tarfile's ``data`` filter, and names from file names are validated (issue 20 items 13, 14)."""

from __future__ import annotations

import io
import json
import re
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from bench.harness.store import bentoml_store, save_iris
from models import cli
from models.aliases import ALIAS_FILE, AliasError, AliasStore, export_model, import_models
from models.archives import ArchiveError, extract


def member(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"x", link: str = "") -> tuple:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    if kind == tarfile.CHRTYPE:
        info.devmajor, info.devminor = 1, 3  # /dev/null
    return info, data


def write_tar(path: Path, members: list[tuple], mode: str = "w:xz") -> Path:
    with tarfile.open(path, mode) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.type == tarfile.REGTYPE else None)
    return path


HOSTILE: dict[str, Callable[[Path], list[tuple]]] = {
    "parent": lambda tmp: [member("model.yaml"), member("../escaped")],
    "absolute": lambda tmp: [member(f"{tmp}/absolute-escape")],
    "deep_parent": lambda tmp: [member("a/b/../../../escaped")],
    "symlink_out": lambda tmp: [member("link", tarfile.SYMTYPE, link="../../etc/passwd")],
    "absolute_symlink": lambda tmp: [member("link", tarfile.SYMTYPE, link="/etc/passwd")],
    "hardlink_out": lambda tmp: [member("hard", tarfile.LNKTYPE, link="../escaped")],
    "device": lambda tmp: [member("null", tarfile.CHRTYPE)],
    "fifo": lambda tmp: [member("pipe", tarfile.FIFOTYPE)],
    # a link inside the tree, then a file written through it: lands outside
    "through_link": lambda tmp: [
        member("d", tarfile.SYMTYPE, link=".."),
        member("d/escaped"),
    ],
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_members_are_refused_and_nothing_is_written(tmp_path: Path, case: str) -> None:
    archive = write_tar(tmp_path / "in.bentomodel", HOSTILE[case](tmp_path))
    dest = tmp_path / "box" / "out"
    before = set(tmp_path.rglob("*"))
    with pytest.raises(ArchiveError, match="refused"):
        extract(archive, dest)
    assert set(tmp_path.rglob("*")) == before


def test_a_plain_archive_extracts_with_links_inside_the_tree(tmp_path: Path) -> None:
    archive = write_tar(
        tmp_path / "ok.tar.gz",
        [member("model.yaml", data=b"a: 1\n"), member("alias", tarfile.SYMTYPE, link="model.yaml")],
        "w:gz",
    )
    out = extract(archive, tmp_path / "out")
    assert (out / "alias").read_text() == "a: 1\n"


def test_a_damaged_archive_is_an_archive_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.bentomodel"
    bad.write_bytes(b"\xfd7zXZ\x00 truncated")
    with pytest.raises(ArchiveError, match="not a readable tar archive"):
        extract(bad, tmp_path / "out")


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """An export of one iris version (what ``servery models export`` writes)."""
    home = tmp_path_factory.mktemp("archives") / "bentoml"
    out = tmp_path_factory.mktemp("export")
    with bentoml_store(home):
        version = save_iris()
        export_model(AliasStore(home / "models"), "iris", out)
    return out, version


def test_import_refuses_an_archive_with_a_traversal_member(exported, tmp_path: Path, capsys):
    out, version = exported
    src = tmp_path / "src"
    src.mkdir()
    # the real archive's members plus one that climbs out of the extraction folder
    with tarfile.open(out / f"iris-{version}.bentomodel") as tar:
        members = [(m, tar.extractfile(m).read() if m.isfile() else b"") for m in tar]
    members.append(member("../../../../escaped-by-import"))
    write_tar(src / f"iris-{version}.bentomodel", members)
    with bentoml_store(tmp_path / "other") as home:
        with pytest.raises(ArchiveError, match="escaped-by-import"):
            import_models(AliasStore(home / "models"), src)
        assert AliasStore(home / "models").versions("iris") == []
        assert cli.main(["models", "import", str(src)]) == 2
        assert "refused" in capsys.readouterr().err
    assert not list(tmp_path.rglob("escaped-by-import"))


def test_import_takes_the_model_name_from_the_archive_not_the_file_name(exported, tmp_path):
    out, version = exported
    src = tmp_path / "src"
    src.mkdir()
    (src / "..-whatever.bentomodel").write_bytes((out / f"iris-{version}.bentomodel").read_bytes())
    with bentoml_store(tmp_path / "other") as home:
        assert import_models(AliasStore(home / "models"), src) == {"iris": [version]}


def test_import_refuses_an_alias_file_whose_name_is_not_a_model_name(exported, tmp_path) -> None:
    """``...servery-aliases.json`` names the model ``..``: it used to write
    ``$BENTOML_HOME/servery-aliases.json``, outside the store's model folders."""
    _, version = exported
    src = tmp_path / "src"
    src.mkdir()
    doc = {"servery_aliases": 1, "aliases": {"production": version}, "history": []}
    (src / f"...{ALIAS_FILE}").write_text(json.dumps(doc))
    with bentoml_store(tmp_path / "other") as home:
        with pytest.raises(AliasError, match=re.escape("model name '..'")):
            import_models(AliasStore(home / "models"), src)
        assert not (home / ALIAS_FILE).exists() and not (home / "models" / ALIAS_FILE).exists()
