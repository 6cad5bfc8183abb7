"""deploy/components/qdrant: rendered with the overlay and the llm component, as deploy/README.md
adds optional components; valid objects, locked down, wired to the router, and reachable only
from router pods (NetworkPolicies evaluated with Kubernetes semantics by test_deploy's helpers)."""

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


@pytest.fixture(scope="module")
def with_qdrant() -> list[Obj]:
    return render_with("components/llm", "components/qdrant", overlay="overlays/cpu")


def test_objects_are_valid_and_locked_down(with_qdrant: list[Obj]) -> None:
    qdrant = named(with_qdrant, "StatefulSet", "servery-qdrant")
    assert not schema_errors(qdrant)
    pod = qdrant["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    own = container["securityContext"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"]
    assert pod["automountServiceAccountToken"] is False and pod["enableServiceLinks"] is False
    assert own["readOnlyRootFilesystem"] is True and own["allowPrivilegeEscalation"] is False
    assert own["capabilities"] == {"drop": ["ALL"]}
    assert container["resources"]["requests"] == container["resources"]["limits"]
    assert {"readinessProbe", "livenessProbe"} <= set(container)
    claim = qdrant["spec"]["volumeClaimTemplates"][0]
    mounts = {
        m["name"]: m["mountPath"]
        for m in qdrant["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
    }
    assert mounts[claim["metadata"]["name"]] == "/qdrant/storage"
    assert container["image"].startswith("qdrant/qdrant:")
    service = named(with_qdrant, "Service", "servery-qdrant")
    assert (
        service["spec"]["selector"].items()
        <= qdrant["spec"]["template"]["metadata"]["labels"].items()
    )


def test_the_router_uses_the_server(with_qdrant: list[Obj]) -> None:
    router = named(with_qdrant, "Deployment", "servery-router")
    assert env(router["spec"]["template"]["spec"]["containers"][0])["SERVERY_QDRANT_URL"] == (
        "http://servery-qdrant:6333"
    )


def test_only_router_pods_reach_qdrant(with_qdrant: list[Obj]) -> None:
    policies = of_kind(with_qdrant, "NetworkPolicy")
    qdrant_set = named(with_qdrant, "StatefulSet", "servery-qdrant")
    qdrant = pod_of(qdrant_set)
    router = pod_of(named(with_qdrant, "Deployment", "servery-router"))
    llm = pod_of(named(with_qdrant, "Deployment", "servery-llm"))
    namespaces = {
        NAMESPACE: {},
        "shop": {CLIENT_LABEL: "true"},
        "monitoring": {SCRAPER_LABEL: "true"},
        "default": {},
    }
    port = qdrant.ports["http"]
    assert allowed(policies, namespaces, router, qdrant, port)
    assert not allowed(policies, namespaces, llm, qdrant, port)
    assert not allowed(policies, namespaces, Pod("shop", {"app": "web"}), qdrant, port)
    assert not allowed(policies, namespaces, Pod("shop", router.labels), qdrant, port)
    assert not allowed(policies, namespaces, router, qdrant, 6334)
