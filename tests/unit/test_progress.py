"""Progress bars of the CLI's long operations (models/progress.py): the copy counts every byte and
copies exactly; bars show on a terminal's stderr only, never with --no-progress, never on stdout;
model export and import count their versions."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import pytest

from bench.harness.store import bentoml_store, save_iris
from models import cli, progress
from models.aliases import AliasStore, export_model, import_models


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class Recorder:
    """What a tqdm bar was told."""

    def __init__(self) -> None:
        self.total: int | None = None
        self.n = 0
        self.names: list[str] = []

    def reset(self, total: int) -> None:
        self.total, self.n = total, 0

    def update(self, n: int) -> None:
        self.n += n

    def set_postfix_str(self, text: str, refresh: bool = True) -> None:
        self.names.append(text)


def test_copy_tree_counts_every_byte_and_copies_exactly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(progress, "CHUNK", 1000)  # several updates per file
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    files = {"a.bin": os.urandom(4500), "sub/b.json": b"{}", "empty": b""}
    for name, data in files.items():
        (src / name).write_bytes(data)
    os.symlink("a.bin", src / "link")
    counted = Recorder()
    progress.copy_tree(src, tmp_path / "dst", counted)
    # a link is copied as the file it points to, as copytree does (Hugging Face caches)
    assert counted.n == progress.tree_bytes(src) == 2 * 4500 + 2
    for name, data in {**files, "link": files["a.bin"]}.items():
        assert (tmp_path / "dst" / name).read_bytes() == data
    assert (tmp_path / "dst" / "a.bin").stat().st_mtime == (src / "a.bin").stat().st_mtime


def test_bars_show_on_a_terminal_only_and_never_with_no_progress(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def drawn(off: bool) -> str:
        with progress.bar(total=3, unit="x", desc="work", off=off) as b:
            b.update(3)
        return err.getvalue()

    err: io.StringIO = Terminal()
    monkeypatch.setattr("sys.stderr", err)
    assert "work" in drawn(off=False) and "3/3" in err.getvalue()
    err = Terminal()
    monkeypatch.setattr("sys.stderr", err)
    assert drawn(off=True) == ""
    err = io.StringIO()  # a pipe or a log file
    monkeypatch.setattr("sys.stderr", err)
    assert drawn(off=False) == ""


def test_export_and_import_count_their_versions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with bentoml_store(tmp_path / "a") as home:
        versions = [save_iris(), save_iris(c=0.5)]
        exported = Recorder()
        export_model(AliasStore(home / "models"), "iris", tmp_path / "out", exported)
        assert exported.total == exported.n == 2 and sorted(exported.names) == sorted(versions)
    with bentoml_store(tmp_path / "b") as home:
        imported = Recorder()
        import_models(AliasStore(home / "models"), tmp_path / "out", imported)
        assert imported.total == imported.n == 2
        # again: every archive is skipped (versions kept), and still counted
        again = Recorder()
        import_models(AliasStore(home / "models"), tmp_path / "out", again)
        assert again.n == 2
        # the command: the bar on stderr (a terminal), the result alone on stdout
        terminal = Terminal()
        monkeypatch.setattr("sys.stderr", terminal)
        assert cli.main(["models", "export", "iris", str(tmp_path / "out2"), "--json"]) == 0
        written: Any = json.loads(capsys.readouterr().out)
        assert len(written) == 3
        assert "exporting" in terminal.getvalue() and "2/2" in terminal.getvalue()
        assert cli.main(["models", "import", str(tmp_path / "out2"), "--no-progress"]) == 0
