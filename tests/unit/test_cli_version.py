"""``servery --version``: the versions a bug report needs, without a subcommand."""

from __future__ import annotations

from importlib.metadata import version

import pytest

from models.cli import main


def test_version_prints_servery_and_bentoml_versions(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"servery {version('servery')} (bentoml {version('bentoml')}, Python ")
