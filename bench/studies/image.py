"""The container image's size, build time and time to ready (issue 21): ``make bench-image``.

    python -m bench.studies.image [--cold] [--repeats N] [--llm STORE_NAME]

* builds the image with ``deploy/image/image.sh build`` twice: the first fills podman-state/'s
  layer cache where the lock or the template changed, the second is warm (a new Bento version, so
  the code layers rebuild as after a code change); ``--cold`` also builds once
  into a scratch state folder (no base image, no layers), sampling the disk the build uses (the
  filesystem's used bytes and the state folder's size, every 2 s) to give its peak;
* sizes: uncompressed (podman's image size) and compressed (the layers gzipped, as a registry
  stores them: ``podman push --compress`` to a ``dir:`` folder);
* time from ``podman run`` to ``/readyz`` answering 200, ``--repeats`` times (median): the
  classifiers only (LLM off), and with an LLM (``--llm``, default smollm2 when the store has it),
  the container run as tests/integration/test_image.py runs it, with the store at $BENTOML_HOME
  (else ~/bentoml) mounted read-only.

Writes bench/out/image.json and the "image" section of bench/RESULTS.md (a run without ``--cold``
keeps the last cold build's numbers, dated).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

from bench.harness.results import OUT_DIR, RESULTS_MD, run_line, write_section
from bench.harness.server import ROOT, free_port
from bench.report import machine

SCRIPT = ROOT / "deploy" / "image" / "image.sh"
OUT_JSON = OUT_DIR / "image.json"
IMAGE = "servery:bench-cpu"


def state_env(state: Path | None = None) -> dict[str, str]:
    env = dict(os.environ)
    if state is not None:
        env["IMAGE_STATE"] = str(state)
    out = subprocess.run(
        ["bash", str(SCRIPT), "env"], env=env, capture_output=True, text=True, check=True
    ).stdout
    for word in shlex.split(out.strip().removeprefix("export ")):
        key, _, value = word.partition("=")
        env[key] = value
    return env


def podman(*args: str, env: dict[str, str]) -> str:
    return subprocess.run(
        ["podman", *args], env=env, capture_output=True, text=True, check=True
    ).stdout


def podman_version() -> str:
    return subprocess.run(["podman", "--version"], capture_output=True, text=True).stdout.strip()


def build(state: Path | None = None) -> tuple[str, float]:
    env = dict(os.environ) | {"IMAGE": IMAGE}
    if state is not None:
        env["IMAGE_STATE"] = str(state)
    with tempfile.TemporaryDirectory() as home:
        env["BENTOML_HOME"] = home  # a fresh Bento version: the code layers rebuild
        t0 = time.monotonic()
        done = subprocess.run(
            ["bash", str(SCRIPT), "build"], env=env, capture_output=True, text=True
        )
    if done.returncode:
        sys.exit(f"image.sh build: {done.returncode}\n{done.stderr[-4000:]}")
    return done.stdout.strip().splitlines()[-1], time.monotonic() - t0


def du_kb(path: Path) -> int:
    out = subprocess.run(["du", "-skx", str(path)], capture_output=True, text=True).stdout
    return int(out.split()[0]) if out else 0


def df_used_kb(path: Path) -> int:
    out = subprocess.run(["df", "-Pk", str(path)], capture_output=True, text=True).stdout
    return int(out.splitlines()[1].split()[2])


def cold_build() -> dict[str, Any]:
    """One build from nothing into a scratch state folder, with its peak disk use."""
    state = ROOT / "podman-state" / f"cold-{uuid.uuid4().hex[:6]}"
    state.mkdir(parents=True)
    base_df, peak_df, peak_du, stop = df_used_kb(state), 0, 0, threading.Event()

    def sample() -> None:
        nonlocal peak_df, peak_du
        while not stop.wait(2):
            peak_df = max(peak_df, df_used_kb(state) - base_df)
            peak_du = max(peak_du, du_kb(state))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        _, seconds = build(state)
        stop.set()
        sampler.join()
        after = du_kb(state)
    finally:
        subprocess.run(
            ["podman", "system", "reset", "-f"], env=state_env(state), capture_output=True
        )
        shutil.rmtree(state, ignore_errors=True)
    return {
        "seconds": seconds,
        "peak_disk_gb": peak_df / 1024**2,
        "peak_state_gb": peak_du / 1024**2,
        "after_state_gb": after / 1024**2,
    }


def sizes(ref: str, env: dict[str, str]) -> dict[str, float]:
    size = json.loads(podman("image", "inspect", ref, env=env))[0]["Size"]
    with tempfile.TemporaryDirectory(dir=env["TMPDIR"]) as out:
        podman("push", "--compress", ref, f"dir:{out}", env=env)
        manifest = json.loads((Path(out) / "manifest.json").read_text())
    compressed = sum(layer["size"] for layer in manifest["layers"])
    return {"uncompressed_gb": size / 1e9, "compressed_gb": compressed / 1e9}


def time_to_ready(ref: str, env: dict[str, str], llm: str | None, store: Path) -> float:
    port, grpc = free_port(), free_port()
    name = f"servery-bench-{uuid.uuid4().hex[:6]}"
    run = ["run", "-d", "--name", name, "--network", "host", "--read-only", "--shm-size", "1g"]
    run += ["--tmpfs", "/tmp:rw,mode=1777", "--tmpfs", "/srv/bentoml:rw,mode=1777"]
    run += ["-v", f"{store}:/srv/bentoml/models:ro", "-v", f"{store}:/home/bentoml/bento/models:ro"]
    envs = {
        "BENTOML_HOME": "/srv/bentoml",
        "HOME": "/tmp",
        "HF_HUB_OFFLINE": "1",
        "SERVERY_GRPC_HOST": "127.0.0.1",
        "SERVERY_GRPC_PORT": str(grpc),
        "SERVERY_LLM_ENABLED": "true" if llm else "false",
    }
    if llm:
        envs |= {"SERVERY_LLM_MODELS": f"{llm}={llm}", "SERVERY_LLM_MODELS_FILE": ""}
    run += [a for k, v in envs.items() for a in ("-e", f"{k}={v}")]
    run += [ref, "start-http-server", "--host", "127.0.0.1", "--port", str(port)]
    t0 = time.monotonic()
    podman(*run, env=env)
    try:
        while time.monotonic() - t0 < 900:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                    return time.monotonic() - t0
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        sys.exit(f"{name}: not ready in 900 s")
    finally:
        subprocess.run(["podman", "rm", "-f", "-t", "0", name], env=env, capture_output=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cold", action="store_true", help="also a cold build (~5 min, ~11 GB)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--llm", default=None, help="LLM store name (default smollm2 if stored)")
    args = parser.parse_args(argv)
    home = Path(os.environ.get("BENTOML_HOME") or Path.home() / "bentoml")
    store = home / "models"
    llm = args.llm or ("smollm2" if (store / "smollm2").is_dir() else None)
    result: dict[str, Any] = {
        "meta": machine("make bench-image " + " ".join(argv or sys.argv[1:]), podman_version())
    }
    if args.cold:
        result["cold"] = cold_build()
        print(f"cold build: {result['cold']}")
        OUT_JSON.parent.mkdir(parents=True, exist_ok=True)
        OUT_JSON.write_text(json.dumps(result, indent=2))  # kept should the rest fail
    elif OUT_JSON.exists() and "cold" in (earlier := json.loads(OUT_JSON.read_text())):
        result["cold"] = earlier["cold"] | {"date": earlier["meta"]["date"]}  # kept from --cold
    # the first build fills this state's cache (after a code or lock change); the second is warm
    ref, first = build()
    result["first_build_s"] = first
    ref, warm = build()
    result["warm_build_s"] = warm
    env = state_env()
    result |= sizes(ref, env)
    gb = f"{result['uncompressed_gb']:.2f} GB, {result['compressed_gb']:.2f} GB gzipped"
    print(f"warm build {warm:.0f} s; {gb}")
    # a copy of the store the container's user may read
    with tempfile.TemporaryDirectory(dir=env["TMPDIR"]) as tmp:
        copy = Path(tmp) / "models"
        names = ["iris", "breast_cancer", "digits", *([llm] if llm else [])]
        for n in names:
            shutil.copytree(store / n, copy / n, symlinks=True)
        os.chmod(tmp, 0o755)
        for p in [copy, *copy.rglob("*")]:
            p.chmod(0o755 if p.is_dir() else 0o644)
        for key, model in (("ready_classifiers_s", None), ("ready_llm_s", llm)):
            if key == "ready_llm_s" and not llm:
                continue
            times = [time_to_ready(ref, env, model, copy) for _ in range(args.repeats)]
            result[key] = statistics.median(times)
            print(f"{key}: {[round(t, 1) for t in times]}")
    OUT_JSON.parent.mkdir(parents=True, exist_ok=True)
    OUT_JSON.write_text(json.dumps(result, indent=2))
    rows = [
        f"| image size, uncompressed | {result['uncompressed_gb']:.2f} GB |",
        f"| image size, compressed (gzipped layers) | {result['compressed_gb']:.2f} GB |",
        f"| warm build (code changed, layers cached) | {warm:.0f} s |",
        f"| (the first build in podman-state/ this run) | {first:.0f} s |",
        f"| `podman run` to `/readyz`, classifiers | {result['ready_classifiers_s']:.1f} s |",
    ]
    if llm:
        rows.append(
            f"| `podman run` to `/readyz`, classifiers + {llm} | {result['ready_llm_s']:.1f} s |"
        )
    if "cold" in result:
        c = result["cold"]
        rows += [
            f"| cold build (no base image, no layers){' of ' + c['date'] if 'date' in c else ''}"
            f" | {c['seconds']:.0f} s |",
            f"| its peak disk use: filesystem | {c['peak_disk_gb']:.1f} GB |",
            f"| its peak disk use: state folder | {c['peak_state_gb']:.1f} GB |",
            f"| the state folder after it | {c['after_state_gb']:.1f} GB |",
        ]
    md = (
        "## Image (issue 21)\n\n"
        + run_line(result["meta"])
        + f" Times from `podman run` are medians of {args.repeats}; the LLM starts with"
        + " torch.compile (the default), the classifiers in the Bento's default model config."
        + "\n\n| | |\n|---|---|\n"
        + "\n".join(rows)
        + "\n"
    )
    write_section(RESULTS_MD, "image", md)


if __name__ == "__main__":
    main()
