"""MLServer 1.7 as a peer, by hand: install it, check its answers, or an informal side by side.

    python -m bench.studies.mlserver_peer --setup    # .venv-mlserver only (idempotent)
    python -m bench.studies.mlserver_peer --check [--repo DIR]   # + export, start, one infer each
    python -m bench.studies.mlserver_peer --compare [-c 64] [--duration 5]   # informal, by hand

How MLServer is installed (``.venv-mlserver``, Python 3.11, its pins kept from ours) and served
(our stored models exported into its repository) is :mod:`bench.harness.mlserver`; ``make
peer-mlserver`` runs ``--setup``. ``--check`` serves iris (``mlserver_sklearn.SKLearnModel``) and
breast_cancer_large (the 300-tree XGBoost, ``mlserver_xgboost.XGBoostModel``) from BentoML's
model store ($BENTOML_HOME, else ~/bentoml) and compares one REST and one gRPC answer per model
with the prediction in this process. ``--compare`` loads our router, then MLServer, one at a time,
with wrk; the measured side by side is :mod:`bench.studies.peers`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bench.harness.mlserver import (
    DEFAULT_MODELS,
    EXPECTED_PIP_CHECK,
    VENV,
    MLServer,
    pip_check,
    prepare_repository,
    running,
    setup,
)
from bench.harness.results import use_model_store
from bench.harness.server import start_server
from bench.harness.subjects import N_BODIES, OIP_DATATYPES, load_subject, oip_body
from bench.harness.wrk import measure


def check_model(server: MLServer, name: str) -> dict[str, Any]:
    """REST infer (default outputs, then both) and one tritonclient.grpc infer vs in-process."""
    import tritonclient.grpc as grpcclient

    subject = load_subject(name)
    row = subject.rows[0]
    out = subject.runtime.predict(row[None, :])
    labels, proba = out["predict"], out["predict_proba"]
    url = f"{server.url}/v2/models/{name}/infer"
    default = httpx.post(url, json=oip_body(row), timeout=10)
    default.raise_for_status()
    both = httpx.post(url, json=oip_body(row, ("predict", "predict_proba")), timeout=10)
    both.raise_for_status()
    rest = {o["name"]: o for o in both.json()["outputs"]}
    client = grpcclient.InferenceServerClient(url=server.grpc_url)
    try:
        x = grpcclient.InferInput("input-0", [1, len(row)], OIP_DATATYPES[row.dtype.name])
        x.set_data_from_numpy(np.ascontiguousarray(row[None, :]))
        wanted = [grpcclient.InferRequestedOutput(o) for o in ("predict", "predict_proba")]
        result = client.infer(name, [x], outputs=wanted, request_id="1")
        grpc_labels, grpc_proba = result.as_numpy("predict"), result.as_numpy("predict_proba")
    finally:
        client.close()
    # MLServer answers `predict` as [n, 1] (ours: [n]): compare values, report shapes.
    rest_labels = np.asarray(rest["predict"]["data"]).ravel()
    rest_proba = np.asarray(rest["predict_proba"]["data"]).reshape(proba.shape)
    report = {
        "model": name,
        "default_outputs": [
            {k: o[k] for k in ("name", "datatype", "shape", "data")}
            for o in default.json()["outputs"]
        ],
        "both_outputs": [{k: o[k] for k in ("name", "datatype", "shape")} for o in rest.values()],
        "grpc_shapes": {"predict": grpc_labels.shape, "predict_proba": grpc_proba.shape},
        "ours": {"predict": labels.tolist(), "predict_proba": proba.tolist()},
        "default_match": default.json()["outputs"][0]["data"] == labels.tolist(),
        "rest_match": rest_labels.tolist() == labels.tolist()
        and np.allclose(rest_proba, proba, rtol=0, atol=1e-6),
        "grpc_match": grpc_labels.ravel().tolist() == labels.tolist()
        and np.allclose(grpc_proba.reshape(proba.shape), proba, rtol=0, atol=1e-6),
    }
    return report


def check(repo: Path, models: Sequence[str]) -> bool:
    """Setup, export, start, check every model, stop; True if every answer matched ours."""
    setup()
    served = prepare_repository(models, repo)
    ok = True
    with running(repo) as server:
        print(f"MLServer ready at {server.url} (gRPC {server.grpc_url})", flush=True)
        for name in served:
            report = check_model(server, name)
            print(json.dumps(report), flush=True)
            ok &= report["rest_match"] and report["grpc_match"] and report["default_match"]
    return ok


def compare(repo: Path, models: Sequence[str], concurrency: int, seconds: int) -> None:
    """Informal side by side: our router (inline) then MLServer, one at a time, wrk OIP REST."""
    setup()
    served = prepare_repository(models, repo)
    variants = {"default": (), "both": ("predict", "predict_proba")}
    rows = {m: load_subject(m).rows[:N_BODIES] for m in served}
    bodies = {
        (m, v): [json.dumps(oip_body(r, outs)) for r in rows[m]]
        for m in served
        for v, outs in variants.items()
    }
    results: dict[tuple[str, str, str], Any] = {}

    def load(server: str, base_url: str) -> None:
        for (m, v), body in bodies.items():
            url = f"{base_url}/v2/models/{m}/infer"
            httpx.post(url, content=body[0], timeout=10).raise_for_status()
            measure(url, body, concurrency=concurrency, seconds=1)  # warm-up
            r = measure(url, body, concurrency=concurrency, seconds=seconds)
            results[(server, m, v)] = r
            print(f"  {server:<9} {m:<20} outputs={v:<8} {r.line()}", flush=True)

    home = Path(os.environ["BENTOML_HOME"])
    entries = (f"  - {{name: {m}, tag: {m}, placement: inline}}\n" for m in served)
    config = "models:\n" + "".join(entries)
    with tempfile.TemporaryDirectory(prefix="servery-peer-") as tmp:
        router = start_server(home, config, Path(tmp))
        try:
            load("servery", router.url)
        finally:
            router.stop()
    with running(repo) as server:
        load("mlserver", server.url)
    print(f"\nc={concurrency}, {seconds} s, wrk, OIP V2 REST JSON, 1 row per request")
    head = ("model", "outputs", "servery rps", "p99", "mlserver rps", "p99", "rps x", "p99 x")
    print("{:<20} {:<8} {:>11} {:>7} {:>12} {:>7} {:>6} {:>6}".format(*head))
    for m, v in bodies:
        s, p = results[("servery", m, v)], results[("mlserver", m, v)]
        print(
            f"{m:<20} {v:<8} {s.ok_rps:11.0f} {s.p99_ms:7.1f} {p.ok_rps:12.0f} {p.p99_ms:7.1f} "
            f"{s.ok_rps / p.ok_rps:6.2f} {s.p99_ms / p.p99_ms:6.2f}  errors {s.errors}/{p.errors}"
        )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.studies.mlserver_peer", description=__doc__)
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--setup", action="store_true", help="create .venv-mlserver only")
    mode.add_argument("--check", action="store_true", help="setup, export, start, infer, stop")
    mode.add_argument("--compare", action="store_true", help="one informal wrk side by side")
    p.add_argument("--models", default=",".join(DEFAULT_MODELS), help="store names, comma list")
    p.add_argument("--repo", type=Path, help="keep the MLServer repository here (default: temp)")
    p.add_argument("-c", "--concurrency", type=int, default=64)
    p.add_argument("--duration", type=int, default=5, help="seconds per --compare run")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    use_model_store()
    if args.setup:
        setup()
        problems = pip_check()
        print(f"{VENV}: pip check " + ("; ".join(problems) if problems else "ok"), flush=True)
        print("  (ignored, expected: 'mlserver-xgboost ... " + EXPECTED_PIP_CHECK + "')")
        return 1 if problems else 0
    models = [m for m in args.models.split(",") if m]
    with contextlib.ExitStack() as stack:
        repo = args.repo or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        if args.check:
            return 0 if check(repo, models) else 1
        compare(repo, models, args.concurrency, args.duration)
    return 0


if __name__ == "__main__":
    sys.exit(main())
