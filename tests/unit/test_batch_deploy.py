"""deploy/components/batch: rendered with the cpu overlay as deploy/README.md adds optional
components; valid objects, Redis with AOF on a volume, routers and workers wired to it and to the
files volume, and Redis reachable only from them (NetworkPolicies evaluated with Kubernetes
semantics by test_deploy's helpers)."""

from __future__ import annotations

import pytest

from tests.unit.test_deploy import (
    CLIENT_LABEL,
    NAMESPACE,
    SCRAPER_LABEL,
    Obj,
    Pod,
    allowed,
    env,
    named,
    of_kind,
    pod_of,
    render_with,
    schema_errors,
)

REDIS_URL = "redis://servery-redis:6379/0"


@pytest.fixture(scope="module")
def with_batch() -> list[Obj]:
    return render_with("components/batch", overlay="overlays/cpu")


def _mounts(deployment: Obj) -> dict[str, str]:
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    return {m["mountPath"]: m["name"] for m in container["volumeMounts"]}


def test_objects_are_valid_and_redis_persists(with_batch: list[Obj]) -> None:
    redis = named(with_batch, "StatefulSet", "servery-redis")
    workers = named(with_batch, "Deployment", "servery-batch-worker")
    for obj in (
        redis,
        workers,
        named(with_batch, "HorizontalPodAutoscaler", "servery-batch-worker"),
    ):
        assert not schema_errors(obj)
    args = redis["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"
    claim = redis["spec"]["volumeClaimTemplates"][0]["metadata"]["name"]
    assert _mounts(redis)["/data"] == claim
    pod = workers["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"]
    assert pod["containers"][0]["securityContext"]["readOnlyRootFilesystem"]
    pvc = named(with_batch, "PersistentVolumeClaim", "servery-batch-files")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]


def test_routers_queue_and_workers_consume(with_batch: list[Obj]) -> None:
    router = named(with_batch, "Deployment", "servery-router")
    workers = named(with_batch, "Deployment", "servery-batch-worker")
    r_env = env(router["spec"]["template"]["spec"]["containers"][0])
    w_env = env(workers["spec"]["template"]["spec"]["containers"][0])
    assert (r_env["SERVERY_BATCH_ENABLED"], r_env["SERVERY_BATCH_WORKER"]) == ("true", "false")
    assert (w_env["SERVERY_BATCH_ENABLED"], w_env["SERVERY_BATCH_WORKER"]) == ("true", "true")
    assert r_env["SERVERY_BATCH_REDIS_URL"] == w_env["SERVERY_BATCH_REDIS_URL"] == REDIS_URL
    for deployment, values in ((router, r_env), (workers, w_env)):
        assert _mounts(deployment)[values["SERVERY_BATCH_DIR"]] == "batch-files"
    assert (
        workers["spec"]["template"]["spec"]["containers"][0]["image"]
        == (router["spec"]["template"]["spec"]["containers"][0]["image"])
    )


def test_without_the_component_routers_serve_no_batches() -> None:
    plain = render_with(overlay="overlays/cpu")
    router = named(plain, "Deployment", "servery-router")
    assert (
        env(router["spec"]["template"]["spec"]["containers"][0])["SERVERY_BATCH_ENABLED"] == "false"
    )


def test_only_routers_and_workers_reach_redis(with_batch: list[Obj]) -> None:
    policies = of_kind(with_batch, "NetworkPolicy")
    redis = pod_of(named(with_batch, "StatefulSet", "servery-redis"))
    router = pod_of(named(with_batch, "Deployment", "servery-router"))
    worker = pod_of(named(with_batch, "Deployment", "servery-batch-worker"))
    namespaces = {
        NAMESPACE: {},
        "shop": {CLIENT_LABEL: "true"},
        "monitoring": {SCRAPER_LABEL: "true"},
    }
    port = redis.ports["redis"]
    assert allowed(policies, namespaces, router, redis, port)
    assert allowed(policies, namespaces, worker, redis, port)
    assert not allowed(policies, namespaces, Pod("shop", {"app": "web"}), redis, port)
    assert not allowed(policies, namespaces, Pod("shop", router.labels), redis, port)
    # workers take no client traffic; Prometheus scrapes them
    assert not allowed(
        policies, namespaces, Pod("shop", {"app": "web"}), worker, worker.ports["http"]
    )
    prometheus = Pod("monitoring", {"app.kubernetes.io/name": "prometheus"})
    assert allowed(policies, namespaces, prometheus, worker, worker.ports["http"])


def test_batch_llm_wires_the_workers_to_the_llm() -> None:
    """The gpu overlay (with the llm component) plus batch and batch-llm: the workers get the
    router's LLM settings and the generated LLM ConfigMap, and the LLM's policy lets them in;
    without batch-llm they have none of it."""
    objs = render_with("components/batch", "components/batch-llm", overlay="overlays/gpu")
    router = named(objs, "Deployment", "servery-router")
    workers = named(objs, "Deployment", "servery-batch-worker")
    assert not schema_errors(workers)
    r_c, w_c = (d["spec"]["template"]["spec"]["containers"][0] for d in (router, workers))
    depends = w_c["args"][w_c["args"].index("--depends") + 1]
    assert (
        depends == r_c["args"][r_c["args"].index("--depends") + 1] == "llm=http://servery-llm:3000"
    )
    w_env, r_env = env(w_c), env(r_c)
    for name in ("SERVERY_LLM_ENABLED", "SERVERY_LLM_MODELS_FILE", "SERVERY_LLM_MAX_TOKENS_LIMIT"):
        assert w_env[name] == r_env[name], name
    assert w_env["SERVERY_LLM_ENABLED"] == "true"
    volumes = {v["name"]: v for v in workers["spec"]["template"]["spec"]["volumes"]}
    (generated,) = [o for o in of_kind(objs, "ConfigMap") if "llm.yaml" in o.get("data", {})]
    assert volumes["llm-config"]["configMap"]["name"] == generated["metadata"]["name"]
    assert _mounts(workers)["/etc/servery/llm"] == "llm-config"

    policies = of_kind(objs, "NetworkPolicy")
    llm = pod_of(named(objs, "Deployment", "servery-llm"))
    namespaces = {NAMESPACE: {}, "shop": {CLIENT_LABEL: "true"}}
    port = llm.ports["http"]
    assert allowed(policies, namespaces, pod_of(workers), llm, port)
    assert allowed(policies, namespaces, pod_of(router), llm, port)
    assert not allowed(policies, namespaces, Pod("shop", {"app": "web"}), llm, port)

    plain = render_with("components/batch", overlay="overlays/gpu")
    bare = named(plain, "Deployment", "servery-batch-worker")["spec"]["template"]["spec"]
    assert "--depends" not in bare["containers"][0]["args"]
    assert env(bare["containers"][0])["SERVERY_LLM_ENABLED"] == "false"
    assert not allowed(of_kind(plain, "NetworkPolicy"), namespaces, pod_of(workers), llm, port)
