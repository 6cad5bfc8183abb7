"""services/ops/health.py and the readiness policy in services/runtime/registry.py: a framework
service that
answered once and is unreachable now makes only its models not ready; /readyz waits for the
services to start, stays ready through one's restart, and is not ready when nothing can answer."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest

from models.config import Framework, Placement
from models.signature import Signature, TensorSpec
from models.versions import ModelPlan
from services.ops.health import ServiceHealth, probe_of
from services.runtime.errors import ModelNotFound
from services.runtime.predictors import ModelInfo
from services.runtime.registry import ModelRoutes, Registry, ServedModel
from tests.conftest import eventually_async


def served(name: str, placement: Placement, framework: Framework) -> ModelRoutes:
    info = ModelInfo(
        name=name,
        store_name=name,
        version="v1",
        framework=framework,
        signature=Signature(
            (TensorSpec("input-0", np.dtype("float64"), (4,)),), class_names=("x", "y")
        ),
        feature_names=["a", "b", "c", "d"],
        labels={},
        metadata={},
    )
    plan = ModelPlan(name, name, ("v1",), {}, "v1", "latest")
    return ModelRoutes(plan, {"v1": ServedModel(info, placement, batcher=None)})  # type: ignore[arg-type]


class Probes:
    """Stand-in probes: ``answers[service]`` is True, False or an exception to raise."""

    def __init__(self) -> None:
        self.answers: dict[str, Any] = {}

    def __call__(self, service: str):
        async def probe(timeout_s: float) -> bool:
            answer = self.answers.get(service, TimeoutError())
            if isinstance(answer, BaseException):
                raise answer
            return answer

        return probe


def setup(*, llm: bool = False) -> tuple[Registry, ServiceHealth, Probes]:
    probes = Probes()
    names = ["sklearn", "xgboost", "pytorch"] + (["llm"] if llm else [])
    health = ServiceHealth({n: probes(n) for n in names})
    registry = Registry(
        {
            "iris": served("iris", Placement.INLINE, Framework.SKLEARN),
            "iris-svc": served("iris-svc", Placement.SERVICE, Framework.SKLEARN),
            "digits-svc": served("digits-svc", Placement.SERVICE, Framework.PYTORCH),
        }
    )
    registry.health = health
    registry.other_services = ("llm",) if llm else ()
    return registry, health, probes


def listed(registry: Registry) -> dict[str, dict[str, Any]]:
    return {m["name"]: m for m in registry.describe()}


def test_readyz_waits_for_the_services_the_models_need_then_survives_a_restart() -> None:
    registry, health, probes = setup()
    assert registry.services() == {"sklearn", "pytorch"}  # xgboost serves nothing here
    assert not registry.ready()
    asyncio.run(health.probe(registry.services()))  # nobody answers yet: still starting
    assert not registry.ready()
    assert "has not answered" in (registry.problem("iris-svc") or "")
    probes.answers.update(sklearn=True, pytorch=True)
    asyncio.run(health.probe(registry.services()))
    assert registry.ready() and registry.problem("iris-svc") is None
    assert all(m["ready"] for m in listed(registry).values())

    # sklearn's worker dies: its model alone is not ready, the router stays ready
    probes.answers["sklearn"] = TimeoutError()
    asyncio.run(health.probe(registry.services()))
    assert registry.ready()
    why = registry.problem("iris-svc")
    assert why is not None and "sklearn service is not reachable since" in why
    assert "TimeoutError" in why
    models = listed(registry)
    assert models["iris-svc"]["ready"] is False and models["iris-svc"]["error"] == why
    assert models["iris"]["ready"] is True and models["digits-svc"]["ready"] is True
    assert registry.describe_model("iris-svc")["ready"] is False
    assert registry.problem("iris") is None and registry.problem("digits-svc") is None

    # it comes back
    probes.answers["sklearn"] = True
    asyncio.run(health.probe(registry.services()))
    assert registry.problem("iris-svc") is None and listed(registry)["iris-svc"]["ready"]
    with pytest.raises(ModelNotFound):
        registry.problem("nope")


def test_calls_mark_a_service_down_at_once_and_up_again() -> None:
    registry, health, _ = setup()
    health.mark_down("sklearn", "a call failed: ConnectError")  # before it ever answered
    assert "has not answered" in (registry.problem("iris-svc") or "")
    health.mark_up(Framework.SKLEARN)  # the router passes Framework members
    health.mark_up("pytorch")
    assert registry.ready() and registry.problem("iris-svc") is None
    health.mark_down(Framework.SKLEARN, "a call failed: RemoteProtocolError")
    assert "RemoteProtocolError" in (registry.problem("iris-svc") or "")
    health.mark_down("sklearn", "a call failed: ConnectError")  # the first cause is kept
    assert "RemoteProtocolError" in (registry.problem("iris-svc") or "")
    health.mark_up("sklearn")
    assert registry.problem("iris-svc") is None


def test_not_ready_when_nothing_can_answer() -> None:
    registry, health, _ = setup()
    registry = Registry({"iris-svc": served("iris-svc", Placement.SERVICE, Framework.SKLEARN)})
    registry.health = health
    health.mark_up("sklearn")
    assert registry.ready()
    health.mark_down("sklearn", "probe failed: TimeoutError")
    assert not registry.ready()  # the only model cannot answer: better another replica
    health.mark_up("sklearn")
    assert registry.ready()


def test_the_llm_service_counts_for_readiness() -> None:
    registry, health, probes = setup(llm=True)
    probes.answers.update(sklearn=True, pytorch=True)
    asyncio.run(health.probe(registry.services()))
    assert not registry.ready()  # vLLM still loading
    probes.answers["llm"] = True
    asyncio.run(health.probe(registry.services()))
    assert registry.ready()


def test_a_configured_model_with_nothing_to_serve_is_listed_but_leaves_the_router_ready() -> None:
    """Issue 20 item 7: a model that cannot be planned or loaded (the same in every replica)
    used to make every replica unready, dropping the models that are served."""
    registry, health, _ = setup()
    for s in ("sklearn", "pytorch"):
        health.mark_up(s)
    registry._swap(dict(registry._models), {"ghost": "no versions in the store"})
    assert registry.ready()
    assert listed(registry)["ghost"] == {
        "name": "ghost",
        "ready": False,
        "error": "no versions in the store",
    }


def test_not_ready_only_when_nothing_is_served() -> None:
    registry, health, _ = setup()
    for s in ("sklearn", "pytorch"):
        health.mark_up(s)
    registry._swap({}, {"iris": "no versions in the store"})
    assert not registry.ready()
    assert not Registry({}, errors={"iris": "invalid entry"}).ready()  # no health known
    # the LLM API alone is something served
    registry, health, _ = setup(llm=True)
    registry._swap({}, {"iris": "no versions in the store"})
    assert not registry.ready()  # the LLM service has not answered yet
    health.mark_up("llm")
    assert registry.ready()


def test_watch_probes_what_the_registry_needs_and_survives_failures() -> None:
    seen: list[list[str]] = []

    async def main() -> None:
        async def probe(timeout_s: float) -> bool:
            seen.append(["sklearn"])
            if len(seen) == 2:
                raise RuntimeError("boom")
            return True

        health = ServiceHealth({"sklearn": probe})
        task = asyncio.ensure_future(health.watch(lambda: ["sklearn", "other"], 0.01, 0.01))
        # a later probe answered and was recorded: the watcher survived the second one's failure
        await eventually_async(
            lambda: task.done() or (len(seen) >= 3 and health.problem("sklearn") is None),
            "a probe after the failed one",
        )
        assert not task.done()
        task.cancel()

    asyncio.run(main())
    assert len(seen) >= 3


def test_probe_of_an_in_process_dependency_always_answers() -> None:
    assert asyncio.run(probe_of(object())(1.0)) is True

    class Remote:
        async def is_ready(self, timeout: float) -> bool:
            await asyncio.sleep(10)
            return True

    with pytest.raises(TimeoutError):
        asyncio.run(probe_of(Remote())(0.05))


def ready_gauge(model: str) -> float:
    from services.ops import metrics

    family = metrics.MODEL_READY.collect()[0]
    (sample,) = [s for s in family.samples if s.labels["model"] == model]
    return sample.value


def test_model_ready_gauge_follows_probes_without_any_call() -> None:
    # Before: servery_model_ready learned a service was down only when a call to it failed, so
    # an idle model behind a dead service stayed 1 (ServeryModelNotReady never fired).
    registry, health, probes = setup()
    assert ready_gauge("iris") == 1  # inline: needs no service
    assert ready_gauge("iris-svc") == 0  # its service has not answered since the worker started
    probes.answers.update(sklearn=True, pytorch=True)
    asyncio.run(health.probe(registry.services()))
    assert ready_gauge("iris-svc") == 1 and ready_gauge("digits-svc") == 1

    probes.answers["sklearn"] = TimeoutError()  # the sklearn worker dies; no traffic at all
    asyncio.run(health.probe(registry.services()))
    assert ready_gauge("iris-svc") == 0
    assert ready_gauge("digits-svc") == 1 and ready_gauge("iris") == 1

    health.mark_up("sklearn")  # a call (or the next probe) is answered again
    assert ready_gauge("iris-svc") == 1
    health.mark_down("sklearn", "a call failed: ConnectError")
    assert ready_gauge("iris-svc") == 0


def test_on_change_listeners_run_only_on_a_change() -> None:
    health = ServiceHealth({})
    calls: list[None] = []
    health.on_change(lambda: calls.append(None))
    health.mark_down("sklearn", "x")  # never answered: stays starting, no change
    assert calls == []
    health.mark_up("sklearn")  # first answer
    health.mark_up("sklearn")  # answered again: nothing new
    assert len(calls) == 1
    health.mark_down("sklearn", "x")
    health.mark_down("sklearn", "y")  # already down
    assert len(calls) == 2
    health.mark_up("sklearn")
    assert len(calls) == 3
