"""The Bento's container image, built and run as the pods run it (`make image`, `make image-smoke`).

``deploy/image/image.sh build`` builds the CPU image with podman (state in podman-state/, layers
cached between runs). One container then runs it like deploy/'s router pod: host networking on free
ports, the read-only image as user ``bentoml``, ``BENTOML_HOME`` on a scratch mount and a model
store mounted read-only at ``$BENTOML_HOME/models`` and over the Bento's ``models/``. The store
holds the demo classifiers and the tiny LLM (training/tiny_llm.py, random weights, ready in
seconds: this checks the image's LLM path, not answers). Every request goes to the container.

Skipped only where podman cannot run here at all: the script's exit status 77 says why (podman
not installable, no runtime, or less free disk than a build needs, with both numbers). A build
that fails otherwise fails the test.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shlex
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest
import tritonclient.grpc as tg
import yaml
from packaging.utils import canonicalize_name

from bench.harness.server import ROOT, free_port
from tests import locks
from tests.integration.conftest import DEMOS, dataset

# The first test's budget includes the module's fixtures: a cold build (base image and the whole
# install, ~6 min on 2 quiet cores, far more on a loaded machine) and the container's start.
pytestmark = pytest.mark.timeout(2400)

SCRIPT = ROOT / "deploy" / "image" / "image.sh"
CANNOT_RUN = 77  # image.sh: podman cannot run here
STORE = "/srv/bentoml"  # BENTOML_HOME in the pods (deploy/base/router-deployment.yaml)
BENTO_MODELS = "/home/bentoml/bento/models"
GRACE_S = 30
READY_S = 300
# the bentofile's SERVERY_IMAGE_TRIM: what the image leaves out of the lock
TRIM = next(
    e["value"].split(",")
    for e in yaml.safe_load((ROOT / "bentofile.yaml").read_text())["envs"]
    if e["name"] == "SERVERY_IMAGE_TRIM"
)


def podman_env() -> dict[str, str]:
    """The environment that points podman at the project's podman-state/ (``image.sh env``)."""
    out = subprocess.run(
        ["bash", str(SCRIPT), "env"], capture_output=True, text=True, check=True
    ).stdout
    env = dict(os.environ)
    for word in shlex.split(out.strip().removeprefix("export ")):
        key, _, value = word.partition("=")
        env[key] = value
    return env


def podman(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(
        ["podman", *args], env=podman_env(), capture_output=True, text=True, timeout=timeout
    )
    if check:
        assert done.returncode == 0, f"podman {' '.join(args)}: {done.returncode}\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The image reference ``image.sh build`` printed last. Its Bento goes to a scratch home."""
    home = tmp_path_factory.mktemp("image-build") / "bentoml"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SERVERY_")}
    env |= {"BENTOML_HOME": str(home), "IMAGE": "servery:test-cpu"}
    t0 = time.monotonic()
    done = subprocess.run(
        ["bash", str(SCRIPT), "build"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    if done.returncode == CANNOT_RUN:
        pytest.skip(done.stderr.strip().splitlines()[-1])
    assert done.returncode == 0, f"image.sh build: {done.returncode}\n{done.stderr[-6000:]}"
    print(f"image built in {time.monotonic() - t0:.0f} s")
    return done.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def store(
    demo_store: Path, tiny_llm_store: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """The demo classifiers and the tiny LLM in one store the container's user may read."""
    models = tmp_path_factory.mktemp("image-store") / "models"
    shutil.copytree(demo_store / "models", models)
    shutil.copytree(tiny_llm_store[0] / "models", models, dirs_exist_ok=True)
    for path in [models, *models.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return models


@dataclass
class Container:
    name: str
    url: str
    grpc_url: str


@pytest.fixture(scope="module")
def container(image: str, store: Path) -> Iterator[Container]:
    """The image running as deploy/'s router pod runs it, with the LLM in the same container."""
    port, grpc_port = free_port(), free_port()
    name = f"servery-test-{uuid.uuid4().hex[:8]}"
    env = {
        "BENTOML_HOME": STORE,
        "HOME": "/tmp",
        "HF_HUB_OFFLINE": "1",
        "SERVERY_GRPC_HOST": "127.0.0.1",
        "SERVERY_GRPC_PORT": str(grpc_port),
        "SERVERY_ROUTER_WORKERS": "1",
        "SERVERY_MODEL_THREADS": "1",
        "SERVERY_LLM_ENABLED": "true",
        "SERVERY_LLM_MODELS": "tiny=tiny-llm",
        "SERVERY_LLM_ENFORCE_EAGER": "true",
        "SERVERY_LLM_CPU_KVCACHE_GIB": "1",
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "SERVERY_SHUTDOWN_DRAIN_S": "3",
    }
    run = ["run", "-d", "--name", name, "--network", "host", "--read-only"]
    run += ["--tmpfs", "/tmp:rw,mode=1777", "--tmpfs", f"{STORE}:rw,mode=1777"]
    # vLLM's workers share tensors through /dev/shm (the LLM pod mounts a memory emptyDir there)
    run += ["--shm-size", "1g"]
    run += ["-v", f"{store}:{STORE}/models:ro", "-v", f"{store}:{BENTO_MODELS}:ro"]
    run += [a for k, v in env.items() for a in ("-e", f"{k}={v}")]
    run += [image, "start-http-server", "--host", "127.0.0.1", "--port", str(port)]
    t0 = time.monotonic()
    podman(*run)
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            state = podman("inspect", "--format", "{{.State.Status}}", name).stdout.strip()
            assert state == "running", f"the container is {state}:\n{logs(name)}"
            try:
                if httpx.get(f"{url}/readyz", timeout=3).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() - t0 < READY_S, f"not ready in {READY_S} s:\n{logs(name)}"
            time.sleep(0.5)
        print(f"container ready in {time.monotonic() - t0:.1f} s")
        yield Container(name, url, f"127.0.0.1:{grpc_port}")
    finally:
        podman("rm", "-f", "-t", "0", name, check=False)
        assert podman("container", "exists", name, check=False).returncode == 1


def logs(name: str) -> str:
    return podman("logs", "--tail", "60", name, check=False).stderr[-6000:]


def test_runs_as_the_non_root_user(container: Container) -> None:
    """Every process of the container runs as ``bentoml`` (uid/gid 1034, deploy/'s runAsUser):
    read from the host, the container's process tree (no user namespace: the same uids)."""
    pid = int(podman("inspect", "--format", "{{.State.Pid}}", container.name).stdout)
    root = psutil.Process(pid)
    tree = [root, *root.children(recursive=True)]
    assert len(tree) >= 3, tree  # the server, its workers
    assert {(p.uids().real, p.uids().effective, p.gids().real) for p in tree} == {
        (1034, 1034, 1034)
    }
    assert any("bentoml" in " ".join(p.cmdline()) for p in tree)


@pytest.mark.parametrize("model", DEMOS)
def test_predictions_over_rest_oip_and_grpc(container: Container, model: str) -> None:
    rows = dataset(model)[:3].tolist()
    resp = httpx.post(f"{container.url}/predict", json={"model": model, "inputs": rows}, timeout=30)
    assert resp.status_code == 200, resp.text
    labels = resp.json()["predictions"]
    assert len(labels) == 3

    meta = httpx.get(f"{container.url}/v2/models/{model}", timeout=10).json()
    datatype = meta["inputs"][0]["datatype"]
    body = {"inputs": [{"name": "input-0", "shape": [3, len(rows[0])], "datatype": datatype}]}
    body["inputs"][0]["data"] = rows
    resp = httpx.post(f"{container.url}/v2/models/{model}/infer", json=body, timeout=30)
    assert resp.status_code == 200, resp.text
    outputs = {o["name"]: o["data"] for o in resp.json()["outputs"]}
    assert outputs["predict"] == labels

    client = tg.InferenceServerClient(container.grpc_url)
    array = np.asarray(rows, dtype={"FP32": np.float32, "FP64": np.float64}[datatype])
    inp = tg.InferInput("input-0", list(array.shape), datatype)
    inp.set_data_from_numpy(array)
    result = client.infer(model, [inp], outputs=[tg.InferRequestedOutput("predict")])
    assert result.as_numpy("predict").tolist() == labels


def test_an_llm_chat_streams_through_the_router(container: Container) -> None:
    body = {
        "model": "tiny",
        "stream": True,
        "max_tokens": 8,
        "messages": [{"role": "user", "content": "Hi"}],
    }
    url = f"{container.url}/v1/chat/completions"
    with httpx.stream("POST", url, json=body, timeout=120) as resp:
        assert resp.status_code == 200, resp.read()
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = [line for line in resp.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert len(chunks) >= 2 and chunks[0]["object"] == "chat.completion.chunk"
    assert chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop")


def test_metrics_are_scraped(container: Container) -> None:
    resp = httpx.get(f"{container.url}/metrics", timeout=10)
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/plain")
    assert "servery_" in resp.text and 'model="iris"' in resp.text


def test_the_image_holds_the_lock_less_the_trimmed_set(container: Container) -> None:
    """Every package of the runtime lock, at its version, except exactly what the bentofile's
    SERVERY_IMAGE_TRIM leaves out (and that is gone)."""
    script = (
        "import importlib.metadata as m, json, os, sys; "
        "site = next(p for p in sys.path if p.endswith('site-packages')); "
        "print(json.dumps([{d.metadata['Name']: d.version for d in m.distributions()}, "
        "{p: os.path.exists(os.path.join(site, p)) for p in sys.argv[1:]}]))"
    )
    out = podman("exec", container.name, "python", "-c", script, *TRIM).stdout
    installed, present = json.loads(out)
    installed = {canonicalize_name(k): v for k, v in installed.items()}
    want = {k: str(v) for k, v in locks.pins(locks.RUNTIME["cpu"], locks.linux("3.11")).items()}
    trimmed = {canonicalize_name(p) for p in TRIM if "/" not in p}
    assert trimmed <= set(want), trimmed - set(want)
    assert {k: v for k, v in want.items() if k not in trimmed} == installed
    assert present == dict.fromkeys(TRIM, False)
    # the venv that runs the tests holds the trimmed ones (the image differs from it only there)
    assert all(importlib.metadata.version(name) for name in trimmed)


def test_sigterm_drains_and_exits_zero(container: Container) -> None:
    """`podman stop` (SIGTERM, as Kubernetes sends) while a stream is in flight: the container
    exits 0 within the grace period. Runs last in this module: it stops the container."""
    t0 = time.monotonic()
    podman("stop", "-t", str(GRACE_S), container.name, timeout=GRACE_S + 30)
    took = time.monotonic() - t0
    code = podman("inspect", "--format", "{{.State.ExitCode}}", container.name).stdout.strip()
    assert code == "0", f"exit {code} after {took:.1f} s:\n{logs(container.name)}"
    assert took < GRACE_S, took
