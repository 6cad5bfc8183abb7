"""The GPU path without a GPU (issue 25): what the GPU image and the gpu overlay give vLLM, the
optional driver-version affinity, and the deployed LLM file's values against the autoscaler.

Manifests are rendered with the real kustomize (tests/unit/test_deploy.py's helpers); node
affinity is evaluated with Kubernetes' own semantics for In and Gt (terms ORed, expressions
ANDed, Gt on the label's integer value).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from models.llm_config import load_config
from tests.unit.test_deploy import DEPLOY, NAMESPACE, ROOT, env, kustomize, named

Obj = dict[str, Any]
DRIVER = "nvidia.com/cuda.driver-version"


@pytest.fixture(scope="module")
def gpu_overlay() -> list[Obj]:
    return kustomize(DEPLOY / "overlays/gpu")


@pytest.fixture(scope="module")
def with_driver_affinity(tmp_path_factory: pytest.TempPathFactory) -> list[Obj]:
    """The gpu overlay plus the optional gpu-driver component, as docs/gpu.md adds it."""
    overlay = tmp_path_factory.mktemp("overlay")
    rel = Path(os.path.relpath(DEPLOY, overlay))
    overlay.joinpath("kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "namespace": NAMESPACE,
                "resources": [str(rel / "overlays/gpu")],
                "components": [str(rel / "components/gpu-driver")],
            }
        )
    )
    return kustomize(overlay)


def llm_container(objs: list[Obj]) -> Obj:
    pod = named(objs, "Deployment", "servery-llm")["spec"]["template"]["spec"]
    return next(c for c in pod["containers"] if c["name"] == "llm")


def test_flashinfer_sampler_is_off_in_the_gpu_image_and_pod(gpu_overlay: list[Obj]) -> None:
    """vLLM 0.32 selects FlashInfer's sampler from the GPU model alone and FlashInfer JIT-compiles
    it with nvcc, which neither image has; both the Bento's env and the pod turn it off."""
    assert env(llm_container(gpu_overlay))["VLLM_USE_FLASHINFER_SAMPLER"] == "0"
    bentofile = yaml.safe_load((ROOT / "bentofile.gpu.yaml").read_text())
    envs = {e["name"]: e["value"] for e in bentofile.get("envs", [])}
    assert envs["VLLM_USE_FLASHINFER_SAMPLER"] == "0"


def test_vllm_reads_that_switch() -> None:
    """The variable is vLLM 0.32's own, read as an integer flag."""
    import vllm.envs as vllm_envs

    os.environ["VLLM_USE_FLASHINFER_SAMPLER"] = "0"
    try:
        assert vllm_envs.VLLM_USE_FLASHINFER_SAMPLER is False
    finally:
        del os.environ["VLLM_USE_FLASHINFER_SAMPLER"]


def term_matches(term: Obj, labels: dict[str, str]) -> bool:
    for expr in term["matchExpressions"]:
        value = labels.get(expr["key"])
        if value is None:
            return False
        if expr["operator"] == "In" and value not in expr["values"]:
            return False
        if expr["operator"] == "Gt" and not int(value) > int(expr["values"][0]):
            return False
        if expr["operator"] not in ("In", "Gt"):
            raise AssertionError(f"operator {expr['operator']} not evaluated here")
    return True


def schedulable(deployment: Obj, labels: dict[str, str]) -> bool:
    affinity = deployment["spec"]["template"]["spec"].get("affinity", {})
    required = affinity.get("nodeAffinity", {}).get(
        "requiredDuringSchedulingIgnoredDuringExecution"
    )
    if required is None:
        return True
    return any(term_matches(t, labels) for t in required["nodeSelectorTerms"])


def gfd(version: str) -> dict[str, str]:
    """The labels GPU Feature Discovery sets for a driver version (revision as printed: '06')."""
    major, minor, revision = version.split(".")
    return {
        f"{DRIVER}.major": major,
        f"{DRIVER}.minor": minor,
        f"{DRIVER}.revision": revision,
        f"{DRIVER}.full": version,
    }


@pytest.mark.parametrize(
    ("version", "ok"),
    [
        ("550.163.01", False),
        ("575.57.08", False),
        ("580.65.05", False),
        ("580.65.06", True),
        ("580.65.10", True),
        ("580.82.07", True),
        ("590.44.01", True),
        ("600.10.01", True),
    ],
)
def test_driver_affinity_keeps_llm_pods_off_old_drivers(
    with_driver_affinity: list[Obj], version: str, ok: bool
) -> None:
    llm = named(with_driver_affinity, "Deployment", "servery-llm")
    assert schedulable(llm, gfd(version)) is ok
    assert not schedulable(llm, {})  # no GFD labels: no node, hence an optional component
    llm_spec = llm["spec"]["template"]["spec"]
    assert llm_spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}


def test_the_gpu_overlay_alone_has_no_driver_affinity(gpu_overlay: list[Obj]) -> None:
    llm = named(gpu_overlay, "Deployment", "servery-llm")
    assert schedulable(llm, {})


def test_the_deployed_llm_file_carries_the_deployments_values(gpu_overlay: list[Obj]) -> None:
    """One place for what the LLM pod runs: llm.yaml (which validate reads), not env values
    validate cannot see; the autoscaler's target is 75 % of its max_num_seqs."""
    config = load_config(DEPLOY / "components/llm/llm.yaml")
    (model,) = config.models
    assert (model.max_num_seqs, model.gpu_memory_utilization) == (64, 0.90)
    knobs = {k for k in env(llm_container(gpu_overlay)) if k.startswith("SERVERY_LLM_")}
    engine_knobs = {f"SERVERY_LLM_{k.upper()}" for k in type(model).model_fields}
    assert not knobs & engine_knobs, f"engine knobs set in the pod's env: {knobs & engine_knobs}"
    hpa = named(gpu_overlay, "HorizontalPodAutoscaler", "servery-llm")
    inflight = next(
        m["pods"]["target"]["averageValue"]
        for m in hpa["spec"]["metrics"]
        if m["pods"]["metric"]["name"] == "servery_llm_inflight_requests"
    )
    assert int(inflight) == int(0.75 * model.max_num_seqs)
