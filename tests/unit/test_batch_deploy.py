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
