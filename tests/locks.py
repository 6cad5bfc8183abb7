"""The lock files ``make lock`` writes (requirements-*.txt) and what pyproject.toml asks of them.

Used by tests/unit/test_locks.py (the locks against pyproject and the installed venv) and
tests/integration/test_bento_build.py (the Bento installs exactly a runtime lock).

A lock is a universal ``uv pip compile`` output: one ``name==version ; marker`` line per package
and platform fork, comments, no options. :func:`pins` evaluates the markers for one environment
(this interpreter by default, or :func:`linux` for a chosen Python) and returns one exact version
per package.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import NormalizedName, canonicalize_name
from packaging.version import Version

from bench.harness.server import ROOT

_NOWHERE = "http://127.0.0.1:9"
OFFLINE = {
    **{k: _NOWHERE for k in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")},
    **{k.lower(): _NOWHERE for k in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")},
    "NO_PROXY": "",
    "no_proxy": "",
    "UV_OFFLINE": "1",
    "PIP_NO_INDEX": "1",
    "HF_HUB_OFFLINE": "1",
}
"""Environment for a ``bentoml build`` that must not reach a network (test_image_build,
test_bento_build): every proxy variable points at a closed port, and uv, pip and the Hugging Face
hub are told to stay offline."""

RUNTIME = {"cpu": ROOT / "requirements-cpu.txt", "gpu": ROOT / "requirements-gpu.txt"}
"""The Bento's locks (bentofile.yaml, bentofile.gpu.yaml)."""
DEV = {"cpu": ROOT / "requirements-dev-cpu.txt", "gpu": ROOT / "requirements-dev-gpu.txt"}
"""What ``make`` (``BUILD=cpu|gpu``) installs: the runtime lock plus the tooling."""
TOOLING_EXTRAS = ("train", "bench", "test", "lint")
"""pyproject extras that are development tooling (``dev`` is their union), never in the Bento."""


def linux(python: str) -> dict[str, str]:
    """A marker environment: CPython ``python`` (e.g. "3.12") on Linux x86_64."""
    env = default_environment()
    env.update(
        python_version=python,
        python_full_version=f"{python}.0",
        sys_platform="linux",
        platform_system="Linux",
        platform_machine="x86_64",
        os_name="posix",
        implementation_name="cpython",
        platform_python_implementation="CPython",
    )
    return env


def requirements(path: Path) -> list[Requirement]:
    """Every requirement line of lock ``path`` (comments and blank lines skipped)."""
    out = []
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        assert not line.startswith("-"), f"{path.name}: an option line in a lock: {raw!r}"
        out.append(Requirement(line))
    return out


def pins(path: Path, env: dict[str, str] | None = None) -> dict[NormalizedName, Version]:
    """The exact version of each package lock ``path`` installs in ``env`` (default: here)."""
    out: dict[NormalizedName, Version] = {}
    for req in requirements(path):
        if req.marker is not None and not req.marker.evaluate(env or default_environment()):
            continue
        (spec,) = req.specifier
        assert spec.operator == "==", f"{path.name}: {req} is not an exact pin"
        name = canonicalize_name(req.name)
        assert name not in out, f"{path.name}: two versions of {name} for one environment"
        out[name] = Version(spec.version)
    return out


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def declared(*extras: str) -> list[Requirement]:
    """pyproject's dependencies plus those of ``extras``, with ``servery[...]`` expanded."""
    project = pyproject()["project"]
    optional = project["optional-dependencies"]
    out = [Requirement(d) for d in project["dependencies"]]
    todo, seen = list(extras), set()
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for dep in map(Requirement, optional[extra]):
            if canonicalize_name(dep.name) == "servery":
                todo.extend(dep.extras)
            else:
                out.append(dep)
    return out
