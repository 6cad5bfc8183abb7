"""The architecture holds: no import cycles, the layers import one way, importing has no side
effects (issue 18). The contracts live in pyproject.toml ([tool.importlinter]) and are checked
by import-linter over services/, models/, training/ and bench/, imports inside functions
included."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def lint_imports(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env={"PYTHONPATH": str(cwd), "PATH": "/usr/bin:/bin"},
    )


def test_the_import_contracts_hold() -> None:
    out = lint_imports(ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "broken" in out.stdout and "0 broken" in out.stdout, out.stdout


def test_a_cycle_breaks_the_contract(tmp_path: Path) -> None:
    """The check can fail: a cycle through a function-level import is found."""
    pkg = tmp_path / "loopy"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from loopy import b\n")
    (pkg / "b.py").write_text("def late():\n    from loopy import a\n")
    (tmp_path / ".importlinter").write_text(
        textwrap.dedent(
            """\
            [importlinter]
            root_package = loopy

            [importlinter:contract:1]
            name = no cycles
            type = acyclic_siblings
            ancestors = loopy
            """
        )
    )
    out = lint_imports(tmp_path)
    assert out.returncode != 0, out.stdout
    assert "loopy" in out.stdout and "1 broken" in out.stdout, out.stdout


def test_importing_a_module_builds_no_app() -> None:
    """Only the Bento entry (``services.Router`` and the other services) wires a process: a unit
    test importing the batcher or the registry gets no app, no BentoML and no patches."""
    code = textwrap.dedent(
        """\
        import sys
        import services.runtime.batcher, services.runtime.registry, services.runtime.inference
        import services.protocols.oip.core, services.compat
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("bentoml", "_bentoml_impl")
                        or m.startswith(("services.gateway", "services.frameworks",
                        "services.llm")))
        print(loaded)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout
